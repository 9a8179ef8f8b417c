"""Pretend to be Twilio: build Media Streams messages and play a call into a server.

    python -m tests.twilio_sim ws://localhost:5000/media --seconds 5
    python -m tests.twilio_sim ws://localhost:5000/media --wav hello.wav --tracks both
    python -m tests.twilio_sim ws://localhost:5000/media --connect --wav hello.wav --heard out.wav
    python -m tests.twilio_sim wss://calls.example.com/media --seconds 5      # TLS, checked against the system's CAs
    python -m tests.twilio_sim wss://localhost:8443/media --cafile cert.pem  # a self-signed proxy (or --insecure)
    TWILIO_AUTH_TOKEN=... python -m tests.twilio_sim --twiml http://localhost:5000/twiml  # the whole Twilio side

With an Auth Token (TWILIO_AUTH_TOKEN, or --auth-token) it signs what it sends as Twilio
does: the handshake (X-Twilio-Signature over the wss:// URL) and, with --twiml, the voice
webhook and the stream status callbacks (over the https:// URL and the form's fields).
--twiml URL plays a whole call as Twilio would: it POSTs the webhook's fields (From, To,
CallSid, Direction...) to URL, follows the <Stream> of the TwiML it gets (<Start>: its
track; <Connect>: talking back), sends its <Parameter>s in `start`, and posts
stream-started, stream-stopped (or stream-error) to its statusCallback. Offline, an http://
URL has the stream's wss:// and https:// URLs taken as ws:// and http:// to the same host.

With --connect it is a <Connect><Stream> (bidirectional, inbound track only) and plays what
the server sends back as Twilio would: at real time, marks echoed once the audio before
them has played, `clear` honoured; each message the server sends is checked against what
Twilio accepts (section 3 of the reference).

The messages follow ../shared/reference/twilio-media-streams.md section 2 (numbers as
strings, `connected` without a streamSid, 160-byte mu-law chunks every 20 ms). The
WebSocket client is a small stdlib one, so tests can also send what a real client never
would (binary frames, broken UTF-8, oversized length headers).

Whatever goes wrong (refused, 403, 503, a certificate that does not verify, a dropped
call, a timeout), the command says it in one line on stderr and exits with 1.
"""
import argparse
import base64
import binascii
import datetime
import hashlib
import hmac
import itertools
import json
import math
import os
import re
import socket
import ssl
import struct
import sys
import threading
import time
import wave
from collections import deque
import urllib.error
import urllib.request
import xml.etree.ElementTree as ElementTree
from urllib.parse import urlencode, urlsplit

CHUNK = 160  # bytes of mu-law per message: 20 ms at 8000 Hz


# --- Twilio's messages ----------------------------------------------------------------------

class Call:
    """The messages of one stream, numbered as Twilio numbers them."""

    _ids = itertools.count(1)

    def __init__(self, tracks=("inbound",), params=None, stream_sid=None):
        n = next(self._ids)
        self.stream_sid = stream_sid or f"MZ{os.getpid():08x}{n:024x}"
        self.call_sid = f"CA{n:032x}"
        self.account_sid = "AC" + "0" * 32
        self.tracks = list(tracks)
        self.params = params if params is not None else {}
        self.sequence = 0
        self.chunks = 0

    def _envelope(self, event, **body):
        self.sequence += 1
        return json.dumps({"event": event, "sequenceNumber": str(self.sequence),
                           "streamSid": self.stream_sid, **body})

    def connected(self):
        return json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})

    def start(self):
        return self._envelope("start", start={
            "streamSid": self.stream_sid, "accountSid": self.account_sid, "callSid": self.call_sid,
            "tracks": self.tracks, "customParameters": self.params,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}})

    def media(self, track, ulaw, timestamp):
        """One media message; `timestamp` in ms since the stream began."""
        self.chunks += 1
        return self._envelope("media", media={
            "track": track, "chunk": str(self.chunks), "timestamp": str(timestamp),
            "payload": base64.b64encode(ulaw).decode()})

    def dtmf(self, digit):
        return self._envelope("dtmf", dtmf={"track": "inbound_track", "digit": digit})

    def mark(self, name):
        return self._envelope("mark", mark={"name": name})

    def stop(self):
        return self._envelope("stop", stop={"accountSid": self.account_sid, "callSid": self.call_sid})

    def session(self, media=0, track="inbound", stop=False, chunk=b"\xff" * CHUNK, audio=None):
        """connected, start, `media` media messages of one track (timestamps 20, 40, ... ms),
        or all of `audio` ({track: mu-law bytes}, see play()), then stop if asked: a whole
        call, or the opening of one."""
        media = self.play(audio) if audio else (self.media(track, chunk, 20 * (n + 1)) for n in range(media))
        messages = [self.connected(), self.start(), *media]
        return messages + [self.stop()] if stop else messages

    def play(self, audio_by_track):
        """Media messages for whole tracks ({track: mu-law bytes}), interleaved chunk by chunk
        as Twilio sends both_tracks; timestamps start at 20 ms as in Twilio's example."""
        length = max(len(audio) for audio in audio_by_track.values())
        for offset in range(0, length, CHUNK):
            for track, audio in audio_by_track.items():
                if offset < len(audio):
                    yield self.media(track, audio[offset:offset + CHUNK], 20 + offset // 8)


# --- Audio ----------------------------------------------------------------------------------

def linear_to_ulaw(sample):
    """G.711 mu-law encoding of one 16-bit sample."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), 32635) + 0x84
    exponent = magnitude.bit_length() - 8
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | exponent << 4 | mantissa) & 0xFF


ENCODE = bytes(linear_to_ulaw(s) for s in range(-32768, 32768))


def encode_ulaw(samples):
    return bytes(ENCODE[s + 32768] for s in samples)


def decode_ulaw_byte(byte):
    byte = ~byte & 0xFF
    magnitude = ((((byte & 0x0F) << 3) + 0x84) << ((byte >> 4) & 0x07)) - 0x84
    return -magnitude if byte & 0x80 else magnitude


DECODE = [decode_ulaw_byte(byte) for byte in range(256)]


def decode_ulaw(ulaw):
    return [DECODE[byte] for byte in ulaw]


def tone(seconds, frequency=440.0, amplitude=0.3, rate=8000):
    """Samples of a sine wave that swells and fades every few seconds, so a level meter moves."""
    return [int(32767 * amplitude * (0.55 + 0.45 * math.sin(2 * math.pi * 0.3 * i / rate))
                * math.sin(2 * math.pi * frequency * i / rate))
            for i in range(int(seconds * rate))]


def read_wav(path):
    """Samples of an 8 kHz mono 16-bit WAV file."""
    with wave.open(str(path), "rb") as wav:
        if (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) != (8000, 1, 2):
            raise SystemExit(f"{path}: need 8000 Hz mono 16-bit PCM, got {wav.getframerate()} Hz, "
                             f"{wav.getnchannels()} channel(s), {8 * wav.getsampwidth()}-bit "
                             "(convert with: sox in.wav -r 8000 -c 1 -b 16 out.wav)")
        data = wav.readframes(wav.getnframes())
    return list(struct.unpack(f"<{len(data) // 2}h", data))


def write_wav(path, samples):
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(struct.pack(f"<{len(samples)}h", *samples))


# --- WebSocket frames and a small client ----------------------------------------------------

CLIENT_MASK = b"\x37\xfa\x21\x3d"


def frame(opcode, payload, fin=True, mask=CLIENT_MASK, rsv=0, length=None, length_form=None):
    """One client frame (RFC 6455 5.2). `mask=None` sends it unmasked, as no client may;
    `length` announces another size than the payload's; `length_form` (7, 16 or 64) picks
    the length encoding, which is otherwise the shortest."""
    length = len(payload) if length is None else length
    form = length_form or (7 if length < 126 else 16 if length < 65536 else 64)
    mask_bit = 0 if mask is None else 0x80
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    if form == 7:
        head += bytes([mask_bit | length])
    elif form == 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
    if mask is None:
        return head + payload
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if any(mask) else payload
    return head + mask + masked


def parse_frame(data):
    """(opcode, payload, bytes used) of the first frame in bytes a server sent (unmasked), or
    None while it is not all there."""
    if len(data) < 2:
        return None
    length, start = data[1] & 0x7F, 2
    if length == 126:
        length, start = int.from_bytes(data[2:4], "big"), 4
    elif length == 127:
        length, start = int.from_bytes(data[2:10], "big"), 10
    if len(data) < start or len(data) < start + length:
        return None
    return data[0] & 0x0F, data[start:start + length], start + length


def read_frames(data):
    """(opcode, payload) of each whole frame in bytes a server sent (unmasked)."""
    frames = []
    while (parsed := parse_frame(data)) is not None:
        opcode, payload, used = parsed
        frames.append((opcode, payload))
        data = data[used:]
    return frames


def close_code(payload):
    """The status code of a close frame's payload; 1005 (RFC 6455 7.1.5) when it has none."""
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005


class HandshakeRefused(Exception):
    """The server answered the handshake with another status than 101: `status` (403),
    `reason` (its phrase, "Forbidden"), `body` (bytes, the first 4 KiB at most) and
    `headers` ({lower-case name: value})."""

    def __init__(self, status, body, reason="", headers=None):
        self.status = status
        self.reason = reason
        self.body = body
        self.headers = headers or {}
        super().__init__(f"handshake refused: {self.describe()}")

    def describe(self):
        """'403 Forbidden: what the body says', on one line."""
        status = f"{self.status} {self.reason}".strip()
        text = self.body.decode("utf-8", "replace")
        if "html" in self.headers.get("content-type", ""):  # a proxy's error page: its text
            text = re.sub(r"<[^>]*>", " ", text)
        text = " ".join(text.split())
        while text.startswith(status):  # our server's body begins with the status line, nginx's repeats it
            text = text[len(status):].lstrip(": ")
        return f"{status}: {text[:300]}" if text else status


def tls_context(cafile=None, insecure=False):
    """TLS settings for wss://: the certificate checked against the system's CA store and
    the URL's host name; with `cafile` (a CA, or a self-signed certificate itself) checked
    against that file instead; with `insecure`, not checked at all."""
    if insecure:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=cafile)


class WSClient:
    """RFC 6455 client over a plain socket (ws://) or a TLS one (wss://), enough for tests
    and load. For wss:// the certificate is checked as tls_context() says: `ssl_context`
    if given, else one made from `cafile` and `insecure`. `timeout` bounds connecting, the
    TLS and WebSocket handshakes and every later read or write. With `unix_socket` (a path)
    it connects there instead of to the URL's host, as nginx does to gunicorn's `-b unix:`."""

    def __init__(self, url, headers=None, timeout=10.0, ssl_context=None, cafile=None, insecure=False,
                 unix_socket=None):
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"{url!r} is not a ws:// or wss:// URL")
        secure = parts.scheme == "wss"
        if unix_socket:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(timeout)
            sock.connect(unix_socket)
        else:
            sock = socket.create_connection((parts.hostname, parts.port or (443 if secure else 80)), timeout=timeout)
        try:
            if not unix_socket:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if secure:  # the server name (SNI) and the name checked: the URL's host
                sock = (ssl_context or tls_context(cafile, insecure)).wrap_socket(sock, server_hostname=parts.hostname)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.buffer = b""
        self.close_reason = None
        self.messages_sent = 0
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1",
                 f"Host: {parts.netloc}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        for name, value in (headers or {}).items():
            lines = [line for line in lines if not line.lower().startswith(name.lower() + ":")]
            lines.append(f"{name}: {value}")
        try:
            self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            head = self._read_until(b"\r\n\r\n")
        except ConnectionError as exc:
            self.sock.close()
            raise ConnectionError(f"the connection ended before the handshake was answered ({exc})") from None
        except BaseException:
            self.sock.close()
            raise
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        version, _, rest = status_line.partition(" ")
        status, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/") or not status.isdigit():
            self.sock.close()
            raise ConnectionError(f"the answer to the handshake is not HTTP: {status_line[:60]!r}")
        if int(status) != 101:
            fields = dict(line.partition(":")[::2] for line in header_lines)
            fields = {name.strip().lower(): value.strip() for name, value in fields.items()}
            length = int(fields["content-length"]) if fields.get("content-length", "").isdigit() else 4096
            body = self.buffer
            try:
                while len(body) < min(length, 4096):  # to its Content-Length: a proxy may keep the connection
                    more = self.sock.recv(4096)
                    if not more:
                        break
                    body += more
            except OSError:
                pass
            self.sock.close()
            raise HandshakeRefused(int(status), body[:min(length, 4096)], reason.strip(), fields)

    def _read_more(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed")
        self.buffer += data

    def _read_until(self, marker):
        while marker not in self.buffer:
            self._read_more()
        head, self.buffer = self.buffer.split(marker, 1)
        return head

    def send(self, message):
        """A text frame for str, a binary frame for bytes."""
        if isinstance(message, str):
            self.sock.sendall(frame(0x1, message.encode()))
        else:
            self.sock.sendall(frame(0x2, message))
        self.messages_sent += 1

    def send_all(self, messages):
        for message in messages:
            self.send(message)

    def send_raw(self, data):
        self.sock.sendall(data)

    def recv_frame(self):
        """(opcode, payload) of the next frame from the server. A timeout leaves what has come
        of a frame in the buffer: the next call goes on from there."""
        while (parsed := parse_frame(self.buffer)) is None:
            self._read_more()
        opcode, payload, used = parsed
        self.buffer = self.buffer[used:]
        return opcode, payload

    def wait_closed(self, timeout=5.0):
        """The status code of the server's close frame (1005 if it had none), or None if the
        connection ended, or `timeout` passed, without one. As RFC 6455 asks, the close frame
        is answered with ours, and the socket closed once the server has closed its side."""
        self.sock.settimeout(timeout)
        try:
            while True:
                opcode, payload = self.recv_frame()
                if opcode == 0x8:
                    break
        except OSError:  # ConnectionError (EOF, reset) or a timeout
            return None
        self.close_reason = payload[2:].decode(errors="replace")
        try:
            self.sock.sendall(frame(0x8, payload[:2]))
            while self.sock.recv(65536):
                pass
        except OSError:
            pass  # the server closed first, or took longer than `timeout`: either way we are done
        self.sock.close()
        return close_code(payload)

    def close(self):
        try:
            self.sock.sendall(frame(0x8, struct.pack("!H", 1000)))
            self.wait_closed(2.0)
        except OSError:
            pass
        self.sock.close()


# --- Twilio's side of a <Connect><Stream>: what the server sends, checked and played -------

SILENT = 0xFF  # mu-law zero
ACCEPTED_FIELDS = {"media": {"event", "streamSid", "media"}, "mark": {"event", "streamSid", "mark"},
                   "clear": {"event", "streamSid"}}


class Player:
    """Plays what a server sends on a bidirectional stream the way Twilio does (reference
    section 3): audio queued in order and played out at 8000 samples a second however fast
    it arrives, a mark echoed once the audio queued before it has played, `clear` dropping
    the unplayed audio and echoing the marks waiting at once. Every message is checked
    first; one that Twilio would refuse (31950, 31951) is a line in `violations` and is
    dropped. tick() is called every 20 ms and plays those 20 ms; `heard` is what the caller
    heard, silence included. `jitter_ms`: how long audio that arrives after silence waits
    before it plays, so audio that arrives a little late does not leave gaps."""

    def __init__(self, stream_sid, echo_mark, jitter_ms=20):
        self.stream_sid = stream_sid
        self.echo_mark = echo_mark          # sends Twilio's echo of a mark: echo_mark(name)
        self.jitter = jitter_ms / 1000
        self.queue = deque()                # [arrival time, mu-law bytes] or ("mark", name, received at)
        self.playing = False
        self.heard = bytearray()
        self.violations = []
        self.marks = []                     # (name, "played" or "cancelled", ms from its arrival to its echo)
        self.media = self.media_bytes = self.clears = 0
        self.sent_at = []                   # when each of the caller's chunks went out
        self.arrivals = []                  # when each media message from the server came in
        self.chunks_sent_at_clear = []      # how many chunks the caller had sent when each clear came
        self.last_message_at = time.monotonic()
        self.lock = threading.Lock()

    def receive(self, opcode, payload):
        """One frame from the server (the reader thread)."""
        with self.lock:
            self.last_message_at = time.monotonic()
            problem = self.check(opcode, payload)
            if problem:
                self.violations.append(problem)
                return
            message = json.loads(payload)
            if message["event"] == "media":
                self.media += 1
                self.arrivals.append(self.last_message_at)
                audio = base64.b64decode(message["media"]["payload"])
                self.media_bytes += len(audio)
                self.queue.append([time.monotonic(), audio])
            elif message["event"] == "mark":
                self.queue.append(("mark", message["mark"]["name"], time.monotonic()))
            else:
                self.clears += 1
                self.chunks_sent_at_clear.append(len(self.sent_at))
                marks = [item for item in self.queue if item[0] == "mark"]
                self.queue.clear()
                self.playing = False
                for _, name, received_at in marks:
                    self.echo(name, "cancelled", received_at)

    def check(self, opcode, payload):
        """Why Twilio would refuse this frame, or None."""
        if opcode == 0x2:
            return f"31950 binary frame of {len(payload)} bytes: Twilio accepts JSON text only"
        try:
            message = json.loads(payload)
        except ValueError:
            return f"31951 not JSON: {payload[:60]!r}"
        event = message.get("event") if isinstance(message, dict) else None
        if event not in ACCEPTED_FIELDS:
            return f"31951 event {event!r} is not one of media, mark, clear"
        fields, accepted = set(message), ACCEPTED_FIELDS[event]
        if fields != accepted:
            extra, missing = sorted(fields - accepted), sorted(accepted - fields)
            return f"31951 {event}: " + ", ".join([f"extra field {name!r}" for name in extra] +
                                                  [f"missing field {name!r}" for name in missing])
        if message["streamSid"] != self.stream_sid:
            return f"31951 {event}: streamSid {message['streamSid']!r} is not this stream's {self.stream_sid!r}"
        body = message.get(event)
        if event == "media":
            if not isinstance(body, dict) or set(body) != {"payload"}:
                return f"31951 media: media must be exactly {{\"payload\": ...}}, got {body!r:.80}"
            try:
                if not base64.b64decode(body["payload"], validate=True):
                    return "31951 media: empty payload"
            except (binascii.Error, TypeError):
                return "31951 media: payload is not base64"
        if event == "mark" and not (isinstance(body, dict) and set(body) == {"name"}
                                    and isinstance(body["name"], str)):
            return f"31951 mark: mark must be exactly {{\"name\": \"...\"}}, got {body!r:.80}"
        return None

    def echo(self, name, how, received_at):
        self.marks.append((name, how, (time.monotonic() - received_at) * 1000))
        self.echo_mark(name)

    def tick(self):
        """Play the 20 ms that have just gone by."""
        with self.lock:
            now = time.monotonic()
            played = bytearray()
            first = self.queue[0] if self.queue else None
            if not self.playing and first is not None and first[0] != "mark":
                self.playing = first[0] <= now - 0.020 - self.jitter  # it was there when these 20 ms began
            while self.queue and (self.playing or self.queue[0][0] == "mark") and len(played) < CHUNK:
                item = self.queue[0]
                if item[0] == "mark":  # everything queued before it has played
                    self.queue.popleft()
                    self.echo(item[1], "played", item[2])
                    continue
                take = item[1][:CHUNK - len(played)]
                played += take
                item[1] = item[1][len(take):]
                if not item[1]:
                    self.queue.popleft()
            while self.queue and self.queue[0][0] == "mark" and len(played) == CHUNK:
                item = self.queue.popleft()
                self.echo(item[1], "played", item[2])
            if not self.queue:
                self.playing = False
            self.heard += played + bytes([SILENT]) * (CHUNK - len(played))

    @property
    def idle(self):
        """Nothing left to play, and nothing received for 0.3 s."""
        with self.lock:
            return not self.queue and time.monotonic() - self.last_message_at > 0.3


def start_reader(client, send_lock, on_message=None):
    """A thread that reads what the server sends until its close frame, which it answers
    under `send_lock` (ending["code"] and ending["reason"]), or until the connection ends
    without one (ending["error"]); text and binary frames go to on_message(opcode, payload).
    Returns the thread and `ending`."""
    ending = {}

    def read():
        while True:
            try:
                opcode, payload = client.recv_frame()
            except TimeoutError:  # a server with nothing to say: how long to wait is the caller's call
                continue
            except OSError as exc:  # EOF, a reset, a broken TLS record
                ending["error"] = exc
                return
            if opcode == 0x8:
                ending["code"], ending["reason"] = close_code(payload), payload[2:].decode(errors="replace")
                with send_lock:
                    try:
                        client.send_raw(frame(0x8, payload[:2]))
                    except OSError:
                        pass  # the server did not wait for our answer
                return
            if on_message and opcode in (0x1, 0x2):
                on_message(opcode, payload)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader, ending


def how_it_ended(client, reader, ending, send_error, waited):
    """None when the server closed the call as it should (1000, or a close frame without a
    code), else one line saying what happened instead."""
    sent = client.messages_sent
    if "code" in ending:
        if ending["code"] in (1000, 1005):
            return None
        reason = f" ({ending['reason']})" if ending["reason"] else ""
        return f"the server ended the call with close code {ending['code']}{reason} after {sent} messages"
    if reader.is_alive() and isinstance(send_error, TimeoutError):
        return f"the server took nothing for {waited:g} s: sending stopped after {sent} messages"
    if reader.is_alive() and send_error is None:
        return f"the server did not close the call within {waited:g} s of our stop ({sent} messages sent)"
    return f"the server dropped the call after {sent} messages"


def play_connect_call(url, samples, headers=None, dtmf="", jitter_ms=20, params=None, out=print,
                      timeout=10.0, ssl_context=None, client=None, call=None, on_started=None):
    """A <Connect><Stream> call: the caller's audio (inbound) every 20 ms, `dtmf` a digit every
    half second, and what the server sends back played as Twilio would. Returns the Player,
    the close code the server sent (None without one) and the call; `player.ending` is None
    if the server closed the call as it should, else a line saying how it ended instead.
    `timeout` bounds connecting, each send and the wait for the server's close after stop;
    `client`: a WSClient already connected, instead of one to `url`."""
    call = call or Call(tracks=["inbound"], params=params)
    client = client or WSClient(url, headers=headers, timeout=timeout, ssl_context=ssl_context)
    send_lock = threading.Lock()  # two threads send: numbered and framed one at a time
    send_errors = []

    def send(message, *args):
        with send_lock:
            try:
                client.send(message(*args))
            except OSError as exc:  # the server has closed the connection: a mark echo comes too late
                send_errors.append(exc)

    player = Player(call.stream_sid, lambda name: send(call.mark, name), jitter_ms)

    def receive(opcode, payload):
        if opcode == 0x1:
            try:
                payload = payload.decode()
            except UnicodeDecodeError:
                player.violations.append("31924 a text frame that is not UTF-8: Twilio ends the stream")
                return
        player.receive(opcode, payload)

    reader, ending = start_reader(client, send_lock, receive)
    send(call.connected)
    send(call.start)
    if on_started:
        on_started()
    audio = encode_ulaw(samples)
    chunks = [audio[offset:offset + CHUNK] for offset in range(0, len(audio), CHUNK)]
    digits = {25 * (n + 1): digit for n, digit in enumerate(dtmf)}  # a digit every 0.5 s
    next_at, tick = time.monotonic(), 0
    while tick < len(chunks) or tick <= max(digits, default=0) or not player.idle:
        if not reader.is_alive() or send_errors:
            break  # the server closed the stream, or stopped taking it
        if tick < len(chunks):
            player.sent_at.append(time.monotonic())  # before: the reader may see the answer before send() returns
            send(call.media, "inbound", chunks[tick], 20 * (tick + 1))
        if tick in digits:
            send(call.dtmf, digits[tick])
        next_at += 0.020
        time.sleep(max(0.0, next_at - time.monotonic()))
        player.tick()
        tick += 1
    if reader.is_alive() and not send_errors:
        send(call.stop)
    reader.join(timeout if not send_errors else min(timeout, 2.0))  # after a failed send: its close or its end
    player.ending = how_it_ended(client, reader, ending, send_errors[0] if send_errors else None, timeout)
    client.sock.close()
    for problem in player.violations:
        out(f"warning {problem}")
    for name, how, after_ms in player.marks:
        out(f"mark name={name} {how} after={after_ms:.0f}ms")
    return player, ending.get("code"), call


def play_call(client, call, audio_by_track, timeout=10.0, on_started=None):
    """A <Start><Stream> call on `client`: connected, start, the media of every track paced
    as a live call sends it (one message per track every 20 ms), stop. What the server sends
    meanwhile is read and left aside; a close or a drop stops the call early. Returns the
    media messages sent, the close code (None without one) and None, or a line saying how
    the call ended if not as it should."""
    send_lock = threading.Lock()
    reader, ending = start_reader(client, send_lock)
    send_error, sent = None, 0
    next_at = time.monotonic()
    try:
        with send_lock:
            client.send(call.connected())
            client.send(call.start())
        if on_started:
            on_started()
        for message in call.play(audio_by_track):
            if not reader.is_alive():
                break  # the server closed the stream
            with send_lock:
                client.send(message)
            sent += 1
            if sent % len(audio_by_track) == 0:
                next_at += 0.020
                time.sleep(max(0.0, next_at - time.monotonic()))
        else:
            with send_lock:
                client.send(call.stop())
    except OSError as exc:  # the server is gone, or took nothing for `timeout`
        send_error = exc
    reader.join(timeout if send_error is None else min(timeout, 2.0))
    ending_line = how_it_ended(client, reader, ending, send_error, timeout)
    client.sock.close()
    return sent, ending.get("code"), ending_line


# --- Signed as Twilio signs ------------------------------------------------------------------

def signature(auth_token, url, fields=None):
    """X-Twilio-Signature: HMAC-SHA1, base64, of a stream's wss:// URL alone, or of a
    webhook's URL then each of its fields' name and value, by name."""
    signed = url + "".join(name + fields[name] for name in sorted(fields or {}))
    return base64.b64encode(hmac.new(auth_token.encode(), signed.encode(), hashlib.sha1).digest()).decode()


def as_signed(url):
    """The URL Twilio signs for a stream: wss:// (ws:// here is a TLS proxy's far side)."""
    parts = urlsplit(url)
    return parts._replace(scheme="wss").geturl()


def post_form(url, fields, auth_token, timeout):
    """POST a webhook's form as Twilio does: (status, body)."""
    headers = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "TwilioProxy/1.1 (twilio_sim)"}
    parts = urlsplit(url)
    if auth_token:  # Twilio signs the public https:// URL; http:// here is the far side of a TLS proxy
        headers["X-Twilio-Signature"] = signature(auth_token, parts._replace(scheme="https").geturl(), fields)
    request = urllib.request.Request(url, data=urlencode(fields).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode("utf-8", "replace")
    except (OSError, ValueError) as exc:
        raise CallFailed(f"cannot reach {url}: {connection_problem(exc, timeout)}") from None


# --- The command --------------------------------------------------------------------------

class CallFailed(Exception):
    """What went wrong, said in one line."""


def connection_problem(exc, timeout):
    """What an exception raised while connecting means, in a few words."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
            hint = "use a host name the certificate holds, or skip the check with --insecure"
        else:
            hint = "trust the server's certificate or its CA with --cafile FILE, or skip the check with --insecure"
        return f"certificate verify failed: {exc.verify_message} ({hint})"
    if isinstance(exc, ssl.SSLError):
        what = (exc.reason or str(exc)).lower().replace("_", " ")
        return f"TLS handshake failed: {what}" + (" (is it a wss:// server?)" if "wrong version" in what else "")
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name: {exc.strerror}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def connect(args, headers, tls):
    """A WSClient for the command's URL, or CallFailed."""
    try:
        return WSClient(args.url, headers=headers, timeout=args.timeout, ssl_context=tls)
    except HandshakeRefused as refused:
        raise CallFailed(str(refused)) from None
    except (OSError, ValueError) as exc:
        raise CallFailed(f"cannot connect to {args.url}: {connection_problem(exc, args.timeout)}") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description="Play a simulated Twilio call into a Media Streams server.",
                                     epilog="Whatever goes wrong is one line on stderr, and the exit status 1.")
    parser.add_argument("url", nargs="?", default="ws://localhost:5000/media", help="ws:// or wss:// URL")
    parser.add_argument("--seconds", type=float, help="length of the call: of the generated tone (default 5), or "
                                                       "the first SECONDS of --wav (default: all of it)")
    parser.add_argument("--wav", help="8 kHz mono 16-bit WAV file to play instead of a tone")
    parser.add_argument("--tracks", choices=["inbound", "outbound", "both"], default="inbound")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a <Parameter> for start.customParameters (repeatable)")
    parser.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                        help="an extra handshake header, e.g. X-Twilio-Signature:...")
    parser.add_argument("--connect", action="store_true",
                        help="a <Connect><Stream>: inbound audio only, and play what the server sends back")
    parser.add_argument("--heard", metavar="FILE.wav", help="with --connect: write what the caller heard")
    parser.add_argument("--dtmf", default="", metavar="DIGITS", help="with --connect: press these, one every 0.5 s")
    parser.add_argument("--jitter-ms", type=float, default=20.0,
                        help="with --connect: how long audio after silence waits before it plays (default 20)")
    parser.add_argument("--cafile", metavar="FILE",
                        help="wss://: check the server's certificate against this CA (or self-signed certificate) "
                             "instead of the system's CA store")
    parser.add_argument("--insecure", action="store_true",
                        help="wss://: do not check the server's certificate at all")
    parser.add_argument("--auth-token", default=os.environ.get("TWILIO_AUTH_TOKEN") or None, metavar="TOKEN",
                        help="sign as Twilio does with this Auth Token (default: TWILIO_AUTH_TOKEN)")
    parser.add_argument("--twiml", metavar="URL",
                        help="the whole Twilio side: POST the voice webhook to URL, follow the <Stream> of its "
                             "TwiML, post the stream status callbacks")
    parser.add_argument("--from", dest="caller", default="+15550100", help="with --twiml: the caller's From")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="for connecting, each handshake, each send, and the server's close after our stop "
                             "(default 10)")
    args = parser.parse_args(argv)
    if args.twiml:
        if urlsplit(args.twiml).scheme not in ("http", "https"):
            parser.error(f"--twiml {args.twiml}: the webhook's URL begins with http:// or https://")
        if args.connect or args.param or args.tracks != "inbound":
            parser.error("--twiml: the TwiML says whether it connects, its tracks and its parameters")
        args.url = "wss://from-the-twiml/media"
    if (args.heard or args.dtmf) and not args.connect and not args.twiml:
        parser.error("--heard and --dtmf need --connect")
    if args.connect and args.tracks != "inbound":
        parser.error("--connect streams the inbound track only, as Twilio does (error 31941 otherwise)")
    scheme = urlsplit(args.url).scheme
    if scheme not in ("ws", "wss"):
        parser.error(f"{args.url}: the URL must begin with ws:// or wss://")
    if args.cafile and args.insecure:
        parser.error("--cafile and --insecure: choose one")
    if (args.cafile or args.insecure) and scheme != "wss":
        parser.error("--cafile and --insecure are for wss:// URLs")
    tls = None
    if scheme == "wss":
        try:
            tls = tls_context(args.cafile, args.insecure)
        except (OSError, ssl.SSLError) as exc:
            parser.error(f"--cafile {args.cafile}: {exc.strerror or exc}")

    if args.seconds is not None and args.seconds <= 0:
        parser.error("--seconds must be more than 0")
    samples = read_wav(args.wav)[:int(args.seconds * 8000) if args.seconds else None] if args.wav \
        else tone(args.seconds or 5.0)
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    if args.auth_token and not args.twiml and "X-Twilio-Signature" not in headers:
        headers["X-Twilio-Signature"] = signature(args.auth_token, as_signed(args.url))
    try:
        return play_twiml(args, samples, headers) if args.twiml else play(args, samples, headers, tls)
    except CallFailed as failure:
        print(f"twilio_sim: {failure}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("twilio_sim: interrupted", file=sys.stderr)
        return 130


def seconds_sent(messages, tracks, samples):
    """'2.00 s', or '2.00 s of 5.00' for a call that ended before all of its audio was sent."""
    planned = len(samples) / 8000
    sent = min(planned, messages // tracks * CHUNK / 8000)
    return f"{planned:.2f} s" if messages >= tracks * -(-len(samples) // CHUNK) else f"{sent:.2f} s of {planned:.2f}"


def play_twiml(args, samples, headers):
    """The whole Twilio side of a call: the voice webhook, the stream its TwiML asks for,
    and that stream's status callbacks."""
    offline = urlsplit(args.twiml).scheme == "http"
    call = Call()
    webhook = {"AccountSid": call.account_sid, "CallSid": call.call_sid, "From": args.caller, "To": "+15550199",
               "Direction": "inbound", "CallStatus": "ringing", "ApiVersion": "2010-04-01"}
    status, twiml = post_form(args.twiml, webhook, args.auth_token, args.timeout)
    if status != 200:
        raise CallFailed(f"the voice webhook {args.twiml} answered {status}: {twiml.strip()[:200]}")
    try:
        response = ElementTree.fromstring(twiml)
        verb = next(child for child in response if child.tag in ("Start", "Connect") and child.find("Stream") is not None)
    except (ElementTree.ParseError, StopIteration):
        raise CallFailed(f"the TwiML from {args.twiml} has no <Start> or <Connect> <Stream>: {twiml[:200]}") from None
    stream = verb.find("Stream")
    url, callback = stream.get("url", ""), stream.get("statusCallback")
    if urlsplit(url).scheme != "wss":
        raise CallFailed(f"the <Stream url> is {url!r}: Twilio connects only to wss:// (error 31910)")
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    track = {"inbound_track": "inbound", "outbound_track": "outbound", "both_tracks": "both"}.get(
        stream.get("track", "inbound_track"), "inbound")
    print(f"twiml <{verb.tag}><Stream> url={url} track={track} parameters={','.join(params) or '-'} "
          f"statusCallback={callback or '-'}")
    if args.auth_token:
        headers = {**headers, "X-Twilio-Signature": signature(args.auth_token, url)}
    connect_to = urlsplit(url)._replace(scheme="ws").geturl() if offline else url
    if callback and offline:
        callback = urlsplit(callback)._replace(scheme="http").geturl()

    def status_callback(event, error=None):
        if not callback:
            return
        fields = {"AccountSid": call.account_sid, "CallSid": call.call_sid, "StreamSid": call.stream_sid,
                  "StreamName": call.stream_sid, "StreamEvent": event,
                  "Timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  **({"StreamError": error} if error else {})}
        answered, _ = post_form(callback, fields, args.auth_token, args.timeout)
        print(f"status {event} {answered}")

    args.url, args.connect, args.tracks = connect_to, verb.tag == "Connect", track
    tls = tls_context(args.cafile, args.insecure) if urlsplit(connect_to).scheme == "wss" else None
    try:
        client = connect(args, headers, tls)
    except CallFailed as failure:
        status_callback("stream-error", f"Stream - WebSocket - {failure}")
        raise
    try:
        return play(args, samples, headers, tls, client=client, call=call, params=params,
                    on_started=lambda: status_callback("stream-started"))
    finally:
        status_callback("stream-stopped")


def play(args, samples, headers, tls, client=None, call=None, params=None, on_started=None):
    """The call the command line asks for: 0 if all went as it should, 1 if the server sent
    what Twilio would refuse; CallFailed if the call could not be made or did not end well."""
    params = dict(p.split("=", 1) for p in args.param) if params is None else params
    client = client or connect(args, headers, tls)
    if call is not None:
        call.params = params
    if args.connect:
        if call is not None:
            call.tracks = ["inbound"]
        player, code, call = play_connect_call(args.url, samples, dtmf=args.dtmf, jitter_ms=args.jitter_ms,
                                               params=params, timeout=args.timeout, client=client, call=call,
                                               on_started=on_started)
        if args.heard:
            write_wav(args.heard, decode_ulaw(player.heard))
        sent = len(player.sent_at)
        print(f"sent stream={call.stream_sid} media={sent} ({seconds_sent(sent, 1, samples)}) "
              f"received media={player.media} ({player.media_bytes / 8000:.2f} s) marks={len(player.marks)} "
              f"clears={player.clears} refused={len(player.violations)} heard={len(player.heard) / 8000:.2f}s "
              f"closed={code or 'without a close frame'}")
        if player.ending:
            raise CallFailed(player.ending)
        return 1 if player.violations else 0
    ulaw = encode_ulaw(samples)
    tracks = ["inbound", "outbound"] if args.tracks == "both" else [args.tracks]
    # the outbound track gets the same audio a little quieter, so the two are told apart
    audio = {track: ulaw if i == 0 else encode_ulaw([s // 4 for s in samples]) for i, track in enumerate(tracks)}
    if call is None:
        call = Call(tracks=tracks, params=params)
    call.tracks = tracks
    sent, code, ending = play_call(client, call, audio, args.timeout, on_started)
    print(f"sent stream={call.stream_sid} media={sent} ({seconds_sent(sent, len(tracks), samples)} per track, "
          f"tracks={','.join(tracks)}) closed={code or 'without a close frame'}")
    if ending:
        raise CallFailed(ending)
    return 0


if __name__ == "__main__":
    sys.exit(main())
