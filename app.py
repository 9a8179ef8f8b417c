"""Receive the live audio of Twilio phone calls (Media Streams) on a WebSocket at /media.

Run: python app.py  (then `ngrok http 5000` and point a TwiML <Stream url="wss://<ngrok host>/media"/> here)
"""
import argparse
import base64
import binascii
import hashlib
import hmac
import logging
import math
import os
import re
import signal
import struct
import sys
import tempfile
import time
import wave
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import flask_sockets
import gevent
import geventwebsocket.handler
from flask import Flask, request
from gevent import pywsgi
from geventwebsocket.exceptions import FrameTooLargeException, ProtocolError, WebSocketError
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import WebSocket
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Rule

try:
    from orjson import loads as json_loads  # 3x faster than the stdlib on Twilio's messages
except ImportError:
    from json import loads as json_loads

log = logging.getLogger("mediastreams")
BATCH_ABOVE_STREAMS = 50  # below this, each message is read as it lands (no added latency)


# --- Configuration ------------------------------------------------------------------------

def read_settings(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags, each defaulting to an environment variable."""
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Receive Twilio Media Streams on /media.")
    parser.add_argument("--host", default=env("HOST", "0.0.0.0"), help="interface to listen on (HOST)")
    parser.add_argument("--port", type=int, default=int(env("PORT", "5000")), help="port, 0 for any free one (PORT)")
    parser.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"), type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="console detail (LOG_LEVEL)")
    parser.add_argument("--record", metavar="DIR", default=env("RECORD_DIR"),
                        help="write DIR/<streamSid>_<track>.wav for every stream (RECORD_DIR)")
    parser.add_argument("--quiet-levels", action="store_true",
                        default=env("QUIET_LEVELS", "").lower() in ("1", "true", "yes", "on"),
                        help="no live level meter lines (QUIET_LEVELS=1)")
    parser.add_argument("--public-url", default=env("PUBLIC_URL"),
                        help="public base URL Twilio connects to, e.g. https://abc.ngrok.app, "
                             "for the signature check (PUBLIC_URL; default: the request's Host)")
    parser.add_argument("--max-message-bytes", type=int, default=int(env("MAX_MESSAGE_BYTES", str(64 * 1024))),
                        help="largest WebSocket message accepted (MAX_MESSAGE_BYTES)")
    parser.add_argument("--max-streams", type=int, default=int(env("MAX_STREAMS", "1000")),
                        help="open streams beyond which new ones get 503 (MAX_STREAMS)")
    parser.add_argument("--idle-timeout", type=float, default=float(env("IDLE_TIMEOUT", "30")),
                        help="seconds of silence from a client before it is dropped (IDLE_TIMEOUT)")
    parser.add_argument("--read-interval-ms", type=float, default=float(env("READ_INTERVAL_MS", "100")),
                        help=f"once over {BATCH_ABOVE_STREAMS} streams are open, read each at most every "
                             "N ms and handle what gathered in one go: about half the CPU per message, "
                             "audio up to N ms later (READ_INTERVAL_MS; 0: always read as messages land)")
    settings = parser.parse_args(argv)
    settings.auth_token = env("TWILIO_AUTH_TOKEN") or None
    return settings


def setup_logging(level: str) -> None:
    """One console handler on our logger, whoever imports us (python app.py or gunicorn)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)


def check_record_dir(path: str | None) -> None:
    """Fail at start-up, not on the first call, when recordings cannot be written."""
    if not path:
        return
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path) as probe:
            probe.write(b"probe")
    except OSError as exc:
        sys.exit(f"error: cannot write recordings to {path!r}: {exc.strerror or exc}. "
                 "Pick another --record DIR (RECORD_DIR) or fix its permissions.")


settings = read_settings([])  # the environment alone when imported (gunicorn app:app)
setup_logging(settings.log_level)
check_record_dir(settings.record)


# --- The Flask app, as in the tutorial ----------------------------------------------------

# Library adapter (flask-sockets); the gevent-websocket ones are further down.
class Sockets(flask_sockets.Sockets):
    """flask-sockets 0.2.1 with its two edges on today's Werkzeug filed off."""

    def init_app(self, app):
        app.wsgi_app = SocketMiddleware(app.wsgi_app, app, self)

    def add_url_rule(self, rule, _, f, **options):
        # flask-sockets 0.2.1 adds a plain Rule; Werkzeug >= 2 then raises WebsocketMismatch
        # for every WebSocket request, after the 101 has gone out (upstream PR #82).
        self.url_map.add(Rule(rule, endpoint=f, websocket=True))


class SocketMiddleware(flask_sockets.SocketMiddleware):
    def __call__(self, environ, start_response):
        # A plain HTTP request to a WebSocket rule makes Werkzeug raise WebsocketMismatch (a
        # 500 through flask-sockets); send it to Flask's own routes instead.
        if environ.get("wsgi.websocket") is None:
            return self.wsgi_app(environ, start_response)
        try:
            # websocket=True: gevent-websocket upgrades on any Connection header holding
            # "upgrade", Werkzeug only on an exact token, and the 101 has gone out already.
            handler, values = self.ws.url_map.bind_to_environ(environ).match(websocket=True)
        except HTTPException:
            return self.wsgi_app(environ, start_response)
        # flask-sockets' own __call__, without its `except KeyError` (which hands a handler's
        # KeyError on to Flask) and without keeping the WebsocketMismatch that Flask's HTTP
        # routes raise for this request: its traceback made a reference cycle per call,
        # garbage that RSS carried until the next full collection.
        with self.app.app_context(), self.app.request_context(environ) as context:
            context.request.routing_exception = None
            handler(environ["wsgi.websocket"], **values)
        return []


app = Flask(__name__)
sockets = Sockets(app)


@app.route("/")
def index():
    return (f"Twilio Media Streams server is up. WebSocket: wss://{request.host}/media\n",
            200, {"Content-Type": "text/plain"})


@app.route("/media")
def media_without_upgrade():
    return (f"/media is a WebSocket endpoint: use <Stream url=\"wss://{request.host}/media\"/> "
            "in TwiML, not a browser.\n", 426, {"Content-Type": "text/plain", "Upgrade": "websocket"})


# --- Per-call state -----------------------------------------------------------------------

class BadMessage(Exception):
    """A message we skip: `kind` is counted in the summary, `detail` goes into the warning."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


TRACK_NAMES = ("inbound", "outbound")
GAP_MS = 10            # a timestamp further ahead than this (half a 20 ms frame) is lost audio
MAX_WARNINGS = 100     # per stream; the rest are still counted
MAX_UNKNOWN_EVENTS = 20


@dataclass
class Track:
    name: str
    messages: int = 0
    bytes: int = 0
    gaps: int = 0
    end_ms: int | None = None       # where the audio received so far ends on the stream's clock
    chunk: int | None = None
    energy: int = 0                 # level meter: sum of squares since the last line
    energy_samples: int = 0
    next_level_at: float = 0.0
    recording: "WavTrack | None | bool" = None  # False once writing failed


@dataclass(eq=False)
class MediaStream:
    """One WebSocket connection from Twilio: what we know of the call, one method per event."""

    remote: str
    stream_sid: str | None = None
    call_sid: str | None = None
    started_at: float = field(default_factory=time.monotonic)
    tracks: dict = field(default_factory=lambda: {name: Track(name) for name in TRACK_NAMES})
    origin_ms: int | None = None    # timestamp of the first media: sample 0 of the recordings
    last_sequence: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    bad: dict = field(default_factory=dict)
    warnings: int = 0
    unknown_events: set = field(default_factory=set)
    connected: bool = False
    ended: str = "disconnect"
    wants_pcm: bool = False         # decode only for a recording or an on_audio of your own

    @property
    def label(self) -> str:
        return f"stream={self.stream_sid}" if self.stream_sid else f"remote={self.remote}"

    def warn(self, message: str) -> None:
        self.warnings += 1
        if self.warnings <= MAX_WARNINGS:
            log.warning("%s %s", self.label, message)
        elif self.warnings == MAX_WARNINGS + 1:
            log.warning("%s more than %d warnings: the rest are only counted in the summary",
                        self.label, MAX_WARNINGS)

    def skip(self, bad: BadMessage) -> None:
        self.bad[bad.kind] = self.bad.get(bad.kind, 0) + 1
        self.warn(f"skipped message: {bad}")

    def parse(self, message) -> dict:
        """The JSON object of one frame, with a string `event`; BadMessage otherwise."""
        if not isinstance(message, str):
            raise BadMessage("binary", f"binary frame of {len(message)} bytes (Twilio sends JSON text)")
        if not message:
            raise BadMessage("empty", "empty text frame")
        try:
            data = json_loads(message)
        except (ValueError, RecursionError) as exc:
            raise BadMessage("invalid_json", f"invalid JSON ({str(exc)[:80]})") from None
        if not isinstance(data, dict):
            raise BadMessage("not_object", f"JSON {type(data).__name__}, not an object")
        if not isinstance(data.get("event"), str):
            raise BadMessage("no_event", "no string 'event' field")
        return data

    def check_sequence(self, data: dict) -> bool:
        """False for a message seen already; counts what arrives out of order."""
        sequence = number(data, "sequenceNumber")
        if sequence is None:
            return True
        if sequence == self.last_sequence:
            self.duplicates += 1
            self.warn(f"duplicate sequenceNumber={sequence}: dropped")
            return False
        if sequence < self.last_sequence:
            self.out_of_order += 1
            self.warn(f"sequenceNumber={sequence} after {self.last_sequence}: out of order")
        else:
            self.last_sequence = sequence
        return True

    def on_connected(self, data: dict) -> None:
        if self.connected:
            raise BadMessage("second_connected", "second 'connected' on this stream: ignored")
        self.connected = True
        log.info("%s connected protocol=%s version=%s", self.label,
                 text(data, "protocol", "?"), text(data, "version", "?"))

    def on_start(self, data: dict) -> None:
        if self.stream_sid:
            raise BadMessage("second_start", "second 'start' on this stream: ignored")
        start = data.get("start")
        if not isinstance(start, dict):
            raise BadMessage("bad_start", "'start' field is not an object")
        stream_sid = text(start, "streamSid") or text(data, "streamSid")
        if not stream_sid:
            raise BadMessage("bad_start", "start without a streamSid")
        tracks = start.get("tracks", ["inbound"])
        params = start.get("customParameters") or {}
        media_format = start.get("mediaFormat") or {}
        if not (isinstance(tracks, list) and isinstance(params, dict) and isinstance(media_format, dict)):
            raise BadMessage("bad_start", "start.tracks, customParameters or mediaFormat has the wrong type")
        self.check_sequence(data)
        self.stream_sid = stream_sid
        self.wants_pcm = bool(settings.record) or type(self).on_audio is not DEFAULT_ON_AUDIO
        self.call_sid = text(start, "callSid", "?")
        encoding = media_format.get("encoding")
        rate, channels = media_format.get("sampleRate"), media_format.get("channels")
        format_name = printable(f"{encoding}/{rate}/{channels}", 80)
        log.info("%s start call=%s tracks=%s format=%s params=%s", self.label, self.call_sid,
                 printable(",".join(map(str, tracks)), 100), format_name,
                 printable(",".join(map(str, params)), 300) or "-")
        log.debug("%s customParameters=%r", self.label, params)
        if (encoding, rate, channels) != ("audio/x-mulaw", 8000, 1):
            self.warn(f"unexpected media format {format_name}: this server expects audio/x-mulaw 8000 Hz mono")

    def on_media(self, data: dict) -> None:
        media = data.get("media")
        if not isinstance(media, dict):
            raise BadMessage("bad_media", "'media' field is not an object")
        track = self.tracks.get(media.get("track"))
        if track is None:
            raise BadMessage("bad_media", f"media.track is not one of {TRACK_NAMES}")
        payload = media.get("payload")
        if not isinstance(payload, str) or not payload:
            raise BadMessage("bad_payload", "media.payload missing or empty")
        try:
            audio = binascii.a2b_base64(payload, strict_mode=True)
        except (binascii.Error, ValueError):
            raise BadMessage("bad_payload", "media.payload is not valid base64") from None
        timestamp = number(media, "timestamp")
        chunk = number(media, "chunk")
        if self.stream_sid is None:
            raise BadMessage("media_before_start", "media before 'start': dropped")
        if not self.check_sequence(data):
            return
        if track.messages == 0:
            log.info("%s first media track=%s: %d bytes of audio per message (%d ms)",
                     self.label, track.name, len(audio), len(audio) // 8)
        if timestamp is None:
            timestamp = track.end_ms if track.end_ms is not None else 0
        if self.origin_ms is None:
            self.origin_ms = timestamp
        if track.end_ms is not None and timestamp > track.end_ms + GAP_MS:
            track.gaps += 1
            self.warn(f"gap track={track.name}: {timestamp - track.end_ms} ms of audio missing "
                      f"before timestamp={timestamp} chunk={chunk}")
        track.messages += 1
        track.bytes += len(audio)
        track.chunk = chunk
        if track.end_ms is None or timestamp + len(audio) // 8 > track.end_ms:
            track.end_ms = timestamp + len(audio) // 8
        if not settings.quiet_levels:
            self.meter(track, audio)
        if self.wants_pcm:
            pcm = ulaw_to_pcm16(audio)
            if settings.record and track.recording is not False:
                self.record(track, timestamp, pcm)
            self.on_audio(track.name, timestamp, pcm)

    def on_audio(self, track: str, timestamp: int, pcm: bytes) -> None:
        """The place to plug in real-time processing (transcription, analysis): every chunk
        of every track, in order, as 16-bit little-endian PCM, 8000 Hz, mono; `timestamp` in
        ms on the stream's clock. It runs inside the receive loop, so hand anything slow to
        a bounded queue and a greenlet (README, "Process the audio")."""

    def meter(self, track: Track, ulaw: bytes) -> None:
        # Every 8th sample, from another first one each message: an eighth of the cost, and a
        # tone whose period divides 8 samples (1 kHz) is not read at one point of its wave.
        offset = track.messages & 7
        track.energy += sum(map(ULAW_SQUARES.__getitem__, ulaw[offset::8]))
        track.energy_samples += (len(ulaw) - offset + 7) // 8
        now = time.monotonic()
        if now >= track.next_level_at:
            if track.next_level_at and track.energy_samples:
                log.info("%s level track=%s %s", self.label, track.name,
                         level_meter(track.energy / track.energy_samples))
            track.energy = track.energy_samples = 0
            track.next_level_at = now + 1.0

    def record(self, track: Track, timestamp: int, pcm: bytes) -> None:
        try:
            if track.recording is None:
                track.recording = WavTrack.create(settings.record, f"{safe_name(self.stream_sid)}_{track.name}")
            lead_ms = (time.monotonic() - self.started_at) * 1000 + MAX_SILENCE_LEAD_MS
            track.recording.write(pcm, at_sample=int(min(timestamp - self.origin_ms, lead_ms) * 8))
        except OSError as exc:  # disk full, file size limit: the stream goes on unrecorded
            self.warn(f"recording stopped track={track.name}: {exc}")
            self.stop_recording(track)
            track.recording = False

    def stop_recording(self, track: Track) -> None:
        if track.recording:
            try:
                track.recording.close()
            except OSError as exc:
                log.warning("%s closing recording %s: %s", self.label, track.recording.path, exc)

    def on_dtmf(self, data: dict) -> None:
        dtmf = data.get("dtmf")
        if not isinstance(dtmf, dict) or not isinstance(dtmf.get("digit"), (str, int)):
            raise BadMessage("bad_dtmf", "dtmf.digit missing")
        if self.check_sequence(data):
            log.info("%s dtmf digit=%s", self.label, printable(str(dtmf["digit"]), 8))

    def on_mark(self, data: dict) -> None:
        mark = data.get("mark")
        if not isinstance(mark, dict) or not isinstance(mark.get("name"), str):
            raise BadMessage("bad_mark", "mark.name missing")
        if self.check_sequence(data):
            log.info("%s mark name=%r", self.label, mark["name"][:100])

    def on_stop(self, data: dict) -> None:
        self.ended = "stop"
        log.info("%s stop", self.label)

    def on_unknown(self, event: str) -> None:
        self.bad["unknown_event"] = self.bad.get("unknown_event", 0) + 1
        if event not in self.unknown_events and len(self.unknown_events) < MAX_UNKNOWN_EVENTS:
            self.unknown_events.add(event)
            log.info("%s unknown event %r: ignored", self.label, event[:40])

    def finish(self) -> None:
        """Close the recordings and log the summary line."""
        for track in self.tracks.values():
            self.stop_recording(track)
        log.info("%s", self.summary())

    def summary(self) -> str:
        tracks = [t for t in self.tracks.values() if t.messages]
        audio_bytes = sum(t.bytes for t in tracks)
        parts = [f"summary stream={self.stream_sid or '-'} call={self.call_sid or '-'}",
                 f"ended={self.ended} duration={time.monotonic() - self.started_at:.2f}s",
                 f"media={sum(t.messages for t in tracks)}"]
        parts += [f"{t.name}={t.messages}/{t.bytes / 8000:.2f}s" for t in tracks]
        parts += [f"audio={audio_bytes / 8000:.2f}s bytes={audio_bytes}",
                  f"gaps={sum(t.gaps for t in tracks)} duplicates={self.duplicates}",
                  f"out_of_order={self.out_of_order} bad={sum(self.bad.values())}"]
        parts += [f"bad_{kind}={count}" for kind, count in sorted(self.bad.items())]
        recordings = [t.recording for t in tracks if t.recording]
        if recordings:
            parts.append("recordings=" + ",".join(f"{r.path}:{r.seconds:.2f}s" for r in recordings))
        return " ".join(parts)


DEFAULT_ON_AUDIO = MediaStream.on_audio


def number(obj: dict, name: str) -> int | None:
    """Twilio's numbers come as strings ("42"); accept real numbers too."""
    value = obj.get(name)
    if value is None:
        return None
    try:
        result = int(value)
    except (TypeError, ValueError, OverflowError):
        raise BadMessage(f"bad_{name}", f"{name} is not a whole number") from None
    if abs(result) > 2**53:  # far beyond any call; a 4000-digit number would only cost us
        raise BadMessage(f"bad_{name}", f"{name} is out of range")
    return result


def text(obj: dict, name: str, default: str | None = None) -> str | None:
    value = obj.get(name)
    return printable(value, 64) if isinstance(value, str) else default


def printable(value: str, limit: int) -> str:
    """At most `limit` characters, none that could break a log line or forge another."""
    return "".join(c if c.isprintable() else "?" for c in value[:limit])


def safe_name(stream_sid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", stream_sid)[:64]


# --- The /media route: the tutorial's loop ------------------------------------------------

@sockets.route("/media")
def media(ws):
    stream = MediaStream(remote=request.remote_addr or "?")
    log.info("Connection accepted %s", stream.label)
    try:
        while not ws.closed:
            message = ws.receive()
            if message is None:
                stream.ended, why = ws.end_reason or ("disconnect", None)
                if why:
                    stream.warn(why)
                break
            try:
                data = stream.parse(message)
                event = data["event"]
                if event == "media":
                    stream.on_media(data)
                elif event == "connected":
                    stream.on_connected(data)
                elif event == "start":
                    stream.on_start(data)
                elif event == "dtmf":
                    stream.on_dtmf(data)
                elif event == "mark":
                    stream.on_mark(data)
                elif event == "stop":
                    stream.on_stop(data)
                    break
                else:
                    stream.on_unknown(event)
            except BadMessage as bad:
                stream.skip(bad)
    except IdleTimeout as idle:
        stream.ended = "idle"
        stream.warn(str(idle))
    except gevent.GreenletExit:
        stream.ended = "shutdown"
    except Exception as exc:  # a bug in one stream's handling ends that stream, not the server
        stream.ended = "error"
        log.warning("%s handler error: %s: %s (traceback at --log-level debug)", stream.label,
                    type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
    finally:
        stream.finish()
        ws.close(1001 if stream.ended == "shutdown" else 1000)  # 1001: going away


# --- Audio helpers ------------------------------------------------------------------------

def ulaw_to_linear(byte: int) -> int:
    """G.711 mu-law byte to a 16-bit linear sample."""
    byte = ~byte & 0xFF
    magnitude = ((((byte & 0x0F) << 3) + 0x84) << ((byte >> 4) & 0x07)) - 0x84
    return -magnitude if byte & 0x80 else magnitude


ULAW_TO_LINEAR = [ulaw_to_linear(byte) for byte in range(256)]
ULAW_SQUARES = [sample * sample for sample in ULAW_TO_LINEAR]
_PCM_LOW = bytes(sample & 0xFF for sample in ULAW_TO_LINEAR)
_PCM_HIGH = bytes((sample >> 8) & 0xFF for sample in ULAW_TO_LINEAR)
MAX_SILENCE_LEAD_MS = 60_000   # timestamps may not run further ahead of the wall clock


def ulaw_to_pcm16(ulaw: bytes) -> bytes:
    """mu-law bytes to 16-bit little-endian PCM, by table (audioop is gone in Python 3.13)."""
    pcm = bytearray(2 * len(ulaw))
    pcm[0::2] = ulaw.translate(_PCM_LOW)
    pcm[1::2] = ulaw.translate(_PCM_HIGH)
    return bytes(pcm)


def level_meter(mean_square: float, width: int = 20) -> str:
    """RMS in dBFS and a bar that fills from -60 dBFS to 0."""
    dbfs = 10 * math.log10(mean_square / 32768**2) if mean_square else -99.0
    filled = max(0, min(width, round((dbfs + 60) / 60 * width)))
    return f"rms={dbfs:6.1f}dBFS |{'#' * filled}{' ' * (width - filled)}|"


class WavTrack:
    """One track's recording, written as audio arrives, silence where audio went missing."""

    SILENCE_SLACK = 80  # samples (10 ms): timestamp jitter smaller than this is not a gap

    def __init__(self, path: str, file):
        self.path = path
        self.samples = 0
        self.wav = wave.open(file, "wb")
        self.wav.setnchannels(1)
        self.wav.setsampwidth(2)
        self.wav.setframerate(8000)
        self.flushed_at = time.monotonic()

    @classmethod
    def create(cls, directory: str, name: str) -> "WavTrack":
        for n in range(1, 1000):
            path = os.path.join(directory, f"{name}.wav" if n == 1 else f"{name}-{n}.wav")
            try:
                return cls(path, open(path, "xb"))
            except FileExistsError:
                continue
        raise FileExistsError(f"too many recordings named {name}")

    def write(self, pcm: bytes, at_sample: int) -> None:
        missing = at_sample - self.samples
        if missing > self.SILENCE_SLACK:
            self.wav.writeframesraw(bytes(2 * missing))
            self.samples += missing
        self.wav.writeframesraw(pcm)
        self.samples += len(pcm) // 2
        if time.monotonic() - self.flushed_at >= 1.0:  # header sizes right within a second
            self.wav.writeframes(b"")
            self.flushed_at = time.monotonic()

    @property
    def seconds(self) -> float:
        return self.samples / 8000

    def close(self) -> None:
        file = self.wav._file
        try:
            self.wav.close()
        finally:
            file.close()


# --- Library adapters: gevent-websocket ---------------------------------------------------

def twilio_signature(auth_token: str, url: str) -> str:
    """X-Twilio-Signature of a WebSocket handshake: HMAC-SHA1 of the URL alone, base64."""
    digest = hmac.new(auth_token.encode(), url.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def signature_is_valid(auth_token: str, host: str, path: str, signature: str) -> bool:
    """Checks wss://host/path as given, without its port and with the default one, as
    Twilio's own validator accepts either; every candidate is compared in constant time."""
    name, colon, port = host.rpartition(":")
    hostname = name if colon and port.isdigit() else host
    candidates = {f"wss://{host}{path}", f"wss://{hostname}{path}", f"wss://{hostname}:443{path}"}
    given = signature.encode("latin-1", "replace")
    valid = False
    for url in candidates:
        valid |= hmac.compare_digest(twilio_signature(auth_token, url).encode(), given)
    return valid


def public_host(public_url: str | None) -> str | None:
    """The host[:port] of --public-url, which may be given with or without a scheme."""
    if not public_url:
        return None
    return urlsplit(public_url if "//" in public_url else "//" + public_url).netloc


class MessageTooLarge(FrameTooLargeException):
    pass


def unmask(payload: bytes, mask: bytes) -> bytes:
    """RFC 6455 5.3 unmasking with one big-integer XOR instead of gevent-websocket's byte loop."""
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class MediaWebSocket(WebSocket):
    """gevent-websocket's WebSocket, read faster and safer: frames are parsed from our own
    buffer filled by one recv() per network read (instead of three buffered reads per
    frame), the size limit is checked from the frame header before any payload is read,
    unmasking is one big-integer XOR instead of a per-byte loop, UTF-8 is checked once by
    decoding (instead of twice in pure Python), and every end has a reason (`end_reason`)."""

    __slots__ = ("end_reason", "buffer", "last_received", "greenlet", "fill")

    def __init__(self, environ, stream, handler):
        super().__init__(environ, stream, handler)
        self.end_reason = None
        self.buffer = bytearray()
        self.last_received = time.monotonic()
        self.greenlet = gevent.getcurrent()
        self.fill = self.first_fill

    def first_fill(self, size: int) -> bytes:
        # What the HTTP parser buffered past the request, to its end; then straight from the socket.
        data = self.handler.rfile.read1(size)
        if len(data) < size:
            self.fill = self.handler.socket.recv
        return data

    def receive(self):
        if self.closed:
            raise WebSocketError("Connection is already closed")
        code = 1000
        try:
            return self.read_message()
        except MessageTooLarge as exc:
            self.end_reason, code = ("error", str(exc)), 1009
        except UnicodeError:
            self.end_reason, code = ("error", "invalid UTF-8 in a text message"), 1007
        except ProtocolError as exc:
            self.end_reason, code = ("error", f"WebSocket protocol error: {exc or type(exc).__name__}"), 1002
        except OSError:
            pass  # the peer went away: ended=disconnect
        self.close(code)
        return None

    def close(self, code: int = 1000, message: bytes = b"") -> None:
        # gevent-websocket 0.10.1 sends the reason where the status code belongs (peers read
        # b"bye" as code 25193) and no code at all without a reason.
        if self.closed:
            return
        try:
            reason = message if isinstance(message, (bytes, bytearray)) else str(message or "").encode()
            self.send_frame(struct.pack("!H", code) + reason[:123], self.OPCODE_CLOSE)
        except WebSocketError:
            pass  # the peer is gone: nothing to tell it
        finally:
            self.closed = True
            self.stream = self.raw_write = self.raw_read = self.environ = None

    def read_message(self):
        opcode = None
        message = bytearray()
        while True:
            fin, f_opcode, payload = self.read_frame()
            if f_opcode in (self.OPCODE_TEXT, self.OPCODE_BINARY):
                if opcode:
                    raise ProtocolError(f"new message (opcode {f_opcode}) inside a fragmented one")
                if fin:  # the usual case: a whole message in one frame
                    return payload.decode("utf-8") if f_opcode == self.OPCODE_TEXT else bytearray(payload)
                opcode = f_opcode
            elif f_opcode == self.OPCODE_CONTINUATION:
                if not opcode:
                    raise ProtocolError("continuation frame without a message")
            elif f_opcode == self.OPCODE_PING:
                self.handle_ping(None, payload)
                continue
            elif f_opcode == self.OPCODE_PONG:
                continue
            elif f_opcode == self.OPCODE_CLOSE:
                self.handle_close(None, payload)
                return None
            else:
                raise ProtocolError(f"unexpected opcode {f_opcode}")
            message += payload
            if len(message) > settings.max_message_bytes:
                raise MessageTooLarge(f"message over the {settings.max_message_bytes}-byte limit")
            if fin:
                return message.decode("utf-8") if opcode == self.OPCODE_TEXT else message

    def read_frame(self) -> tuple[int, int, bytes]:
        """(fin, opcode, unmasked payload) of the next frame (RFC 6455 section 5.2)."""
        buffer = self.buffer
        while True:
            if len(buffer) >= 2:
                first, second = buffer[0], buffer[1]
                opcode, length, start = first & 0x0F, second & 0x7F, 2
                if opcode > 0x07 and (not first & 0x80 or length > 125):
                    raise ProtocolError("control frame fragmented or over 125 bytes")
                if length > 125:
                    start = 4 if length == 126 else 10
                if len(buffer) >= start:
                    if start > 2:
                        length = int.from_bytes(buffer[2:start], "big")
                    if length > settings.max_message_bytes:
                        raise MessageTooLarge(f"frame of {length} bytes over the "
                                              f"{settings.max_message_bytes}-byte limit")
                    if first & 0x70:
                        raise ProtocolError("reserved bits set without an extension")
                    if second & 0x80:
                        end = start + 4 + length
                        if len(buffer) >= end:
                            payload = unmask(buffer[start + 4:end], buffer[start:start + 4])
                            del buffer[:end]
                            return first & 0x80, opcode, payload
                    elif len(buffer) >= start + length:
                        payload = bytes(buffer[start:start + length])
                        del buffer[:start + length]
                        return first & 0x80, opcode, payload
            if not buffer and settings.read_interval_ms and len(open_websockets) > BATCH_ABOVE_STREAMS:
                gevent.sleep(settings.read_interval_ms / 1000)  # under load: one wake-up for several messages
            data = self.fill(RECV_BYTES)
            if not data:
                raise WebSocketError("Unexpected EOF")
            self.last_received = time.monotonic()
            buffer += data


RECV_BYTES = 4096  # ten Twilio messages; 64 KiB reads fragmented the heap: RSS grew by the round


# handler.upgrade_connection() builds each connection's socket from this module-level name.
geventwebsocket.handler.WebSocket = MediaWebSocket


open_websockets: set[MediaWebSocket] = set()
idle_sweeper = None
shutting_down = False
STREAM_END_SECONDS = 3  # what open streams get at shutdown to end and log their summaries


class IdleTimeout(Exception):
    """Thrown into a stream's greenlet when its client has sent nothing for --idle-timeout."""


def sweep_idle_websockets() -> None:
    # One greenlet for all streams: a timeout on every socket read would cost a timer per message.
    while True:
        gevent.sleep(min(1.0, settings.idle_timeout / 4))
        silent_since = time.monotonic() - settings.idle_timeout
        for ws in list(open_websockets):
            if ws.last_received < silent_since:
                ws.last_received = math.inf  # thrown once
                gevent.kill(ws.greenlet, IdleTimeout(f"nothing received for {settings.idle_timeout:g} s"))


class MediaStreamHandler(WebSocketHandler):
    """gevent-websocket answers 101 before Flask runs, so refusals happen here, before it."""

    def handle(self):
        self.socket.settimeout(settings.idle_timeout or None)  # drops half-sent requests
        super().handle()

    def _handle_client_error(self, ex):
        # pywsgi's hook for a bad request prints a traceback for anything but a ValueError,
        # such as the timeout of a client that never finishes its request.
        if isinstance(ex, TimeoutError):
            log.warning("dropped connection remote=%s reason=no complete HTTP request within %g s",
                        self.client_address[0], settings.idle_timeout)
            return None
        return super()._handle_client_error(ex)

    def upgrade_websocket(self):
        if self.environ.get("HTTP_UPGRADE", "").lower() != "websocket":
            return super().upgrade_websocket()
        refusal = self.refusal()
        if refusal:
            status, reason = refusal
            log.warning("refused WebSocket remote=%s path=%s status=%s reason=%s",
                        self.environ.get("REMOTE_ADDR"), self.environ.get("PATH_INFO", "")[:100],
                        status.split()[0], reason)
            self.start_response(status, [("Content-Type", "text/plain"), ("Connection", "close")])
            return [f"{status}: {reason}\n".encode()]
        result = super().upgrade_websocket()
        self.registered = getattr(self, "websocket", None)  # set only when upgraded
        if self.registered:
            global idle_sweeper
            self.socket.settimeout(None)  # idle streams are found by sweep_idle_websockets
            open_websockets.add(self.registered)
            if idle_sweeper is None and settings.idle_timeout > 0:
                idle_sweeper = gevent.spawn(sweep_idle_websockets)
        return result

    def run_application(self):
        try:
            super().run_application()
        finally:
            open_websockets.discard(self.__dict__.pop("registered", None))

    def refusal(self) -> tuple[str, str] | None:
        path = self.environ.get("PATH_INFO", "")
        if not sockets.url_map.bind("localhost", url_scheme="ws").test(path):
            return "404 Not Found", "no WebSocket route here (Twilio's <Stream> URL must end in /media)"
        if settings.auth_token:
            signature = self.environ.get("HTTP_X_TWILIO_SIGNATURE")
            if not signature:
                return "403 Forbidden", "missing X-Twilio-Signature"
            host = public_host(settings.public_url) or self.environ.get("HTTP_HOST", "")
            query = self.environ.get("QUERY_STRING")
            if not signature_is_valid(settings.auth_token, host, path + ("?" + query if query else ""), signature):
                return "403 Forbidden", f"X-Twilio-Signature does not match wss://{host}{path}"
        if shutting_down:
            return "503 Service Unavailable", "the server is shutting down"
        if len(open_websockets) >= settings.max_streams:
            return "503 Service Unavailable", f"{settings.max_streams} streams open already (--max-streams)"
        return None


try:
    from geventwebsocket.gunicorn.workers import GeventWebSocketWorker
except ImportError:  # gunicorn is optional: only `gunicorn -k app.GunicornWorker` needs it
    GeventWebSocketWorker = None
else:
    class GunicornWorker(GeventWebSocketWorker):
        """gevent-websocket's gunicorn worker with our handler (signatures, limits), ending
        open calls with a summary when gunicorn stops it."""
        wsgi_handler = MediaStreamHandler

        def init_process(self):
            log_startup_notes()
            super().init_process()

        def handle_exit(self, sig, frame):
            # SIGTERM: gunicorn lets calls go on for --graceful-timeout, then kills the worker
            # outright, and calls still open would end with no summary: end them before that.
            super().handle_exit(sig, frame)
            ending_at = self.cfg.graceful_timeout - STREAM_END_SECONDS - 1
            gevent.spawn_later(max(0.0, ending_at), end_open_streams, "SIGTERM")

        def handle_quit(self, sig, frame):
            # SIGINT, SIGQUIT (Ctrl-C on gunicorn): a quick exit, after the summaries.
            def quit_after_summaries():
                end_open_streams(signal.Signals(sig).name)
                GeventWebSocketWorker.handle_quit(self, sig, frame)

            gevent.spawn(quit_after_summaries)


# --- main ---------------------------------------------------------------------------------

def end_open_streams(why: str) -> None:
    """New streams are refused; each open one logs its summary (ended=shutdown), closed with 1001."""
    global shutting_down
    shutting_down = True
    log.info("%s: shutting down, %d open stream(s)", why, len(open_websockets))
    try:
        gevent.killall([ws.greenlet for ws in open_websockets], block=True, timeout=STREAM_END_SECONDS)
    except gevent.Timeout:  # a slow finish() of your own: stop anyway
        log.warning("%d stream(s) still ending after %d s: stopping without waiting for them",
                    len(open_websockets), STREAM_END_SECONDS)


def log_startup_notes() -> None:
    if not settings.auth_token:
        log.warning("TWILIO_AUTH_TOKEN is not set: anyone who knows this URL can stream to it. "
                    "Set it to your Auth Token to accept only handshakes signed by Twilio.")
    if settings.record:
        log.info("Recording every stream to %s", os.path.abspath(settings.record))


def main(argv: list[str] | None = None) -> None:
    global settings
    settings = read_settings(argv)
    setup_logging(settings.log_level)
    check_record_dir(settings.record)
    server = pywsgi.WSGIServer((settings.host, settings.port), app, handler_class=MediaStreamHandler,
                               log=None, error_log=log)
    server.start()
    port = server.server_port
    log.info("Listening on http://localhost:%d (all interfaces: %s), WebSocket at ws://localhost:%d/media",
             port, settings.host, port)
    log_startup_notes()

    def shutdown(signum: int) -> None:
        server.stop_accepting()  # not close(): serve_forever() would return before the summaries
        end_open_streams(signal.Signals(signum).name)
        server.stop(timeout=1)

    gevent.signal_handler(signal.SIGTERM, shutdown, signal.SIGTERM)
    gevent.signal_handler(signal.SIGINT, shutdown, signal.SIGINT)
    server.serve_forever()
    log.info("Stopped")


if __name__ == "__main__":
    main()
