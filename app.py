"""Receive the live audio of Twilio phone calls (Media Streams) on a WebSocket at /media.

Run it:   python app.py    then `ngrok http 5000`, and a TwiML Bin with <Stream url="wss://<ngrok host>/media"/>
Start here: media(), the tutorial's loop, at line 155.
Your own processing: subclass MediaStream, then app.main(stream_class=YourStream) (README).

The file, top to bottom: each section and its first line (tests/test_setup.py keeps them true).
   109  The tutorial's app            Flask, Sockets (fixed for today's Werkzeug) and the /media loop
   185  The call                      its events, typed; MediaStream: one method per Twilio event
  1238  Text and audio helpers        log-safe text, mu-law to PCM and back (no audioop), levels, WAV
  1454  Settings and the runtime      each flag once: read_settings() -> Settings; create_runtime()
  2110  HTTP                          /, /healthz, Twilio's webhooks, the handshake checks
  2338  Optional features             each switched on by a flag, each consuming call events:
  2340    Talking back                --echo, --greet: the ready modes of a <Connect><Stream>
  2390    Transcripts                 --transcribe: utterances by voice activity, Whisper on threads
  2797    Alerts                      --alerts: the phrases that matter, in what is said
  2882    Alerts to people            --alert-webhook: each alert POSTed once, signed: Slack, Teams, yours
  3106    Mood                        --mood: each line from -1 (angry) to +1 (pleased)
  3161    Redaction                   card numbers, codes, expiry dates, SSNs, keys: never kept
  3363    Sinks                       the console's lines, transcript files
  3457    Metrics                     --metrics-port: Prometheus
  3549    The floor                   --floor-port: every live call on one page, /events, /calls
  3963    The floor's page            its HTML, CSS and JavaScript
  4195    The floor across processes  --redis-url: one Redis stream
  5069  The transport                 what a user need not read:
  5071    WebSocket frames            RFC 6455 without I/O: bytes in, messages and replies out
  5240    The WebSocket and its handler  gevent-websocket and pywsgi, adapted: reads, outbox, limits
  5988  Start-up                      configure(), main(), then gunicorn's worker
"""
from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import datetime
import enum
import errno
import functools
import glob
import hashlib
import hmac
import http.client
import importlib
import importlib.util
import inspect
import json
import io
import itertools
import ipaddress
import logging
import math
import os
import re
import resource
import shlex
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.error
import urllib.request
import wave
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar
from urllib.parse import quote as urlquote, urlencode, urlsplit
from xml.sax.saxutils import escape as xml_text, quoteattr as xml_attribute

import flask_sockets
import gevent
import gevent.event
import gevent.exceptions
import gevent.monkey
import gevent.queue
import gevent.socket
import gevent.threadpool
import greenlet
import geventwebsocket.handler
from flask import Flask, Response, abort, current_app, request
from gevent import pywsgi
from gevent.pool import Pool
from geventwebsocket.exceptions import WebSocketError
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import WebSocket
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Rule

try:
    from orjson import dumps as json_dumps, loads as json_loads  # 3x faster than the stdlib on Twilio's messages
except ImportError:
    from json import dumps, loads as json_loads  # type: ignore[assignment]

    def json_dumps(message: dict) -> bytes:  # type: ignore[misc]
        return dumps(message, separators=(",", ":")).encode()

log = logging.getLogger("mediastreams")
startup_log = logging.getLogger("mediastreams.startup")  # where it listens: printed at every --log-level


# === The tutorial's app: Flask, Sockets and the /media loop =================================

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
        # routes raise for this request: its traceback made a reference cycle per call.
        with self.app.app_context(), self.app.request_context(environ) as context:
            context.request.routing_exception = None
            handler(environ["wsgi.websocket"], **values)
        return []


app = Flask(__name__)
sockets = Sockets(app)


# The tutorial's loop: receive a message, handle it, until `stop` or the socket closes.

CLOSE_CODE_WHEN_ENDED = {"stop": 1000, "idle": 1000, "disconnect": 1000, "hangup": 1000, "shutdown": 1001,
                         "error": 1011}


@sockets.route("/media")
def media(ws):
    runtime = ws.runtime
    stream = runtime.stream_class(runtime, remote=request.remote_addr or "?", ws=ws)
    ws.hand_media_to(stream)  # media handled by the event loop as it lands; receive() returns the rest, in order
    try:
        while not ws.closed:
            message = ws.receive()
            if message is None:  # the socket closed, or broke the WebSocket protocol: no `stop`
                stream.end("error" if ws.error else "disconnect", ws.error)
                break
            if stream.handle(message) == "stop":
                break
    except HangUp:  # the server's side ends the call (MediaStream.hang_up)
        stream.end("hangup")
    except Stalled as stalled:  # the client reads nothing of what we send
        stream.end("stalled", str(stalled))
    except IdleTimeout as idle:
        stream.end("idle", str(idle))
    except gevent.GreenletExit:
        stream.end("shutdown")
    except Exception as exc:  # a bug in one stream's handling ends that stream, not the server
        stream.fail(exc)
    finally:
        try:
            stream.finish_audio()  # the chunks still waiting for your on_audio(), before your finish() runs
            stream.finish()
        finally:
            ws.close(CLOSE_CODE_WHEN_ENDED.get(stream.ended, 1000))


# === The call ===============================================================================

# --- Call events: every observable thing about a call, once ---------------------------------

@dataclass(frozen=True, slots=True)
class CallEvent:
    """Something that can be seen of one call. The stream makes it; the runtime hands it to
    every sink (the console, metrics, transcript files, the floor, Redis, and whatever is
    added next), which reads its fields, never the stream behind it. `call_key` tells this
    process's calls apart (a stream SID comes only with `start`); `label` is the stream's as
    it was when the event happened (`stream=MZ…`, or `remote=…` before `start`); `number`
    tells this process's events apart (what the call history writes each event once by). None
    is made per media message: a call's first chunk and its levels are."""
    call_key: int
    label: str
    stream_sid: str | None
    call_sid: str | None
    number: int


@dataclass(frozen=True, slots=True)
class Accepted(CallEvent):
    """The WebSocket is open: a call begins."""


@dataclass(frozen=True, slots=True)
class Connected(CallEvent):
    protocol: str
    version: str


@dataclass(frozen=True, slots=True)
class Started(CallEvent):
    tracks: tuple[str, ...]
    media_format: str                 # encoding/sampleRate/channels, as sent
    parameters: dict[str, str]        # customParameters: names and values, made safe to log


@dataclass(frozen=True, slots=True)
class FirstMedia(CallEvent):
    track: str
    size: int                         # bytes of mu-law in the first message


@dataclass(frozen=True, slots=True)
class Level(CallEvent):
    track: str
    mean_square: float                # of the samples read over the last second


@dataclass(frozen=True, slots=True)
class Dtmf(CallEvent):
    digit: str                        # "*" where it was redacted: a key of a run after its first
    masked: bool = False


@dataclass(frozen=True, slots=True)
class MarkSent(CallEvent):
    name: str


@dataclass(frozen=True, slots=True)
class MarkEchoed(CallEvent):
    name: str
    cancelled: bool                   # a clear cut off the audio before it
    waited_ms: float


@dataclass(frozen=True, slots=True)
class BargeIn(CallEvent):
    queued_seconds: float             # of audio the caller spoke over, cleared


@dataclass(frozen=True, slots=True)
class UnknownEvent(CallEvent):
    event: str


@dataclass(frozen=True, slots=True)
class Stopped(CallEvent):
    """Twilio's `stop`."""


@dataclass(frozen=True, slots=True)
class Transcribed(CallEvent):
    track: str
    at: float                         # seconds from the stream's first audio
    text: str
    partial: bool = False
    mood: float | None = None         # --mood: -1 (angry, fed up) to +1 (pleased)
    redacted: tuple[str, ...] = ()    # the kind of each thing taken out of the line, now a marker in `text`
    seconds: float = 0.0              # how long it was said (voice activity)


@dataclass(frozen=True, slots=True)
class Alerted(CallEvent):
    """A transcript line said a phrase of an --alerts category."""
    track: str
    category: str
    phrase: str                       # as the alerts file has it
    text: str                         # the transcript line
    caller: str | None = None         # the call's From parameter, where it has one (what /twiml gives)


@dataclass(frozen=True, slots=True)
class StatusCallback(CallEvent):
    """Twilio's stream status callback (/stream-status) for a stream open in this process."""
    event: str                        # stream-started, stream-stopped, stream-error
    error: str | None


@dataclass(frozen=True, slots=True)
class Warned(CallEvent):
    message: str


@dataclass(frozen=True, slots=True)
class HookFailed(CallEvent):
    """A bug in a hook of yours (on_audio, on_dtmf, ...): the first of each kind; the call goes on."""
    hook: str
    error: BaseException


@dataclass(frozen=True, slots=True)
class Failed(CallEvent):
    """A bug in the stream's own handling ended it (close code 1011)."""
    error: BaseException


@dataclass(frozen=True, slots=True)
class SecureSection(CallEvent):
    """pause_recording() (`paused`) or resume_recording(): silence recorded, nothing transcribed, keys hidden."""
    paused: bool


@dataclass(frozen=True, slots=True)
class RecordingStarted(CallEvent):
    """--record: a track's WAV file is open (what a transcript file is named after)."""
    track: str
    path: str


@dataclass(frozen=True, slots=True)
class Counted(CallEvent):
    """An open call's counts so far, once a second while something counts them (--metrics-port)."""
    summary: CallSummary


@dataclass(frozen=True, slots=True)
class Ended(CallEvent):
    summary: CallSummary


@dataclass(frozen=True, slots=True)
class TrackSummary:
    name: str
    messages: int
    bytes: int
    gaps: int


@dataclass(frozen=True, slots=True)
class CallSummary:
    """How a call went, in typed fields: what its summary line (line()), metrics and the
    floor's `end` (fields()) are made from. A field that is None is not counted by this call
    (no on_audio() of its own, no --transcribe, no --alerts): its line leaves it out."""
    stream_sid: str | None
    call_sid: str | None
    ended: str
    duration: float
    tracks: tuple[TrackSummary, ...]  # every track, those without audio too
    duplicates: int
    out_of_order: int
    bad: dict[str, int]               # messages skipped, by kind
    sent: int                         # what the stream played back: media messages (20 ms each) ...
    marks_sent: int                   # ... marks sent, and of them those echoed played or cancelled
    marks_played: int
    marks_cancelled: int
    clears: int
    unsent: int
    audio_dropped: int | None
    transcript: int | None            # lines recognized, and utterances dropped
    transcript_dropped: int | None
    alerts: int | None
    moods: dict[str, float]           # track: the mean of its lines' moods
    talk: dict[str, float] | None     # --transcribe: seconds each track's speaker spoke (voice activity) ...
    overlap: float | None             # ... both at once ...
    silence: float | None             # ... and neither
    statuses: tuple[str, ...]         # Twilio's stream status callbacks
    recordings: tuple[tuple[str, float], ...]  # path, seconds
    recordings_stopped: int           # by a write error or --max-recording-seconds
    recording_skipped: int
    redacted: int | None              # things taken out (card numbers, codes, ..., keys); None: --no-redact
    hook_errors: dict[str, int]       # bugs in your hooks, by hook: the call went on
    extra: dict[str, str]             # the stream class's own (MediaStream.summary_extra())

    def fields(self) -> dict[str, str]:
        """The summary's key=value pairs, in the order of its line."""
        tracks = [track for track in self.tracks if track.messages]
        audio_bytes = sum(track.bytes for track in tracks)
        fields = {"stream": self.stream_sid or "-", "call": self.call_sid or "-", "ended": self.ended,
                  "duration": f"{self.duration:.2f}s", "media": str(sum(track.messages for track in tracks))}
        fields |= {track.name: f"{track.messages}/{track.bytes / 8000:.2f}s" for track in tracks}
        fields |= {"audio": f"{audio_bytes / 8000:.2f}s", "bytes": str(audio_bytes),
                   "gaps": str(sum(track.gaps for track in tracks)), "duplicates": str(self.duplicates),
                   "out_of_order": str(self.out_of_order), "bad": str(sum(self.bad.values()))}
        fields |= {f"bad_{kind}": str(count) for kind, count in sorted(self.bad.items())}
        if self.sent or self.marks_sent or self.clears or self.unsent:
            fields |= {"sent": f"{self.sent}/{self.sent * CHUNK_BYTES / 8000:.2f}s",
                       "marks": f"{self.marks_sent}/{self.marks_played}/{self.marks_cancelled}",
                       "clears": str(self.clears)}
            fields |= {"unsent": str(self.unsent)} if self.unsent else {}
        fields |= {} if self.audio_dropped is None else {"audio_dropped": str(self.audio_dropped)}
        if self.transcript is not None:
            fields |= {"transcript": str(self.transcript), "transcript_dropped": str(self.transcript_dropped)}
        fields |= {} if self.alerts is None else {"alerts": str(self.alerts)}
        fields |= {f"mood_{track}": f"{mood:.2f}" for track, mood in self.moods.items()}
        if self.talk is not None:
            fields |= {f"talk_{track}": f"{seconds:.2f}s" for track, seconds in self.talk.items()}
            fields |= {"overlap": f"{self.overlap:.2f}s", "silence": f"{self.silence:.2f}s"}
        fields |= {"status": ",".join(self.statuses)} if self.statuses else {}
        if self.recordings:
            fields["recordings"] = ",".join(f"{path}:{seconds:.2f}s" for path, seconds in self.recordings)
        fields |= {"recording_skipped": str(self.recording_skipped)} if self.recording_skipped else {}
        fields |= {} if self.redacted is None else {"redacted": str(self.redacted)}
        fields |= {f"{hook}_errors": str(count) for hook, count in self.hook_errors.items()}
        return fields | self.extra

    def line(self) -> str:
        """The console's summary line."""
        return "summary " + " ".join(f"{name}={value}" for name, value in self.fields().items())


# --- MediaStream: one call, one method per Twilio event -------------------------------------

class BadMessage(Exception):
    """A message we skip: `kind` is counted in the summary, `detail` goes into the warning."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


def whole_number(obj: dict, name: str) -> int | None:
    """Twilio's numbers come as strings ("42"); accept real numbers too."""
    value = obj.get(name)
    if type(value) is str and len(value) < 16 and value.isdecimal():  # Twilio's own: most of them
        return int(value)
    if value is None:
        return None
    try:
        result = int(value)
    except (TypeError, ValueError, OverflowError):
        result = None
    if result is None or value is True or value is False:  # JSON true is not 1
        raise BadMessage(name, f"{name} is not a whole number")
    if abs(result) > 2**53:  # far beyond any call; a 4000-digit number would only cost us
        raise BadMessage(name, f"{name} is out of range")
    return result


def scalar_text(value) -> str:
    """A value a client sent, for the log: strings and numbers, short; anything else by its type."""
    if isinstance(value, (str, int, float)):
        return printable(str(value), 40)
    return type(value).__name__


def field_text(obj: dict, name: str, default: str | None = None) -> str | None:
    value = obj.get(name)
    return printable(value, 64) if isinstance(value, str) else default


TRACK_NAMES = ("inbound", "outbound")
START_PARAMETERS = 100  # customParameters kept of a start (Twilio's REST API allows 99): a floor keeps each call's
GAP_MS = 10            # a timestamp further ahead than this (half a 20 ms frame) is lost audio
MAX_WARNINGS = 100     # per stream; the rest are still counted
MAX_UNKNOWN_EVENTS = 20
CHUNK_BYTES = 160      # mu-law bytes a media message plays back: 20 ms, as Twilio sends them
AUDIO_QUEUE_CHUNKS = 250  # a class of yours: chunks (5 s) waiting for its on_audio(); beyond, dropped and counted


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
    recording: "WavTrack | None" = None
    transcript: "TrackTranscript | None" = None
    recording_stopped: bool = False  # by a write error or --max-recording-seconds: the file stays
    recording_skipped: int = 0       # chunks not recorded: the silence before them would outrun the call's age


@dataclass
class Mark:
    name: str
    after_bytes: int                # the audio sent before it: played when Twilio echoes it
    sent_at: float
    clears_before: int              # clears sent before it: if one went out after it, its echo means cut off


@dataclass
class PlayedBack:
    """What a stream sent into the call (<Connect><Stream> only)."""
    messages: int = 0               # media messages handed to the socket, 20 ms each (sent=)
    queued_bytes: int = 0           # audio handed to play(), sent or still to go: where marks fall
    marks: dict = field(default_factory=dict)  # name: the marks of that name sent, not yet echoed, oldest first
    marks_waiting: int = 0
    marks_played: int = 0
    marks_cancelled: int = 0
    clears: int = 0
    unsent: int = 0                 # messages refused (before start, a <Start> stream, a closed socket) or
                                    # still waiting to be sent when the stream ended
    playing_until: float = 0.0      # when Twilio will have played what it was sent, as far as we know

    @property
    def marks_sent(self) -> int:
        return self.marks_waiting + self.marks_played + self.marks_cancelled


class Playback:
    """Audio from play(), made into 20 ms media messages only as the socket takes them: a
    long greeting costs no time in the receive loop and no memory per call beyond itself."""
    __slots__ = ("stream", "ulaw", "offset")

    def __init__(self, stream: "MediaStream", ulaw: bytes):
        self.stream, self.ulaw, self.offset = stream, ulaw, 0

    def messages(self, limit: int) -> list[bytes]:
        """The next media messages (JSON), about `limit` bytes of them (at least one)."""
        messages, ulaw, size = [], self.ulaw, 0
        while self.offset < len(ulaw) and size < limit:
            chunk = ulaw[self.offset:self.offset + CHUNK_BYTES].ljust(CHUNK_BYTES, b"\xff")  # whole 20 ms
            self.offset += CHUNK_BYTES
            payload = binascii.b2a_base64(chunk, newline=False).decode()
            messages.append(json_dumps({"event": "media", "streamSid": self.stream.stream_sid,
                                        "media": {"payload": payload}}))
            size += len(messages[-1])
        self.stream.played_back.messages += len(messages)
        return messages

    @property
    def done(self) -> bool:
        return self.offset >= len(self.ulaw)

    def messages_left(self) -> int:
        return -(-max(0, len(self.ulaw) - self.offset) // CHUNK_BYTES)


class AudioGreenlet:
    """A class's own on_audio(), run for one call in a greenlet of its own, where it may wait,
    fed with chunks through a deque of at most AUDIO_QUEUE_CHUNKS. From the event loop's
    callback a chunk is handed over by switching straight into the greenlet, which switches
    back once it waits for the next, as on_readable() wakes a call's greenlet: through a
    gevent queue (a put, a scheduled wake-up, a get) the hand-over cost 3x as much."""

    def __init__(self, on_audio: Callable[[str, int, bytes], None], on_error: Callable[[Exception], None]):
        self.on_audio, self.on_error = on_audio, on_error
        self.chunks: deque = deque()
        self.hub = gevent.get_hub()
        self.greenlet = greenlet.greenlet(self.run, self.hub)  # the hub its parent, as a gevent greenlet's
        self.waiting = True      # in its own wait for chunks (or not started): the one place to switch it in
        self.done = gevent.event.Event()

    def put(self, chunk: tuple) -> bool:
        """Never waits; False, the chunk dropped, while AUDIO_QUEUE_CHUNKS wait already."""
        if len(self.chunks) >= AUDIO_QUEUE_CHUNKS:
            return False
        self.chunks.append(chunk)
        self.wake()
        return True

    def wake(self) -> None:
        if self.waiting:
            self.waiting = False
            if gevent.getcurrent() is self.hub:
                self.greenlet.switch()  # back here once it waits again
            else:  # a greenlet cannot switch into another and be switched back to: the loop's turn
                self.hub.loop.run_callback(self.greenlet.switch)

    def run(self) -> None:
        try:
            while True:
                while self.chunks:
                    chunk = self.chunks.popleft()
                    if chunk is None:
                        return
                    try:
                        self.on_audio(*chunk)
                    except Exception as exc:  # a bug in your on_audio(): counted and said; the next chunk comes
                        self.on_error(exc)
                self.waiting = True
                self.hub.switch()
        finally:
            self.done.set()

    def finish(self, seconds: float) -> int:
        """From the call's greenlet: the chunks waiting handled within `seconds`, then the
        greenlet ends; the chunks left unhandled."""
        if self.waiting and not self.chunks:  # idle (most calls as they end): ended at once, no turn of the loop
            self.greenlet.parent = gevent.getcurrent()  # where it goes once it has ended: back here
            self.greenlet.throw(greenlet.GreenletExit)
            return 0
        self.chunks.append(None)  # the end, behind the chunks waiting
        self.wake()
        with gevent.Timeout(seconds, False):
            self.done.wait()
        if not self.done.is_set():
            gevent.kill(self.greenlet)
        return sum(chunk is not None for chunk in self.chunks)


def is_ours(function: object) -> bool:
    """Whether a function is this module's own code (not a subclass's from elsewhere)."""
    return getattr(function, "__globals__", None) is globals()


def functions_of(attribute: object) -> list | None:
    """The functions a class attribute runs when it is used: a method's own, a property's,
    a static or class method's; none for data (a number, a dict); None when it is code of
    another kind (a callable object, a descriptor of its own), which is not known to be ours."""
    if isinstance(attribute, types.FunctionType):
        return [attribute]
    if isinstance(attribute, property):
        return [f for f in (attribute.fget, attribute.fset, attribute.fdel) if f is not None]
    if isinstance(attribute, (staticmethod, classmethod)):
        return functions_of(attribute.__func__)
    if callable(attribute) or hasattr(attribute, "__get__"):
        return None
    return []


def names_in(code: types.CodeType) -> set[str]:
    """Every attribute and global name a function's code (its lambdas and comprehensions too) uses."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= names_in(constant)
    return names


def media_code_is_ours(cls: type[MediaStream]) -> bool:
    """Whether the event loop may handle `cls`'s media messages itself, in its callback, where
    nothing may wait: only if all the code that handling can reach is this module's own. Found
    from the class, not from a list: handle_media(), handle() (which a class may override to see
    every message), the method EVENTS names for media and Python's hooks for attribute access,
    then every name their code uses, looked up in every class of the MRO (so super() calls
    are followed), and so on. Anything of a subclass's that
    is reached, a private method or a property too, sends its media to the call's greenlet,
    where code may wait. A class's own on_audio() is never reached: it runs in its audio greenlet."""
    todo = ["handle_media", "handle", cls.EVENTS.get("media", ""), "__getattribute__", "__getattr__", "__setattr__"]
    seen = {"on_audio"} if cls._audio_in_greenlet else set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for klass in cls.__mro__[:-1]:  # not object's own attribute access: it waits for nothing
            if name in vars(klass):
                functions = functions_of(vars(klass)[name])
                if functions is None or not all(map(is_ours, functions)):
                    return False
                todo += [name for function in functions for name in names_in(function.__code__)]
    return True


@dataclass(eq=False)
class MediaStream:
    """One WebSocket connection from Twilio: what we know of the call, one method per event.

    To process the audio, subclass it, override on_audio() and run
    app.main(stream_class=YourStream); setup() is called once per call, before its first
    message. To handle an event of your own, add it to EVENTS:
    `EVENTS = {**MediaStream.EVENTS, "custom": "on_custom"}`. To talk back on a
    <Connect><Stream>: play(), mark(), clear(), and on_mark_echo() when a mark comes back.

    Everything that can be seen of the call is an event (CallEvent) handed to the runtime's
    sinks: this class never logs by itself."""

    EVENTS: ClassVar[dict[str, str]] = {"media": "on_media", "connected": "on_connected", "start": "on_start",
                                        "dtmf": "on_dtmf", "mark": "on_mark", "stop": "on_stop"}
    handlers: ClassVar[dict]            # EVENTS' methods, looked up when the class is made (handlers_of)
    wants_pcm: ClassVar[bool] = False   # every chunk decoded to PCM: True for a class with an on_audio() of its own
    talks_back: ClassVar[bool] = False  # True: read as each message lands from the first (else from the first send)
    # Set for each class when it is made. The event loop handles media messages as they land
    # (a sixth less CPU than waking the call's greenlet for each) when all it runs for them is
    # this module's own code (media_code_is_ours); a class's own on_audio() runs in a greenlet
    # of the call's, fed through a bounded queue, where it may wait.
    _media_in_event_loop: ClassVar[bool] = True
    _audio_in_greenlet: ClassVar[bool] = False

    runtime: "Runtime" = field(repr=False)
    remote: str
    ws: "MediaWebSocket | Any" = field(default=None, repr=False)  # where play(), mark() and clear() send
    stream_sid: str | None = None
    call_sid: str | None = None
    parameters: dict = field(default_factory=dict)  # start's customParameters, as Twilio sent them (<Parameter>s)
    streamed_tracks: tuple = ()     # start's tracks: ("inbound",), ("outbound",) or both
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
    decoding: bool = False          # a recording, transcripts or an on_audio(): each chunk is decoded to PCM
    ended: str = "disconnect"
    played_back: PlayedBack = field(default_factory=PlayedBack)
    listen_only: str | None = None  # why nothing may be sent back: warned once, then only counted
    audio_dropped: int = 0          # chunks your on_audio() was too far behind to take
    statuses: list = field(default_factory=list)  # Twilio's stream status callbacks for it (/stream-status)
    audio: AudioGreenlet | None = field(default=None, repr=False)  # where your on_audio() runs
    call_key: int = field(default=0, init=False)  # this process's number for the call: its events carry it
    paused: bool = False            # pause_recording(): a secure section, until resume_recording()
    last_key_at: float = -math.inf  # when the last key was pressed: a run of keys shows only its first
    keys_masked: int = 0
    hung_up: bool = False           # hang_up() was called: once is enough
    hook_errors: dict = field(default_factory=dict)  # hook: bugs in your code that ran there (counted)
    hook_errors_said: set = field(default_factory=set, repr=False)  # (hook, exception type): traceback shown
    ending: bool = False            # finishing: its audio drained, its summary made

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.handlers = handlers_of(cls)
        cls.wants_pcm = cls.wants_pcm or cls.on_audio is not MediaStream.on_audio
        cls._audio_in_greenlet = not is_ours(cls.on_audio)
        cls._media_in_event_loop = media_code_is_ours(cls)

    def __post_init__(self):
        if self.talks_back and self.ws is not None:
            self.ws.talk_back()
        self.call_key = self.runtime.open_call(self)
        self.emit(Accepted)
        self.yours("setup", self.setup)

    def setup(self) -> None:
        """Yours to override: called once per call, in its greenlet, before its first message."""

    @property
    def caller(self) -> str | None:
        """The caller's number (the From parameter /twiml gives a stream), made safe to show."""
        given = self.parameters.get("From")
        return printable(given, 64) if isinstance(given, str) and given else None

    @property
    def label(self) -> str:
        return f"stream={self.stream_sid}" if self.stream_sid else f"remote={self.remote}"

    def emit(self, kind: type[CallEvent], **details) -> None:
        self.runtime.emit(kind(self.call_key, self.label, self.stream_sid, self.call_sid,
                               next(self.runtime.event_numbers), **details))

    def handle(self, message: str | bytes) -> str | None:
        """One message from the socket: parsed, then handed to the method EVENTS names for its
        event. A bad message is counted and warned about, never raised. Returns the event."""
        return self._handle(message)

    def _handle(self, message: str | bytes, only: str | None = None) -> str | None:
        # With `only` (the event loop's "media"), a message of another event is left as it was.
        try:
            data = self.parse(message)
            event = data["event"]
            if only and event != only:
                return event
            handler = self.handlers.get(event)
            if handler is None:
                self.on_unknown(event)
            elif is_ours(handler):
                handler(self, data)
            else:
                self.yours(handler.__name__, handler, self, data)
            return event
        except BadMessage as bad:
            self.bad[bad.kind] = self.bad.get(bad.kind, 0) + 1
            self.warn(f"skipped message: {bad}")
            return None

    def handle_media(self, message: str | bytes) -> str | None:
        """What the event loop calls for each message it reads: media are handled, any other
        event is returned unhandled, for the call's greenlet (MediaWebSocket.on_readable)."""
        return self._handle(message, "media")

    def parse(self, message: str | bytes) -> dict:
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

    def warn(self, message: str) -> None:
        self.warnings += 1
        if self.warnings <= MAX_WARNINGS:
            self.emit(Warned, message=printable(message, 300))
        elif self.warnings == MAX_WARNINGS + 1:
            self.emit(Warned, message=f"more than {MAX_WARNINGS} warnings: the rest are only counted in the summary")

    def check_sequence(self, data: dict) -> bool:
        """False for a message seen already; counts what arrives out of order."""
        sequence = whole_number(data, "sequenceNumber")
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
        self.emit(Connected, protocol=field_text(data, "protocol", "?"), version=field_text(data, "version", "?"))

    def on_start(self, data: dict) -> None:
        if self.stream_sid:
            raise BadMessage("second_start", "second 'start' on this stream: ignored")
        start = data.get("start")
        if not isinstance(start, dict):
            raise BadMessage("start", "'start' field is not an object")
        stream_sid = sid_text(field_text(start, "streamSid") or field_text(data, "streamSid"))
        if not stream_sid:
            raise BadMessage("start", "start without a streamSid")
        tracks = start.get("tracks", ["inbound"])
        params = start.get("customParameters") or {}
        media_format = start.get("mediaFormat") or {}
        if not (isinstance(tracks, list) and all(isinstance(t, str) for t in tracks)
                and isinstance(params, dict) and isinstance(media_format, dict)):
            raise BadMessage("start", "start.tracks, customParameters or mediaFormat has the wrong type")
        self.check_sequence(data)
        self.stream_sid = stream_sid
        self.runtime.streams[stream_sid] = self  # where Twilio's stream status callback finds it
        if "outbound" in tracks:
            self.listen_only = ("its tracks include outbound, so it comes from <Start><Stream>, where Twilio "
                                "accepts nothing back: use <Connect><Stream> (twiml/connect.xml)")
        self.decoding = self.wants_pcm or bool(self.runtime.settings.record) or self.runtime.transcriber is not None
        self.call_sid = sid_text(field_text(start, "callSid", "?"))
        given = (len(params), len(tracks))
        if given[0] > START_PARAMETERS or given[1] > len(TRACK_NAMES):  # what every sink keeps is bounded
            params, tracks = dict(itertools.islice(params.items(), START_PARAMETERS)), tracks[:len(TRACK_NAMES)]
        self.parameters, self.streamed_tracks = dict(params), tuple(tracks)
        encoding, rate, channels = (media_format.get(name) for name in ("encoding", "sampleRate", "channels"))
        self.emit(Started, tracks=tuple(printable(t, 100) for t in tracks),
                  media_format="/".join(scalar_text(value) for value in (encoding, rate, channels)),
                  parameters={printable(name, 100): scalar_text(value) for name, value in params.items()})
        if given != (len(params), len(tracks)):
            self.warn(f"start has {given[0]} customParameters and {given[1]} tracks: the first {len(params)} and "
                      f"{len(tracks)} kept (Twilio sends at most 99 and 2)")
        if (encoding, rate, channels) != ("audio/x-mulaw", 8000, 1):
            self.warn(f"unexpected media format {'/'.join(scalar_text(v) for v in (encoding, rate, channels))}: "
                      "this server expects audio/x-mulaw 8000 Hz mono")

    def on_media(self, data: dict) -> None:
        media = data.get("media")
        if not isinstance(media, dict):
            raise BadMessage("media", "'media' field is not an object")
        track_name = media.get("track")
        track = self.tracks.get(track_name) if isinstance(track_name, str) else None
        if track is None:
            raise BadMessage("media", f"media.track is not one of {TRACK_NAMES}")
        payload = media.get("payload")
        if not isinstance(payload, str) or not payload:
            raise BadMessage("payload", "media.payload missing or empty")
        try:
            audio = binascii.a2b_base64(payload, strict_mode=True)
        except (binascii.Error, ValueError):
            raise BadMessage("payload", "media.payload is not valid base64") from None
        timestamp = whole_number(media, "timestamp")
        chunk = whole_number(media, "chunk")
        if self.stream_sid is None:
            raise BadMessage("media_before_start", "media before 'start': dropped")
        if not self.check_sequence(data):
            return
        if track.messages == 0:
            self.emit(FirstMedia, track=track.name, size=len(audio))
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
        if not track.messages & 3 and self.runtime.levels:  # a level a second: 1 chunk in 4 will do
            self.meter(track, audio)
        if self.decoding:
            pcm = ulaw_to_pcm16(audio)
            if self.runtime.settings.record and not track.recording_stopped:
                self.record(track, timestamp, bytes(len(pcm)) if self.paused else pcm)
            if self._audio_in_greenlet:
                self.queue_audio(track.name, timestamp, pcm)
            elif self.wants_pcm:
                self.on_audio(track.name, timestamp, pcm)
            if self.runtime.transcriber and not self.paused:
                if track.transcript is None:
                    track.transcript = TrackTranscript(self, track.name)
                track.transcript.feed(timestamp - self.origin_ms, pcm)

    def on_audio(self, track: str, timestamp: int, pcm: bytes) -> None:
        """Yours to override, to process the audio (transcription, analysis): every chunk of
        every track, in order, as 16-bit little-endian PCM, 8000 Hz, mono; `timestamp` in ms
        on the stream's clock. It runs in a greenlet of the call's own, so it may wait (gevent
        sleeps, locks, queues, the network); while it is behind, chunks wait for it, up to
        AUDIO_QUEUE_CHUNKS (5 s): beyond, they are dropped and counted (audio_dropped=)."""

    def queue_audio(self, track: str, timestamp: int, pcm: bytes) -> None:
        """A chunk for your on_audio(), in this call's audio greenlet: never waits."""
        if self.audio is None:
            self.audio = AudioGreenlet(self.on_audio, self.audio_failed)
        if not self.audio.put((track, timestamp, pcm)):
            self.audio_dropped += 1
            if self.audio_dropped == 1:
                self.warn(f"{type(self).__name__}.on_audio() is {AUDIO_QUEUE_CHUNKS} chunks behind: chunks are "
                          "dropped while it is (counted: audio_dropped=)")

    def audio_failed(self, error: Exception) -> None:
        self.hook_failed("on_audio", error)

    def yours(self, name: str, hook: Callable, *args) -> None:
        """A hook of yours (setup, on_mark_echo, an event method): a bug in it is counted
        (`<hook>_errors=` in the summary) and its first traceback of each kind shown; the call,
        its recording and its transcript go on. Hanging up, and bad messages, pass through."""
        try:
            hook(*args)
        except (HangUp, IdleTimeout, BadMessage):
            raise
        except Exception as exc:
            self.hook_failed(name, exc)

    def hook_failed(self, name: str, error: Exception) -> None:
        self.hook_errors[name] = self.hook_errors.get(name, 0) + 1
        kind = (name, type(error).__name__)
        if kind not in self.hook_errors_said:
            self.hook_errors_said.add(kind)
            self.emit(HookFailed, hook=name, error=error)

    def finish_audio(self) -> None:
        """The chunks still waiting for on_audio(), handled within Limits.audio_drain_seconds; what is
        left is dropped and counted."""
        self.ending = True  # from here on, nothing may interrupt the stream's end (hang_up())
        audio, self.audio = self.audio, None
        if audio is not None:
            self.audio_dropped += audio.finish(1 if self.runtime.shutting_down else
                                               self.runtime.limits.audio_drain_seconds)

    def meter(self, track: Track, ulaw: bytes) -> None:
        # On every 4th message (on_media), every 8th sample, from another first one each time:
        # a 32nd of the cost (it was a quarter of the CPU of a media message when it read every
        # 8th sample of every message), and a tone whose period divides 8 samples (1 kHz) is
        # not read at one point of its wave. 250 samples a second make a level line.
        offset = (track.messages >> 2) & 7
        track.energy += sum(map(ULAW_SQUARES.__getitem__, ulaw[offset::8]))
        track.energy_samples += (len(ulaw) - offset + 7) // 8
        now = time.monotonic()
        if now >= track.next_level_at:
            if track.next_level_at and track.energy_samples:
                self.emit(Level, track=track.name, mean_square=track.energy / track.energy_samples)
            track.energy = track.energy_samples = 0
            track.next_level_at = now + 1.0

    def record(self, track: Track, timestamp: int, pcm: bytes) -> None:
        settings = self.runtime.settings
        at_sample = (timestamp - (self.origin_ms or 0)) * 8
        try:
            if track.recording is None:
                track.recording = WavTrack.create(settings.record or ".", f"{safe_name(self.stream_sid or '-')}_"
                                                                          f"{track.name}")
                self.emit(RecordingStarted, track=track.name, path=track.recording.path)
            recording = track.recording
            # Audio is written as it comes, however fast (the client pays for each byte of it);
            # the silence that fills a jump in the timestamps is free to ask for, so no more of
            # it is written than the call is old: a chunk that would need more is skipped.
            silence = recording.silence_before(at_sample)
            if recording.silent_samples + silence > ((time.monotonic() - self.started_at) * 1000
                                                     + MAX_SILENCE_LEAD_MS) * 8:
                if not track.recording_skipped:
                    self.warn(f"recording skips a chunk track={track.name}: its timestamp={timestamp} would need "
                              f"{silence / 8000:.1f} s of silence, more than the call is old (counted: "
                              "recording_skipped=)")
                track.recording_skipped += 1
                return
            if recording.samples + silence + len(pcm) // 2 > settings.max_recording_seconds * 8000:
                raise OSError(f"--max-recording-seconds {settings.max_recording_seconds:g} reached")
            recording.write(pcm, at_sample)
        except OSError as exc:  # disk full, file size limit, our own cap: the stream goes on unrecorded
            self.warn(f"recording stopped track={track.name}: {exc}")
            self.stop_recording(track)
            track.recording_stopped = True

    def stop_recording(self, track: Track) -> None:
        if track.recording and not track.recording.closed:
            try:
                track.recording.close()
            except OSError as exc:
                self.warn(f"closing recording {track.recording.path}: {exc}")

    def on_dtmf(self, data: dict) -> None:
        dtmf = data.get("dtmf")
        if not isinstance(dtmf, dict) or not isinstance(dtmf.get("digit"), (str, int)):
            raise BadMessage("dtmf", "dtmf.digit missing")
        if self.check_sequence(data):
            now, previous = time.monotonic(), self.last_key_at
            self.last_key_at = now  # of a run of keys (a card keyed in), only the first is shown: a menu's choice
            if self.runtime.settings.redact and (self.paused or now - previous < self.runtime.limits.key_run_seconds):
                self.keys_masked += 1
                self.emit(Dtmf, digit="*", masked=True)
            else:
                self.emit(Dtmf, digit=printable(str(dtmf["digit"]), 8))

    def on_mark(self, data: dict) -> None:
        """Twilio's echo of a mark we sent: the audio before it has been played, or cut off by a clear."""
        mark = data.get("mark")
        if not isinstance(mark, dict) or not isinstance(mark.get("name"), str):
            raise BadMessage("mark", "mark.name missing")
        if not self.check_sequence(data):
            return
        name, played_back = mark["name"], self.played_back
        waiting = played_back.marks.get(name)  # by name: a client echoing names we never sent costs no scan
        if waiting is None:
            raise BadMessage("unknown_mark", f"mark name='{printable(name, 100)}' was never sent, or echoed already")
        sent = waiting.popleft()
        if not waiting:
            del played_back.marks[name]
        played_back.marks_waiting -= 1
        cancelled = sent.clears_before < played_back.clears
        if cancelled:
            played_back.marks_cancelled += 1
        else:
            played_back.marks_played += 1
            # Played up to the mark: what was sent after it is still to come, from now.
            played_back.playing_until = time.monotonic() + (played_back.queued_bytes - sent.after_bytes) / 8000
        waited_ms = (time.monotonic() - sent.sent_at) * 1000
        self.emit(MarkEchoed, name=printable(name, 100), cancelled=cancelled, waited_ms=waited_ms)
        self.yours("on_mark_echo", self.on_mark_echo, name, cancelled, waited_ms)

    def on_mark_echo(self, name: str, cancelled: bool, waited_ms: float) -> None:
        """Yours to override: a mark of yours came back: the caller has heard the audio sent
        before it, or, when `cancelled`, a clear() cut that audio off. `waited_ms`: since
        mark() sent it."""

    # --- Talking back: play(), mark(), clear() (<Connect><Stream> only) --------------------

    def play(self, pcm: bytes) -> bool:
        """Play 16-bit little-endian PCM, 8000 Hz mono, into the call: mu-law, 20 ms a message.
        It is queued, never waited for; Twilio plays what it gets in order. False when it
        cannot go (see send())."""
        return self.play_ulaw(pcm16_to_ulaw(pcm))

    def play_ulaw(self, ulaw: bytes) -> bool:
        """play() for audio that is mu-law already (a TTS asked for ulaw_8000, an echo). The
        last message is padded with silence to 20 ms."""
        if not ulaw or not self.send(Playback(self, ulaw)):
            return False
        played_back = self.played_back
        length = -(-len(ulaw) // CHUNK_BYTES) * CHUNK_BYTES
        played_back.queued_bytes += length
        played_back.playing_until = max(played_back.playing_until, time.monotonic()) + length / 8000
        return True

    def mark(self, name: str) -> bool:
        """Ask Twilio to echo `name` once the audio sent so far has been played: on_mark_echo()."""
        played_back = self.played_back
        if not self.send({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}}):
            return False
        sent = Mark(name, played_back.queued_bytes, time.monotonic(), played_back.clears)
        played_back.marks.setdefault(name, deque()).append(sent)
        played_back.marks_waiting += 1
        self.emit(MarkSent, name=printable(name, 100))
        return True

    def clear(self) -> bool:
        """Cut off the audio Twilio has not played yet (barge-in), and ours not yet sent; the
        marks waiting come back cancelled."""
        if self.ws is not None and not self.listen_only:
            self.ws.drop_audio()
        if not self.send({"event": "clear", "streamSid": self.stream_sid}):
            return False
        self.played_back.clears += 1  # every mark waiting is now cancelled: sent before this clear
        self.played_back.playing_until = 0.0
        return True

    @property
    def queued_seconds(self) -> float:
        """Audio sent that Twilio has not played yet, as far as the marks and the clock tell."""
        return max(0.0, self.played_back.playing_until - time.monotonic())

    def send(self, message: dict | Playback) -> bool:
        """One message to Twilio (or audio, made into messages as the socket takes it); False
        (counted) when it cannot go: before `start`, on a <Start> stream, once the connection
        is closing or gone."""
        refused = self.listen_only or (None if self.stream_sid else "it has not started (no 'start' yet)")
        ws = self.ws
        if refused or ws is None or not (ws.send_audio(message) if isinstance(message, Playback)
                                         else ws.send_text(json_dumps(message))):
            self.played_back.unsent += 1
            if self.played_back.unsent == 1:
                self.warn(f"not sent back: {refused or 'the connection is closing or gone'} "
                          "(from now on only counted: unsent=)")
            return False
        return True

    def on_stop(self, data: dict) -> None:
        self.ended = "stop"
        self.emit(Stopped)

    def on_unknown(self, event: str) -> None:
        self.bad["unknown_event"] = self.bad.get("unknown_event", 0) + 1
        if event not in self.unknown_events and len(self.unknown_events) < MAX_UNKNOWN_EVENTS:
            self.unknown_events.add(event)
            self.emit(UnknownEvent, event=printable(event, 40))

    def end(self, how: str, why: str | None = None) -> None:
        """How the stream ended, for the summary: stop, disconnect, idle, stalled, hangup, shutdown or error."""
        self.ended = how
        if why:
            self.warn(why)

    def pause_recording(self) -> None:
        """A secure section (your IVR asks for a card): until resume_recording(), the recordings
        get silence, nothing is transcribed (what was being said is dropped), and every key
        shows as `*`. Your on_audio() and on_dtmf() still get the audio and the real keys."""
        if not self.paused:
            self.paused = True
            for track in self.tracks.values():
                if track.transcript:
                    track.transcript.discard()
            self.emit(SecureSection, paused=True)

    def resume_recording(self) -> None:
        """The secure section is over: recordings, transcripts and keys as before."""
        if self.paused:
            self.paused = False
            self.emit(SecureSection, paused=False)

    def hang_up(self) -> None:
        """End this stream from the server's side: its socket closes (1000), `ended=hangup`;
        audio not yet sent goes no further (unsent=). On a <Connect><Stream> with nothing after
        it (what /twiml serves when talking back) Twilio then ends the call; a <Start><Stream>
        call goes on without its stream: end that call with Twilio's REST API. Safe to call
        again, late, or from any of the call's greenlets: only the first call, before the
        stream ends, does anything (a second HangUp would land in the closing handshake)."""
        greenlet = self.ws.greenlet if self.ws is not None else None
        if self.hung_up or self.ending or greenlet is None or greenlet.dead:
            return
        self.hung_up = True
        if gevent.getcurrent() is greenlet:
            raise HangUp()
        gevent.kill(greenlet, HangUp())  # thrown at its next turn: this one goes on

    def fail(self, error: BaseException) -> None:
        """A bug in this call's handling has ended it."""
        self.ended = "error"
        self.emit(Failed, error=error)

    def finish(self) -> None:
        """Close the recordings and make the summary. Audio still waiting to be sent goes
        no further: the call is over (counted in unsent=)."""
        self.ending = True
        if self.ws is not None:
            self.played_back.unsent += self.ws.drop_audio()
        self.finish_audio()
        transcripts = [track.transcript for track in self.tracks.values() if track.transcript]
        if transcripts:
            end_transcripts(transcripts)
        for track in self.tracks.values():
            self.stop_recording(track)
        if self.stream_sid and self.runtime.streams.get(self.stream_sid) is self:
            del self.runtime.streams[self.stream_sid]
        self.runtime.close_call(self.call_key)
        self.emit(Ended, summary=self.summary())

    def summary(self) -> CallSummary:
        """How the call went, so far: the summary line's fields (CallSummary.line())."""
        tracks = [t for t in self.tracks.values() if t.messages]
        transcripts = [t.transcript for t in tracks if t.transcript]
        played_back, transcribed = self.played_back, self.runtime.transcriber is not None
        return CallSummary(
            self.stream_sid, self.call_sid, self.ended, time.monotonic() - self.started_at,
            tuple(TrackSummary(t.name, t.messages, t.bytes, t.gaps) for t in self.tracks.values()),
            self.duplicates, self.out_of_order, dict(self.bad), played_back.messages, played_back.marks_sent,
            played_back.marks_played, played_back.marks_cancelled, played_back.clears, played_back.unsent,
            audio_dropped=self.audio_dropped if self._audio_in_greenlet else None,
            transcript=sum(t.utterances for t in transcripts) if transcribed else None,
            transcript_dropped=sum(t.dropped for t in transcripts) if transcribed else None,
            alerts=sum(t.alerts for t in transcripts) if transcribed and self.runtime.settings.alerts else None,
            moods={t.track: sum(t.moods) / len(t.moods) for t in transcripts if t.moods} if transcribed else {},
            **talk_figures({t.track: t.spoke for t in transcripts} if transcribed else None,
                           max((t.bytes for t in tracks), default=0) / 8000),
            statuses=tuple(self.statuses),
            recordings=tuple((t.recording.path, t.recording.seconds) for t in tracks if t.recording),
            recordings_stopped=sum(t.recording_stopped for t in self.tracks.values()),
            recording_skipped=sum(t.recording_skipped for t in tracks),
            redacted=(self.keys_masked + sum(t.redactions for t in transcripts)) if self.runtime.settings.redact
            else None,
            hook_errors=dict(self.hook_errors), extra=self.summary_extra())

    def summary_extra(self) -> dict[str, str]:
        """Yours to override: fields of your own for the summary line (and the floor's `end`)."""
        return {}


def talk_figures(spoke: dict[str, list[tuple[int, int]]] | None, seconds: float) -> dict:
    """From when each speaker spoke (ms intervals): each one's talk time, the time both spoke at
    once, and the time nobody did, in seconds; None for each without transcripts."""
    if spoke is None:
        return {"talk": None, "overlap": None, "silence": None}
    edges = sorted((at, step) for intervals in spoke.values() for start, end in intervals
                   for at, step in ((start, 1), (end, -1)))
    speaking, since, anyone, both = 0, 0, 0, 0
    for at, step in edges:
        anyone += at - since if speaking >= 1 else 0
        both += at - since if speaking >= 2 else 0
        speaking, since = speaking + step, at
    return {"talk": {track: sum(end - start for start, end in intervals) / 1000 for track, intervals in spoke.items()},
            "overlap": both / 1000, "silence": max(0.0, seconds - anyone / 1000)}


def handlers_of(stream_class: type[MediaStream]) -> dict:
    """EVENTS with each method looked up: once per class instead of once per message (a name
    the class lacks is refused at start-up: checked_stream_class())."""
    return {event: getattr(stream_class, name, None) for event, name in stream_class.EVENTS.items()}


MediaStream.handlers = handlers_of(MediaStream)


# === Text and audio helpers =================================================================

def first_sentences(text: str, limit: int) -> str:
    """A library's message on one line: its lines joined, cut after the last whole sentence
    within `limit` characters (or at a word)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = " ".join(line if n == len(lines) - 1 or line.endswith((".", "!", "?", ":")) else line + "."
                    for n, line in enumerate(lines))
    text = " ".join(text.split())
    if len(text) <= limit:
        return printable(text, limit)
    cut = text[:limit]
    end = cut.rfind(". ") + 1 or cut.rfind(" ")
    return printable(cut[:end if end > 0 else limit].rstrip() + " ...", limit + 4)


def printable(value: str, limit: int) -> str:
    """At most `limit` characters, none that could break a log line or forge another."""
    return "".join(c if c.isprintable() else "?" for c in value[:limit])


def sid_text(value: str | None) -> str | None:
    """A SID a client sent, made safe to show as one `key=value` field: Twilio's are two letters
    and 32 hex digits; anything but letters, digits, `_`, `-` and `.` becomes `?` (a space
    or `=` would let it forge fields of the summary line)."""
    return None if value is None else re.sub(r"[^A-Za-z0-9_.-]", "?", value[:64])


def safe_name(stream_sid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", stream_sid)[:64]


def quoted(text: str) -> str:
    return printable(text, 500).replace('"', "'")


class LogThrottle:
    """Warnings that any client can cause at will: at most `per_second` lines a second. The
    others are counted, and the count is said in one line a second later."""

    def __init__(self, what: str, per_second: int):
        self.what = what
        self.per_second = per_second
        self.second = self.shown = self.hidden = 0

    def warning(self, message: str, *args) -> None:
        second = int(time.monotonic())
        if second != self.second:
            self.flush()
            self.second, self.shown = second, 0
        if self.shown < self.per_second:
            self.shown += 1
            log.warning(message, *args)
        else:
            self.hidden += 1
            if self.hidden == 1:
                gevent.spawn_later(1, self.flush)

    def flush(self) -> None:
        if self.hidden:
            log.warning("%d more %s not shown (at most %d a second)", self.hidden, self.what, self.per_second)
            self.hidden = 0


def ulaw_to_linear(byte: int) -> int:
    """G.711 mu-law byte to a 16-bit linear sample."""
    byte = ~byte & 0xFF
    magnitude = ((((byte & 0x0F) << 3) + 0x84) << ((byte >> 4) & 0x07)) - 0x84
    return -magnitude if byte & 0x80 else magnitude


ULAW_TO_LINEAR = [ulaw_to_linear(byte) for byte in range(256)]
ULAW_SQUARES = [sample * sample for sample in ULAW_TO_LINEAR]
_PCM_LOW = bytes(sample & 0xFF for sample in ULAW_TO_LINEAR)
_PCM_HIGH = bytes((sample >> 8) & 0xFF for sample in ULAW_TO_LINEAR)
MAX_SILENCE_LEAD_MS = 2_000    # silence a recording may hold beyond the stream's age
WAV_HEADER_BYTES = 44          # what wave writes before the samples of 16-bit mono PCM


def ulaw_to_pcm16(ulaw: bytes) -> bytes:
    """mu-law bytes to 16-bit little-endian PCM, by table (audioop is gone in Python 3.13)."""
    pcm = bytearray(2 * len(ulaw))
    pcm[0::2] = ulaw.translate(_PCM_LOW)
    pcm[1::2] = ulaw.translate(_PCM_HIGH)
    return bytes(pcm)


def linear_to_ulaw(sample: int) -> int:
    """G.711 mu-law encoding of one 16-bit linear sample."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), 32635) + 0x84
    exponent = magnitude.bit_length() - 8
    return ~(sign | exponent << 4 | (magnitude >> (exponent + 3)) & 0x0F) & 0xFF


@functools.cache  # made on first use (a first play(), maybe in the event loop): 2 ms
def ulaw_of_sample() -> bytes:
    """The mu-law byte of each 16-bit sample, indexed by the sample read as unsigned:
    0..32767, then -32768..-1. Made run by run: the samples that share a code are contiguous
    (the code falls as the magnitude grows), so 256 slices, each found by bisection, do what
    65,536 encodings did in 60 ms (the event loop's lateness alarm sounded for them)."""
    table = bytearray(65536)
    for start, last in ((0, 32767), (-32768, -1)):
        while start <= last:
            code, low, high = linear_to_ulaw(start), start, last
            while low < high:  # the last sample with this code
                middle = (low + high + 1) // 2
                low, high = (middle, high) if linear_to_ulaw(middle) == code else (low, middle - 1)
            table[start & 0xFFFF:(low & 0xFFFF) + 1] = bytes([code]) * (low - start + 1)
            start = low + 1
    return bytes(table)


def pcm16_to_ulaw(pcm: bytes) -> bytes:
    """16-bit little-endian PCM to mu-law bytes, by table."""
    return bytes(map(ulaw_of_sample().__getitem__, pcm16_samples(pcm, "H")))


def pcm16_samples(pcm: bytes, typecode: str = "h") -> array:
    """The samples of 16-bit little-endian PCM, signed ("h") or read as unsigned ("H")."""
    samples = array(typecode, pcm[:len(pcm) & ~1])
    if sys.byteorder == "big":
        samples.byteswap()
    return samples


def dbfs(mean_square: float) -> float:
    """RMS in dBFS of samples whose mean square this is; -99 for digital silence."""
    return 10 * math.log10(mean_square / 32768**2) if mean_square else -99.0


def pcm16_dbfs(pcm: bytes) -> float:
    """The level of 16-bit little-endian PCM, as the level meter shows it."""
    samples = pcm16_samples(pcm)
    return dbfs(sum(map(int.__mul__, samples, samples)) / len(samples) if samples else 0)


def level_meter(mean_square: float, width: int = 20) -> str:
    """RMS in dBFS and a bar that fills from -60 dBFS to 0."""
    level = dbfs(mean_square)
    filled = max(0, min(width, round((level + 60) / 60 * width)))
    return f"rms={level:6.1f}dBFS |{'#' * filled}{' ' * (width - filled)}|"


def private(path: str, flags: int) -> int:
    """open()'s opener for recordings and transcripts: readable and writable by this user only."""
    return os.open(path, flags, 0o600)


class WavTrack:
    """One track's recording, written as audio arrives, silence where audio went missing."""

    SILENCE_SLACK = 80  # samples (10 ms): timestamp jitter smaller than this is not a gap

    def __init__(self, path: str, file):
        self.path = path
        self.file = file
        self.samples = 0
        self.silent_samples = 0     # of them, silence written where the timestamps jumped
        self.closed = False
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
                return cls(path, open(path, "xb", opener=private))
            except FileExistsError:
                continue
        raise FileExistsError(f"too many recordings named {name}")

    def silence_before(self, at_sample: int) -> int:
        """The samples of silence write() puts before audio at `at_sample`."""
        missing = at_sample - self.samples
        return missing if missing > self.SILENCE_SLACK else 0

    def write(self, pcm: bytes, at_sample: int) -> None:
        missing = self.silence_before(at_sample)
        if missing:
            self.wav.writeframesraw(bytes(2 * missing))
            self.samples += missing
            self.silent_samples += missing
        self.wav.writeframesraw(pcm)
        self.samples += len(pcm) // 2
        if time.monotonic() - self.flushed_at >= 1.0:  # header sizes right within a second
            self.wav.writeframes(b"")
            self.flushed_at = time.monotonic()

    def silence(self, start: int, end: int) -> None:
        """Samples `start` to `end` (those written so far) made silence, in place: what was said
        there must not be kept. The file stays a valid WAV, the tracks stay aligned."""
        start, end = max(0, start), min(end, self.samples)
        if self.closed or start >= end:
            return
        self.file.seek(WAV_HEADER_BYTES + 2 * start)
        self.file.write(bytes(2 * (end - start)))
        self.file.seek(0, io.SEEK_END)
        self.file.flush()

    @property
    def seconds(self) -> float:
        return self.samples / 8000

    def close(self) -> None:
        self.closed = True
        try:
            self.wav.close()
        finally:
            self.file.close()


# === Settings and the runtime ===============================================================

# --- Settings -------------------------------------------------------------------------------

class SettingsError(Exception):
    """A setting the server cannot work with: one line for the user, exit status 2."""


def number_from(kind: type, low: float, high: float):
    """A reader of whole (int) or decimal (float) numbers from low to high."""
    def read(raw: str):
        try:
            value = kind(raw)
        except ValueError:
            value = math.nan
        if not low <= value <= high:  # NaN fails too
            raise ValueError(f"a {'whole ' if kind is int else ''}number from {low} to {high}")
        return value
    return read


def seconds_or_zero(raw: str) -> float:
    """0 (never), or 1 to 86400 seconds: less would drop a handshake still on its way."""
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value == 0 or 1 <= value <= 86_400):
        raise ValueError("0 (never) or a number of seconds from 1 to 86400")
    return value


def one_of(*choices: str):
    def read(raw: str) -> str:
        if raw.upper() not in choices:
            raise ValueError("one of " + ", ".join(choice.lower() for choice in choices))  # as the README writes them
        return raw.upper()
    return read


def yes_or_no(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("", "0", "false", "no", "off"):
        return False
    raise ValueError("1, true, yes, on, or 0, false, no, off")


def a_name(raw: str) -> str:
    if not raw or not raw.isprintable():
        raise ValueError("a name")
    return raw


def a_path_or_none(raw: str) -> str | None:
    return a_name(raw) if raw else None


def a_model(raw: str) -> str:
    """A Whisper model name (tiny.en), or a path to a model directory that exists."""
    if (os.sep in raw or raw.startswith((".", "~"))) and not os.path.isdir(os.path.expanduser(raw)):
        raise ValueError("a Whisper model name such as tiny.en, or a model directory: there is no such directory")
    return a_name(raw)


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def a_port_or_none(raw: str) -> int | None:
    return number_from(int, 1, 65535)(raw) if raw else None


def a_url_or_none(raw: str) -> str | None:
    """The public URL: https:// or wss:// (or none) and a host Twilio could reach by name."""
    if not raw:
        return None
    scheme = raw.partition("://")[0].lower() if "://" in raw else None
    try:
        hostname = urlsplit(raw if scheme else "//" + raw).hostname or ""
    except ValueError:  # urlsplit's: an unclosed [IPv6 address
        hostname = ""
    if scheme not in (None, "https", "wss", "http", "ws") or not ("." in hostname or ":" in hostname
                                                                  or hostname == "localhost"):
        raise ValueError("a URL with a host, such as https://abc.ngrok.app")
    return raw


def a_web_address_or_none(raw: str) -> str | None:
    """An http:// or https:// URL with a host (a webhook, the floor as people open it)."""
    if not raw:
        return None
    try:
        parts = urlsplit(raw)
        _ = parts.port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or not raw.isprintable() \
            or " " in raw:
        raise ValueError("an http:// or https:// URL with a host, such as https://hooks.slack.com/services/...")
    return raw


def a_redis_url_or_none(raw: str) -> str | None:
    """redis://[:password@]host[:port][/db], rediss:// (TLS) or unix:///path (redis-py's own forms)."""
    if not raw:
        return None
    try:
        parts = urlsplit(raw)
        _ = parts.port  # one that is not a number: ValueError
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("redis", "rediss", "unix") or \
            not (parts.path if parts.scheme == "unix" else parts.hostname):
        raise ValueError("a Redis URL: redis://host:6379/0, rediss://:password@host:6380/0 or unix:///path")
    return raw


def a_phone_number_or_none(raw: str) -> str | None:
    """--dial: what Twilio's <Dial> can reach, a number in E.164 or a SIP URI (sip:user@host)."""
    if raw and not re.fullmatch(r"\+[1-9][0-9]{1,14}|sips?:[^\s<>\"'@]{1,64}@[^\s<>\"'@]{1,200}", raw):
        raise ValueError("a phone number in E.164 (+15551234567) or a SIP URI (sip:agent@example.com)")
    return raw or None


def a_history_file(raw: str) -> str | None:
    """--history: a file (made if need be), `off`, or nothing for the one in the user's data folder."""
    if raw.lower() == "off":
        return None
    if not raw:
        data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
        return os.path.join(data, "mediastreams", "history.sqlite3")
    return a_name(raw)


def an_alerts_file(raw: str) -> "Alerts | None":
    return Alerts.read(raw) if raw else None


TRANSCRIBE_PIP = "pip install faster-whisper==1.2.1 webrtcvad-wheels==2.0.14.post1"
METRICS_PIP = "pip install prometheus-client==0.26.0"
MOOD_PIP = "pip install vaderSentiment==3.3.2"
REDIS_PIP = "pip install redis==8.1.0 hiredis==3.5.0"  # hiredis: redis-py parses replies in C, a third of the CPU

def option(default: str, read: Callable[[str], Any], help_text: str, variable: str | None = None,
           flag: str | None = None) -> Any:
    """A field of Settings that is a flag too: --<its name> (or `flag`: a switch named --no-...
    turns its variable off), its environment variable (its name in capitals unless given), its
    default as it would be typed, the reader that checks it (its ValueError says what it wants)
    and its help."""
    return field(default=read(default), metadata={"default": default, "read": read, "help": help_text,
                                                  "variable": variable, "flag": flag})


@dataclass(frozen=True)
class Settings:
    """Every setting, as read_settings() checked it; nothing changes it afterwards. A field
    made by option() is also a flag and an environment variable: its name, variable, default
    (as it would be typed), reader and help exist here only. Tests build one directly:
    Settings(record=str(tmp_path))."""
    host: str = option("0.0.0.0", a_name, "interface to listen on")
    port: int = option("5000", number_from(int, 0, 65535), "port; 0: any free one (the log says which)")
    log_level: str = option("INFO", one_of("DEBUG", "INFO", "WARNING", "ERROR"), "console detail")
    record: str | None = option("", a_path_or_none,
        "write RECORD_DIR/<streamSid>_<track>.wav for every stream", variable="RECORD_DIR")
    quiet_levels: bool = option("0", yes_or_no, "no live level meter lines")
    public_url: str | None = option("", a_url_or_none,
        "public URL Twilio connects to, e.g. https://abc.ngrok.app, for the signature check; default: "
        "the request's Host")
    max_message_bytes: int = option("65536", number_from(int, 1024, 16 << 20), "largest WebSocket message accepted")
    max_streams: int = option("1000", number_from(int, 1, 100_000), "open streams beyond which new ones get 503")
    idle_timeout: float = option("30", seconds_or_zero,
        "seconds a client may send nothing before it is dropped; 0: never")
    handshake_timeout: float = option("10", number_from(float, 1, 300),
        "seconds a client has to send its whole HTTP request, however slowly it trickles")
    max_recording_seconds: float = option("14400", number_from(float, 1, 86_400),
        "length at which a track's recording stops, with a warning")
    read_interval_ms: float = option("100", number_from(float, 0, 1000),
        "only while this process cannot keep up (its event loop 50 ms late), read each listen-only stream "
        "at most every N ms and handle what gathered in one go: fewer wake-ups, audio up to N ms later; "
        "0: never (a stream that talks back never is)")
    echo: bool = option("0", yes_or_no,
        "play every chunk the caller sends straight back, with a mark every second (<Connect><Stream>)")
    greet: str | None = option("", a_path_or_none,
        "play this WAV file (8000 Hz mono 16-bit) when a stream starts; stop it when the caller talks over it "
        "(<Connect><Stream>)")
    transcribe: bool = option("0", yes_or_no,
        "print what is said on each track, a line per utterance, recognized on this machine by Whisper "
        f"(needs: {TRANSCRIBE_PIP})")
    transcribe_model: str = option("tiny.en", a_model,
        "with --transcribe: a Whisper model name (downloaded by faster-whisper on first use) or a CTranslate2 "
        "model directory")
    transcribe_threads: int = option("1", number_from(int, 1, 64),
        "with --transcribe: batches of utterances recognized at once, each on a native thread and a core of its own")
    transcript_partials: bool = option("0", yes_or_no,
        "with --transcribe: also print the words so far while someone speaks (the floor shows them anyway)")
    alerts: "Alerts | None" = option("", an_alerts_file,
        "with --transcribe: a file of `category: phrase, phrase` lines; a transcript line that says a phrase "
        "raises an alert of its category (a console line, an event, a metric)")
    mood: bool = option("0", yes_or_no,
        "with --transcribe: score each transcript line from -1 (angry, fed up) to +1 (pleased), VADER with a "
        f"call center's own words (needs: {MOOD_PIP})")
    dial: str | None = option("", a_phone_number_or_none,
        "/twiml: connect each caller to this number, in E.164 (<Dial>), or SIP URI (<Sip>) while the call is "
        "streamed; default: a message, "
        "then the call stays up for an hour")
    tracks: str = option("inbound", one_of("INBOUND", "OUTBOUND", "BOTH"),
        "/twiml: the tracks a listening stream gets: inbound (the caller), outbound (what the caller hears), both")
    trusted_proxies: int = option("0", number_from(int, 0, 10),
        "proxies in front of this server (nginx: 1) whose X-Forwarded-For names the client; 0: trust none")
    floor_port: int | None = option("", a_port_or_none,
        "serve the floor, every live call on one page, at http://FLOOR_HOST:FLOOR_PORT/ (and its feed at "
        "/events), a listener of its own")
    history: str | None = option("", a_history_file,
        "with a floor (--floor-port, --floor-only): keep every call it sees in this SQLite file, searchable at "
        "/history; off: keep nothing (default: ~/.local/share/mediastreams/history.sqlite3)")
    history_days: float = option("90", number_from(float, 0, 36_500),
        "calls (and their recordings and transcript files) older than this many days are forgotten; 0: never")
    floor_host: str = option("127.0.0.1", a_name,
        "interface the floor listens on; any but this machine's own needs FLOOR_TOKEN")
    redis_url: str | None = option("", a_redis_url_or_none,
        "publish every call's events to this Redis (the stream mediastreams:events), and show every process's "
        f"calls on the floor (needs: {REDIS_PIP})")
    redis_max_events: int = option("100000", number_from(int, 1000, 100_000_000),
        "with --redis-url: the events the Redis stream keeps, the oldest trimmed (about 300 bytes each)")
    floor_only: bool = option("0", yes_or_no,
        "serve only the floor (--floor-port), of the calls of every process that publishes to --redis-url: "
        "no media port")
    metrics_port: int | None = option("", a_port_or_none,
        "serve Prometheus metrics at http://HOST:METRICS_PORT/metrics, a listener of its own "
        f"(needs: {METRICS_PIP})")
    metrics_host: str = option("127.0.0.1", a_name,
        "interface the metrics port listens on: call counts and alert categories are for your Prometheus only")
    redact: bool = option("1", yes_or_no,
        "keep card numbers, security codes, expiry dates, social security numbers and keyed digits as "
        "said and keyed: no redaction of transcripts, recordings and keys (a warning at start-up)", flag="--no-redact")
    alert_webhook: str | None = option("", a_web_address_or_none,
        "POST each alert (redacted) as JSON to this URL, a Slack or Teams incoming webhook or yours; with "
        "--redis-url, every process's, each by one process")
    floor_url: str | None = option("", a_web_address_or_none,
        "the floor's address as people open it (https://floor.example.com), for the links in alerts; default: "
        "this process's floor, if it serves one")
    floor_token: str | None = None    # FLOOR_TOKEN: what every request to the floor must carry
    alert_webhook_secret: str | None = None  # ALERT_WEBHOOK_SECRET: signs each alert's body (HMAC-SHA256)
    auth_token: str | None = None     # TWILIO_AUTH_TOKEN: only handshakes Twilio signed with it
    stream_class: str | None = None   # STREAM_CLASS: module:Class, your MediaStream subclass


def options_of(settings_class: type = Settings) -> tuple[tuple[str, str, str, Callable[[str], Any], str], ...]:
    """(flag, environment variable, default, reader, help) of each flag, from Settings' fields."""
    return tuple((f.metadata["flag"] or f"--{f.name.replace('_', '-')}", f.metadata["variable"] or f.name.upper(),
                  f.metadata["default"], f.metadata["read"], f.metadata["help"])
                 for f in fields(settings_class) if "read" in f.metadata)


OPTIONS = options_of()


@dataclass(frozen=True)
class Limits:
    """Tuning that no flag sets, in one place: the server runs with these defaults, and a test
    passes its own (create_runtime(limits=...), main(limits=...)) to see a limit at work in a
    second rather than a minute."""
    close_timeout: float = 2           # seconds we wait for the client's side of the closing handshake
    stall_seconds: float = 10          # a client that takes none of what we send for this long is dropped
    caught_up_seconds: float = 5       # an event loop on time this long: every message read as it lands again
    audio_drain_seconds: float = 5     # at a call's end, what its on_audio() may take for the chunks still waiting
    transcript_queue: int = 16         # utterances waiting for recognition, per process; beyond, the oldest is dropped
    transcript_wait_seconds: float = 10  # at a call's end, what its last utterances' recognition may take
    whisper_hint: bool = False         # --alerts' phrases as Whisper's prompt: measured by tests/bench_words.py --hint
    floor_events_kept: int = 10_000    # the feed's latest events, for a client that resumes (Last-Event-ID) ...
    floor_events_bytes: int = 4 << 20  # ... and this much of their JSON (3,000 short calls of 100 parameters: 75 MB)
    floor_ended_kept: int = 200        # ended calls still listed (for FLOOR_ENDED_SECONDS at most)
    floor_client_queue: int = 2000     # events waiting for one feed client; beyond, it is dropped (and resumes)
    floor_silent_seconds: float = 60   # with Redis, an open call none of whose events came for this long is
                                       # ended `lost` (its process was killed, its machine is gone)
    redis_queue: int = 10_000          # events waiting for Redis; beyond, the oldest are dropped (levels beyond half)
    redact_hold_seconds: float = 4     # a transcript line that may go on in the next waits this long for it at most
    key_run_seconds: float = 3         # key presses this close together are a run: only its first is shown
    history_busy_seconds: float = 5    # how long the history's writer waits for a file another program holds
    alert_webhook_seconds: float = 300  # an alert the webhook has not taken this long after it was raised: dropped
    alert_webhook_timeout: float = 10  # one POST to --alert-webhook: no answer within this long is a failure
    alert_lease_seconds: float = 15    # with Redis: a sender that died is replaced by another within this long


def read_settings(argv: list[str] | None = None, environ=os.environ) -> Settings:
    """Every setting from its flag, else its environment variable, else its default, each
    checked; SettingsError names the flag and the variable of a value that cannot work.
    Reads nothing else and changes nothing."""
    parser = argparse.ArgumentParser(
        prog="app.py", description="Receive Twilio Media Streams on /media. Each flag defaults to the "
        "environment variable it names (--port PORT: PORT).",
        epilog="Also from the environment: TWILIO_AUTH_TOKEN, to accept only handshakes Twilio signed with it; "
               "STREAM_CLASS=module:Class, your MediaStream subclass.")
    flagged = [f for f in fields(Settings) if "read" in f.metadata]
    for f, (flag, variable, default, read, help_text) in zip(flagged, OPTIONS):
        if read is yes_or_no:  # a switch: the flag alone turns it on (--no-...: off)
            value = "0" if flag.startswith("--no-") else "1"
            parser.add_argument(flag, dest=f.name, action="store_const", const=value,
                                help=f"{help_text} ({variable}={value})")
        else:
            help_text += f" (default {default})" if default else ""
            parser.add_argument(flag, dest=f.name, metavar=variable, help=help_text)
    given = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    for f, (flag, variable, default, read, _) in zip(flagged, OPTIONS):
        name = f.name
        raw = given[name] if given[name] is not None else environ.get(variable, default)
        try:
            values[name] = read(raw)
        except ValueError as wanted:
            raise SettingsError(f"{flag} ({variable}): {raw!r} is not {wanted}") from None
    token = values["auth_token"] = environ.get("TWILIO_AUTH_TOKEN") or None
    if token and not (token.isprintable() and token.strip() == token):
        raise SettingsError("TWILIO_AUTH_TOKEN: has spaces or control characters: no signature would match")
    values["stream_class"] = environ.get("STREAM_CLASS") or None
    floor_token = values["floor_token"] = environ.get("FLOOR_TOKEN") or None
    if floor_token and not (len(floor_token) >= 16 and re.fullmatch(r"[A-Za-z0-9._~-]+", floor_token)):
        raise SettingsError("FLOOR_TOKEN: at least 16 letters, digits or -._~ (it goes into URLs and a cookie as it is)")
    if values["floor_port"] and not floor_token and not is_loopback(values["floor_host"]):
        raise SettingsError(f"--floor-host (FLOOR_HOST) {values['floor_host']}: the floor shows callers and "
                            "their words; anywhere but 127.0.0.1 it needs FLOOR_TOKEN")
    secret = values["alert_webhook_secret"] = environ.get("ALERT_WEBHOOK_SECRET") or None
    if secret and not (secret.isprintable() and secret.strip() == secret):
        raise SettingsError("ALERT_WEBHOOK_SECRET: has spaces or control characters: a receiver could not match it")
    if values["alert_webhook"] and not (values["alerts"] or values["redis_url"]):
        raise SettingsError("--alert-webhook (ALERT_WEBHOOK) sends alerts: it needs --alerts (ALERTS) here, or "
                            "--redis-url (REDIS_URL) to send every process's")
    if values["floor_only"] and not (values["floor_port"] and values["redis_url"]):
        raise SettingsError("--floor-only (FLOOR_ONLY) serves the floor of the calls other processes publish: "
                            "it needs --floor-port (FLOOR_PORT) and --redis-url (REDIS_URL)")
    if values["redis_url"] and not importlib.util.find_spec("redis"):
        raise SettingsError(f"--redis-url (REDIS_URL) needs the Redis client: {REDIS_PIP}")
    if values["transcribe"] and not all(map(importlib.util.find_spec, ("faster_whisper", "webrtcvad"))):
        raise SettingsError(f"--transcribe (TRANSCRIBE) needs the speech recognizer: {TRANSCRIBE_PIP}")
    if values["alerts"] and not values["transcribe"]:
        raise SettingsError("--alerts (ALERTS) reads what is said: it needs --transcribe (TRANSCRIBE=1)")
    if values["mood"] and not values["transcribe"]:
        raise SettingsError("--mood (MOOD) reads what is said: it needs --transcribe (TRANSCRIBE=1)")
    if values["mood"] and not importlib.util.find_spec("vaderSentiment"):
        raise SettingsError(f"--mood (MOOD) needs VADER's lexicon: {MOOD_PIP}")
    if values["metrics_port"] and not importlib.util.find_spec("prometheus_client"):
        raise SettingsError(f"--metrics-port (METRICS_PORT) needs the Prometheus client: {METRICS_PIP}")
    return Settings(**values)


# --- Runtime: what one process shares -------------------------------------------------------

STREAM_END_SECONDS = 3  # what open streams get at shutdown to end and make their summaries
COUNTS_EVERY_SECONDS = 1  # open calls' counts are sent (Counted) this often, when a sink counts them


@dataclass(eq=False)
class Runtime:
    """What every call of one process shares, made once by create_runtime() and handed to
    what needs it (each stream, its socket, the handshake checks, the transcripts), never
    read from module globals. Call events go through emit() to every sink in `sinks`."""
    settings: Settings
    stream_class: type
    max_streams: int                   # --max-streams, or fewer if this process's file limit cannot carry it
    greeting: bytes = b""              # --greet's audio, as mu-law
    transcriber: Transcriber | None = None
    mood: "Mood | None" = None         # --mood: a transcript line's score
    metrics: Metrics | None = None
    floor: "Floor | None" = None
    publisher: "RedisPublisher | None" = None
    alert_webhook: "AlertWebhook | None" = None
    limits: Limits = field(default_factory=Limits)
    sinks: list[Callable[[CallEvent], None]] = field(default_factory=list)
    open_websockets: set = field(default_factory=set)
    streams: dict = field(default_factory=dict)  # stream SID: the MediaStream open with it
    handshaking: dict = field(default_factory=dict)  # connections sending a request, oldest first: their greenlets
    unfinished_bytes: int = 0          # what half-received messages hold, all streams together
    loop_behind: bool = False          # the event loop is late: listen-only streams are read every --read-interval-ms
    shutting_down: bool = False
    connection_warnings: LogThrottle = field(default_factory=lambda: LogThrottle("warnings about connections", 10))
    stream_warnings: LogThrottle = field(default_factory=lambda: LogThrottle("stream warnings", 200))
    watchers: list = field(default_factory=list)  # the idle sweeper and the event loop's watcher, once needed
    hub: Any = field(default_factory=gevent.get_hub, repr=False)
    pending: deque = field(default_factory=deque)  # events made in the event loop's callback, not delivered yet
    pending_arrived: gevent.event.Event = field(default_factory=gevent.event.Event)
    deliverer: "gevent.Greenlet | None" = None
    counted: bool = False              # a sink wants each open call's counts once a second (Counted): metrics
    levels: bool = True                # a sink shows levels: the console (unless --quiet-levels), the floor, Redis
    partials: bool = False             # a sink shows the words so far: the floor, Redis, --transcript-partials
    calls: dict = field(default_factory=dict)  # call_key: each open call's MediaStream
    call_keys: Any = field(default_factory=itertools.count, repr=False)
    event_numbers: Any = field(default_factory=itertools.count, repr=False)
    counter: "gevent.Greenlet | None" = None

    def open_call(self, stream: MediaStream) -> int:
        """A call begins: its key, which its events carry."""
        key = next(self.call_keys)
        self.calls[key] = stream
        if self.counted and self.counter is None:
            self.counter = gevent.spawn(self.count_open_calls)
        return key

    def close_call(self, key: int) -> None:
        self.calls.pop(key, None)

    def count_open_calls(self) -> None:
        """Each open call's counts so far, as an event (Counted), every COUNTS_EVERY_SECONDS."""
        while True:
            gevent.sleep(COUNTS_EVERY_SECONDS)
            for n, stream in enumerate(list(self.calls.values()), 1):
                stream.emit(Counted, summary=stream.summary())
                if n % 100 == 0:
                    gevent.sleep(0)  # 1000 calls' counts in one go would hold up their audio for 10 ms

    def emit(self, event: CallEvent) -> None:
        """Hand `event` to every sink, in the order events were made. An event made in the
        event loop's own callback (a first chunk, a level, a warning about a media message)
        is delivered from a greenlet instead: a sink (a logging handler of yours) may wait."""
        if gevent.getcurrent() is self.hub:
            self.pending.append(event)
            if self.deliverer is None:
                self.deliverer = gevent.spawn(self.deliver_pending_events)
            self.pending_arrived.set()
            return
        while self.pending:
            self.deliver(self.pending.popleft())
        self.deliver(event)

    def deliver(self, event: CallEvent) -> None:
        for sink in self.sinks:
            sink(event)

    def deliver_pending_events(self) -> None:
        while True:
            self.pending_arrived.wait()
            self.pending_arrived.clear()
            while self.pending:
                try:
                    self.deliver(self.pending.popleft())
                except Exception as exc:  # a sink's bug: the next events are still delivered
                    log.warning("delivering a call event: %s: %s", type(exc).__name__, printable(str(exc), 200))

    def watch(self) -> None:
        """The idle sweeper and the event loop's watcher, started with the first stream."""
        if not self.watchers:
            if self.settings.idle_timeout > 0:
                self.watchers.append(gevent.spawn(sweep_idle_websockets, self))
            if self.settings.read_interval_ms > 0:
                self.watchers.append(gevent.spawn(watch_the_event_loop, self))

    def end_open_streams(self, why: str) -> None:
        """New streams are refused; each open one makes its summary (ended=shutdown), closed with 1001."""
        self.shutting_down = True
        log.info("%s: shutting down, %d open stream(s)", why, len(self.open_websockets))
        try:
            gevent.killall([ws.greenlet for ws in self.open_websockets], block=True, timeout=STREAM_END_SECONDS)
        except gevent.Timeout:  # a slow finish() of your own: stop anyway
            log.warning("%d stream(s) still ending after %d s: stopping without waiting for them",
                        len(self.open_websockets), STREAM_END_SECONDS)


def create_runtime(settings: Settings, stream_class: type | None = None, *, limits: Limits = Limits(),
                   recognize: Callable[[bytes], str] | None = None, max_streams: int | None = None) -> Runtime:
    """A process's runtime, for these settings and limits: your stream class (`stream_class`,
    else STREAM_CLASS, else MediaStream) checked, the greeting read, the recording directory
    checked, the recognizer loaded (`recognize` instead of Whisper: tests) and the sinks made.
    `max_streams`: what reserve_file_descriptors() found this process can carry. Raises
    SettingsError, with one line for the user."""
    chosen = checked_stream_class(stream_class, "stream_class") if stream_class else \
        load_stream_class(settings.stream_class)
    greeting = read_greeting(settings.greet)
    serving = talking_back_mode(settings, chosen)
    check_record_dir(settings.record)
    transcriber = None
    if settings.transcribe:
        hint = ", ".join(phrase for _, phrases in settings.alerts.categories for phrase, _ in phrases) \
            if settings.alerts and limits.whisper_hint else ""
        recognizer = recognize or WhisperRecognizer(settings.transcribe_model, settings.transcribe_threads, hint)
        transcriber = Transcriber(recognizer, settings.transcribe_threads, limits.transcript_queue)
    metrics = Metrics() if settings.metrics_port else None
    runtime = Runtime(settings, serving or MediaStream, max_streams or settings.max_streams, greeting, transcriber,
                      Mood() if settings.mood else None, metrics, limits=limits, counted=metrics is not None)
    runtime.sinks.append(Console(runtime.stream_warnings, quiet_levels=settings.quiet_levels,
                                 partials=settings.transcript_partials))
    if metrics:
        runtime.sinks.append(metrics)
    server = f"{socket.gethostname()}:{os.getpid()}"
    if settings.redis_url:
        give_redis_gevent_sockets()
    if settings.floor_port:
        history = History(settings.history, settings.history_days, limits) if settings.history else None
        if history is not None:
            history.open()
        runtime.floor = Floor(server, limits, history)
    if settings.redis_url and not settings.floor_only:  # every floor, this one too, reads them from Redis
        runtime.publisher = RedisPublisher(settings.redis_url, server, settings.redis_max_events, metrics,
                                           limits.redis_queue)
        runtime.sinks.append(runtime.publisher)
    elif runtime.floor:
        runtime.sinks.append(runtime.floor)
    if transcriber and settings.record:
        runtime.sinks.append(TranscriptFiles(settings.record, runtime.stream_warnings))
    if settings.alert_webhook:
        floor_url = settings.floor_url or (settings.floor_port and f"http://{url_host(settings.floor_host)}:"
                                                                  f"{settings.floor_port}")
        runtime.alert_webhook = AlertWebhook(settings.alert_webhook, settings.alert_webhook_secret, floor_url or None,
                                             server, settings.redis_url, metrics, limits,
                                             history=bool(settings.floor_url or settings.history))
        runtime.sinks.append(runtime.alert_webhook)
    runtime.levels = not settings.quiet_levels or runtime.floor is not None or runtime.publisher is not None
    runtime.partials = settings.transcript_partials or runtime.floor is not None or runtime.publisher is not None
    return runtime


def load_stream_class(name: str | None) -> type:
    """STREAM_CLASS, `module:Class`: the MediaStream subclass gunicorn's workers use."""
    if not name:
        return MediaStream
    module_name, _, class_name = name.partition(":")
    if not module_name or not class_name:
        raise SettingsError(f"STREAM_CLASS: {name!r} is not module:Class, such as process_audio:Transcribing")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # whatever the user's module raises: one line, no traceback
        raise SettingsError(f"STREAM_CLASS: cannot load {name!r}: {type(exc).__name__}: {exc}") from None
    stream_class = getattr(module, class_name, None)
    if stream_class is None:  # the module's own name, not __main__'s when it is app.py itself
        raise SettingsError(f"STREAM_CLASS: cannot load {name!r}: module {module_name!r} has no {class_name!r}")
    return checked_stream_class(stream_class, f"STREAM_CLASS: {name!r}")


HOOKS = {"setup": (), "on_audio": ("track", "timestamp", "pcm"), "on_mark_echo": ("name", "cancelled", "waited_ms")}


def checked_stream_class(stream_class, name: str) -> type:
    """Your class, refused at start-up with one line where a mistake can be seen in it
    already, rather than costing calls: not a MediaStream, an EVENTS entry naming no method,
    a hook or event method that cannot take what the server hands it, a constructor that
    cannot take the server's arguments."""
    if not (isinstance(stream_class, type) and issubclass(stream_class, MediaStream)):
        raise SettingsError(f"{name} is not a subclass of app.MediaStream")
    class_name = stream_class.__name__
    for event, method_name in stream_class.EVENTS.items():
        if not callable(getattr(stream_class, method_name, None)):
            raise SettingsError(f"{name}: {class_name}.EVENTS names {method_name!r} for {event!r}, but "
                                f"{class_name} has no such method")
    calls = {method_name: ("data",) for method_name in stream_class.EVENTS.values()} | HOOKS
    for method_name, arguments in calls.items():
        try:
            inspect.signature(getattr(stream_class, method_name)).bind(None, *arguments)
        except TypeError:
            takes = "".join(", " + argument for argument in arguments)
            raise SettingsError(f"{name}: {class_name}.{method_name}() must take (self{takes})") from None
        except ValueError:  # no signature to read (a builtin): trust it
            pass
    try:
        inspect.signature(stream_class).bind(None, remote="", ws=None)
    except TypeError:
        raise SettingsError(f"{name}: {class_name}() must take (runtime, remote=, ws=) as app.MediaStream does: set "
                            "per-call state up in setup(), not __init__") from None
    return stream_class


def find_stream_class_module(name: str | None) -> None:
    """STREAM_CLASS's module exists, checked where your code should not run (gunicorn's
    master): only its parent package, if it has one, is imported."""
    module_name = (name or "").partition(":")[0]
    try:
        found = not module_name or importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise SettingsError(f"STREAM_CLASS: cannot load {name!r}: no module named {module_name!r}")


def stream_class_checked_apart(name: str | None, environ: dict, paths: list[str]) -> None:
    """gunicorn's master: STREAM_CLASS loaded and checked in a child process (the master runs no
    code of yours), so that a class that cannot be loaded stops gunicorn with its one line
    before any worker boots: two workers failing at once made gunicorn print a HaltServer
    traceback (3 runs in 10)."""
    if not name:
        return
    code = ("import sys; sys.path[:0] = sys.argv[2:]; import app\n"
            "try: app.load_stream_class(sys.argv[1])\n"
            "except app.SettingsError as error: print(error); sys.exit(2)")
    where = [*paths, os.path.dirname(os.path.abspath(__file__))]  # where gunicorn's workers import from
    done = subprocess.run([sys.executable, "-c", code, name, *where], env=environ, capture_output=True, text=True,
                          timeout=60)
    if done.returncode:
        raise SettingsError(done.stdout.strip() or f"STREAM_CLASS: cannot load {name!r}: "
                            f"{first_sentences(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else '?', 200)}")


def talking_back_mode(settings: Settings, stream_class: type | None) -> type | None:
    """The stream class to serve: --echo's or --greet's, or your class, which may subclass
    the one its mode names; each decides what a stream plays back. None: not known yet."""
    modes = [(flag, mode) for flag, mode, on in (("--echo", EchoStream, settings.echo),
                                                  ("--greet", GreetStream, settings.greet)) if on]
    if len(modes) > 1:
        raise SettingsError("--echo and --greet: choose one, each decides what the stream plays back")
    if stream_class and issubclass(stream_class, GreetStream) and not settings.greet:
        raise SettingsError(f"{stream_class.__name__} plays a greeting: give it one with --greet (GREET)")
    if not modes:
        return stream_class
    flag, mode = modes[0]
    if stream_class and stream_class is not MediaStream and not issubclass(stream_class, mode):
        raise SettingsError(f"{flag} and your stream class {stream_class.__name__}: choose one, or subclass "
                            f"app.{mode.__name__}")
    return stream_class if stream_class and issubclass(stream_class, mode) else mode


@functools.lru_cache(maxsize=4)  # read once: gunicorn's workers, forked later, use the master's copy
def read_greeting(path: str | None) -> bytes:
    """--greet's WAV file as mu-law, read once at start-up: a file that is not there or not
    8000 Hz mono 16-bit PCM stops the server with the command that converts it."""
    if not path:
        return b""
    convert = f"it must be 8000 Hz mono 16-bit PCM: sox {shlex.quote(path)} -r 8000 -c 1 -b 16 greeting.wav"
    try:
        with wave.open(path, "rb") as wav:
            found = (wav.getframerate(), wav.getnchannels(), wav.getsampwidth())
            pcm = wav.readframes(wav.getnframes())
    except OSError as exc:
        raise SettingsError(f"--greet (GREET): cannot read {path!r}: {exc.strerror or exc}") from None
    except (EOFError, wave.Error) as exc:  # not a WAV file, or mu-law, float, extensible...
        why = str(exc) or "it ends before a WAV header does"  # EOFError() says nothing
        raise SettingsError(f"--greet (GREET): {path!r} is not PCM audio ({why}); {convert}") from None
    if found != (8000, 1, 2):
        raise SettingsError(f"--greet (GREET): {path!r} is {found[0]} Hz, {found[1]} channel(s), "
                            f"{8 * found[2]}-bit; {convert}")
    if not pcm:
        raise SettingsError(f"--greet (GREET): {path!r} holds no audio")
    return pcm16_to_ulaw(pcm)


def check_record_dir(path: str | None) -> None:
    """Fail at start-up, not on the first call, when recordings cannot be written."""
    if not path:
        return
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)  # recordings are calls: for the server's user only
        with tempfile.TemporaryFile(dir=path) as probe:
            probe.write(b"probe")
    except OSError as exc:
        raise SettingsError(f"--record (RECORD_DIR): cannot write recordings to {path!r}: "
                            f"{exc.strerror or exc}. Pick another directory or fix its permissions.") from None


def runtime_of(flask_app: Flask) -> Runtime:
    """The runtime install() gave the app: main() and each gunicorn worker make one."""
    return flask_app.extensions["mediastreams"]


def install(runtime: Runtime) -> None:
    app.extensions["mediastreams"] = runtime


# === HTTP: the other routes, Twilio's webhooks, who may stream ==============================

# --- The app's other routes -----------------------------------------------------------------

@app.route("/")
def index():
    public_url = runtime_of(current_app).settings.public_url
    if public_url:
        where = f"wss://{public_host(public_url)}/media (--public-url)"
    else:  # a browser may have come through ngrok (TLS) or straight here (no TLS): Twilio needs the first
        where = (f"wss://{request.host}/media through a TLS proxy such as ngrok (Twilio connects only to wss://), "
                 f"ws://{request.host}/media without one")
    return f"Twilio Media Streams server is up. WebSocket: {where}\n", 200, {"Content-Type": "text/plain"}


@app.route("/healthz")
def healthz():
    """For a load balancer: 503 while this process would refuse a new call, so it sends none here."""
    runtime = runtime_of(current_app)
    if runtime.shutting_down:
        return "shutting down\n", 503, {"Content-Type": "text/plain"}
    streams = len(runtime.open_websockets)
    if streams >= runtime.max_streams:
        return f"full streams={streams} (--max-streams)\n", 503, {"Content-Type": "text/plain"}
    return f"ok streams={streams}\n", 200, {"Content-Type": "text/plain"}


@app.route("/media")
def media_without_upgrade():
    return (f"/media is a WebSocket endpoint: use <Stream url=\"wss://{request.host}/media\"/> "
            "in TwiML, not a browser.\n", 426, {"Content-Type": "text/plain", "Upgrade": "websocket"})


# --- Twilio's voice webhook: the TwiML for how this server runs ------------------------------

WEBHOOK_ROUTES = ("/twiml", "/stream-status")  # the only routes that take a body: Twilio's webhooks, as forms
WEBHOOK_BODY_BYTES = 16384    # Twilio's fields come to one or two KiB; a larger body is refused
WEBHOOK_FIELDS = 100          # Twilio's voice webhook has about 30 fields, a status callback 12; more are refused
CALL_FIELDS = ("From", "To", "CallSid", "Direction")  # passed on to the stream as <Parameter>s
TWIML_STREAM_SECONDS = 3600   # without --dial, how long a call that is only listened to stays up


def webhook_refusal(runtime: Runtime) -> tuple[str, int, dict] | None:
    """With TWILIO_AUTH_TOKEN: 403 unless X-Twilio-Signature signs https://<public host><path>
    (with the query, with and without the default port) and the POSTed fields."""
    token = runtime.settings.auth_token
    if not token:
        return None
    host = public_host(runtime.settings.public_url) or request.host
    query = "?" + request.query_string.decode("latin-1") if request.query_string else ""
    given = request.headers.get("X-Twilio-Signature", "")
    if signature_is_valid(token, host, request.path + query, given, "https", list(request.form.items(multi=True))):
        return None
    why = "a wrong X-Twilio-Signature" if given else "no X-Twilio-Signature"
    runtime.connection_warnings.warning("refused webhook remote=%s path=%s status=403 reason=%s", request.remote_addr,
                                        request.path, why)
    return "the signature does not match (TWILIO_AUTH_TOKEN)\n", 403, {"Content-Type": "text/plain"}


def not_a_form(runtime: Runtime) -> tuple[str, int, dict] | None:
    if request.method == "POST" and request.mimetype != "application/x-www-form-urlencoded":
        runtime.connection_warnings.warning("bad webhook remote=%s path=%s status=415 reason=not a form (%s)",
                                            request.remote_addr, request.path,
                                            printable(request.mimetype or "no type", 60))
        return "Twilio's webhook is a form: application/x-www-form-urlencoded\n", 415, {"Content-Type": "text/plain"}
    return None


def twiml_for(settings: Settings, talks_back: bool, host: str, call: dict[str, str]) -> str:
    """The TwiML that streams a call here: <Connect><Stream> when this server talks back,
    else <Start><Stream> and what keeps the call going. Every value is escaped."""
    parameters = "".join(f"<Parameter name={xml_attribute(name)} value={xml_attribute(call[name])}/>"
                         for name in CALL_FIELDS if call.get(name))
    url, status = xml_attribute(f"wss://{host}/media"), xml_attribute(f"https://{host}/stream-status")
    if talks_back:  # nothing follows <Connect>: when the stream closes, the call ends
        return f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url={url} statusCallback={status}>' \
               f"{parameters}</Stream></Connect></Response>"
    track = xml_attribute(settings.tracks.lower() + "_track" if settings.tracks != "BOTH" else "both_tracks")
    dial = settings.dial and (f"<Sip>{xml_text(settings.dial)}</Sip>" if settings.dial.startswith("sip")
                              else xml_text(settings.dial))  # a SIP URI is only dialled as <Sip>
    then = f"<Dial>{dial}</Dial>" if dial else \
        (f"<Say>This call is being streamed. It stays up for an hour, or until you hang up.</Say>"
         f'<Pause length="{TWIML_STREAM_SECONDS}"/>')
    return f'<?xml version="1.0" encoding="UTF-8"?><Response><Start><Stream url={url} track={track} ' \
           f"statusCallback={status}>{parameters}</Stream></Start>{then}</Response>"


@app.route("/twiml", methods=["GET", "POST"])
def twiml():
    """Twilio's voice webhook ("A call comes in"): the TwiML that streams the call here."""
    runtime = runtime_of(current_app)
    refused = not_a_form(runtime) or webhook_refusal(runtime)
    if refused:
        return refused
    fields = request.form if request.method == "POST" else request.args
    call = {name: printable(fields.get(name, ""), 200) for name in CALL_FIELDS}
    host = public_host(runtime.settings.public_url) or request.host
    talks_back = bool(getattr(runtime.stream_class, "talks_back", False))
    log.info("twiml call=%s from=%s: %s to wss://%s/media", printable(call["CallSid"] or "-", 40),
             "given" if call["From"] else "-", "<Connect><Stream>" if talks_back else "<Start><Stream>", host)
    return twiml_for(runtime.settings, talks_back, host, call), 200, {"Content-Type": "text/xml"}


STREAM_EVENTS = ("stream-started", "stream-stopped", "stream-error")  # StreamEvent's values; others count as other


@app.route("/stream-status", methods=["POST"])
def stream_status():
    """Twilio's stream status callback (<Stream statusCallback=…>): a line, a count, and, for
    a stream open here, an event and a word in its summary. A stream-error for a stream that
    never reached this server is how its handshake's failure is seen at all."""
    runtime = runtime_of(current_app)
    refused = not_a_form(runtime) or webhook_refusal(runtime)
    if refused:
        return refused
    sid = sid_text(request.form.get("StreamSid", "")) or "-"
    event = request.form.get("StreamEvent", "")
    error = request.form.get("StreamError") or None
    shown = printable(event, 40) or "-"
    log.log(logging.WARNING if event == "stream-error" else logging.INFO, "stream=%s status event=%s call=%s%s", sid,
            shown, sid_text(request.form.get("CallSid", "")) or "-", f' error="{quoted(error)}"' if error else "")
    if runtime.metrics:
        runtime.metrics.stream_status.labels(event if event in STREAM_EVENTS else "other").inc()
    stream = runtime.streams.get(sid)
    if stream is not None:
        stream.statuses.append(shown)
        stream.emit(StatusCallback, event=shown, error=error and printable(error, 500))
    return "", 204


# --- Who may stream: the handshake checks -------------------------------------------------

def refusal(runtime: Runtime, environ: dict) -> tuple[str, str, str] | None:
    """(HTTP status, kind, reason) for a WebSocket handshake we refuse before the 101, else None:
    one that breaks RFC 6455 4.2.1 (gevent-websocket would answer it with a traceback or a
    garbled status), or one that Twilio did not sign, or one over a limit."""
    if environ.get("REQUEST_METHOD") != "GET":
        return "405 Method Not Allowed", "not_get", "a WebSocket handshake is a GET"
    if environ.get("SERVER_PROTOCOL") != "HTTP/1.1":
        return "400 Bad Request", "not_http11", "a WebSocket handshake is an HTTP/1.1 request"
    if "upgrade" not in environ.get("HTTP_CONNECTION", "").lower():
        return "400 Bad Request", "no_upgrade", "Connection: Upgrade missing"
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION") != "13":
        return "426 Upgrade Required", "websocket_version", "Sec-WebSocket-Version must be 13"
    try:
        key_length = len(base64.b64decode(environ.get("HTTP_SEC_WEBSOCKET_KEY", ""), validate=True))
    except binascii.Error:
        key_length = 0
    if key_length != 16:
        return "400 Bad Request", "websocket_key", "Sec-WebSocket-Key is not 16 bytes in base64"
    path = environ.get("PATH_INFO", "")
    if not sockets.url_map.bind("localhost", url_scheme="ws").test(path):
        return "404 Not Found", "path", "no WebSocket route here (Twilio's <Stream> URL must end in /media)"
    settings = runtime.settings
    if settings.auth_token:
        signature = environ.get("HTTP_X_TWILIO_SIGNATURE")
        if not signature:
            return "403 Forbidden", "no_signature", "missing X-Twilio-Signature"
        host = public_host(settings.public_url) or environ.get("HTTP_HOST", "")
        query = environ.get("QUERY_STRING")
        if not signature_is_valid(settings.auth_token, host, path + ("?" + query if query else ""), signature):
            return ("403 Forbidden", "bad_signature",
                    f"X-Twilio-Signature does not match wss://{printable(host + path, 200)}")
    if runtime.shutting_down:
        return "503 Service Unavailable", "shutting_down", "the server is shutting down"
    if len(runtime.open_websockets) >= runtime.max_streams:
        return ("503 Service Unavailable", "max_streams",
                f"{runtime.max_streams} streams open already (--max-streams)")
    return None


def forwarded_client(environ: dict, proxies: int) -> str | None:
    """The client's address as the outermost of our `proxies` trusted proxies saw it: the
    proxies-th address from the right of X-Forwarded-For (each proxy appends the address it
    got the request from), as Werkzeug's ProxyFix(x_for=proxies). None if there are fewer."""
    addresses = [address.strip() for address in environ.get("HTTP_X_FORWARDED_FOR", "").split(",")]
    if len(addresses) < proxies:
        return None
    try:
        address = ipaddress.ip_address(addresses[-proxies])
    except ValueError:
        return None
    return None if getattr(address, "scope_id", None) else str(address)  # "fe80::1%<any text>": no


def twilio_signature(auth_token: str, url: str, fields: Sequence[tuple[str, str]] = ()) -> str:
    """X-Twilio-Signature: HMAC-SHA1, base64, of the URL (a WebSocket handshake's alone),
    then a webhook's POSTed fields, name and value, sorted by name and a name's values
    sorted too (twilio-python's RequestValidator.compute_signature)."""
    return signature_of(auth_token, url + signed_fields(fields))


def signed_fields(fields: Sequence[tuple[str, str]]) -> str:
    """A webhook's fields as its signature covers them, in one pass (grouped by name, not a scan
    of every field for each name: a refusal must cost no more than the fields it was sent)."""
    by_name: dict[str, set[str]] = {}
    for name, value in fields:
        by_name.setdefault(name, set()).add(value)
    return "".join(name + value for name in sorted(by_name) for value in sorted(by_name[name]))


def signature_of(auth_token: str, signed: str) -> str:
    digest = hmac.new(auth_token.encode(), signed.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def signature_is_valid(auth_token: str, host: str, path: str, signature: str, scheme: str = "wss",
                       fields: Sequence[tuple[str, str]] = ()) -> bool:
    """Checks scheme://host/path (a handshake's wss://, a webhook's https:// with its fields)
    as given, without its port and with the default one, as Twilio's own validator accepts
    either; every candidate is compared in constant time."""
    name, colon, port = host.rpartition(":")
    hostname = name if colon and port.isdigit() else host
    given = signature.encode("latin-1", "replace")
    fields_part = signed_fields(fields)  # once, for the three candidates
    valid = False
    for where in {host, hostname, hostname + ":443"}:
        valid |= hmac.compare_digest(signature_of(auth_token, f"{scheme}://{where}{path}{fields_part}").encode(), given)
    return valid


def public_host(public_url: str | None) -> str | None:
    """The host[:port] of --public-url, which may be given with or without a scheme."""
    if not public_url:
        return None
    return urlsplit(public_url if "//" in public_url else "//" + public_url).netloc


# === Optional features, each switched on by a flag ==========================================

# --- Talking back: the ready modes of a <Connect><Stream> ----------------------------------

class EchoStream(MediaStream):
    """--echo: the caller hears themselves, each chunk as it arrives, with a mark every
    second that says when Twilio played it: the first test of a bidirectional stream."""
    talks_back = True

    def on_media(self, data: dict) -> None:
        inbound = self.tracks["inbound"]
        received = inbound.messages
        super().on_media(data)
        if inbound.messages > received:  # a chunk of the caller's, taken (not bad, not a duplicate)
            # Its own mu-law, checked already: encoding it from PCM again would cost 10 us a chunk.
            self.play_ulaw(binascii.a2b_base64(data["media"]["payload"]))
            if inbound.messages % 50 == 0:
                self.mark(f"second-{inbound.messages // 50}")


BARGE_IN_DBFS = -35.0  # inbound louder than this ... (speech on a phone line is about -30 to -15, a quiet line -60)
BARGE_IN_MS = 200      # ... for this long while the greeting plays: the caller talks over it


@dataclass(eq=False)
class GreetStream(MediaStream):
    """--greet FILE.wav: plays the greeting when the stream starts, with a mark at its end;
    a caller who talks over it (barge-in) cuts it off with a clear."""
    talks_back = True
    loud_ms: int = 0
    barge_ins: int = 0

    def on_start(self, data: dict) -> None:
        super().on_start(data)
        self.play_ulaw(self.runtime.greeting)
        self.mark("greeting")

    def on_audio(self, track: str, timestamp: int, pcm: bytes) -> None:
        if track != "inbound" or not self.queued_seconds:
            self.loud_ms = 0
            return
        self.loud_ms = self.loud_ms + len(pcm) // 16 if pcm16_dbfs(pcm) > BARGE_IN_DBFS else 0
        if self.loud_ms >= BARGE_IN_MS:
            self.loud_ms = 0
            self.barge_ins += 1
            self.emit(BargeIn, queued_seconds=self.queued_seconds)
            self.clear()

    def summary_extra(self) -> dict[str, str]:
        return {"barge_ins": str(self.barge_ins)}


# --- Transcripts (--transcribe): a recognizer on this machine, imported only when switched on ---

FRAME_BYTES = 320            # 20 ms of 8 kHz 16-bit PCM: what voice activity is decided on
SPEECH_END_MS = 500          # this much non-speech after speech ends an utterance
PREROLL_MS = 200             # audio kept from before speech is heard: the first syllable's onset
MIN_SPEECH_MS = 200          # less voiced audio than this is a click or a breath: not recognized
MAX_UTTERANCE_SECONDS = 10   # longer speech is cut into pieces this long
PARTIAL_AFTER_MS = 2000      # speech longer than this shows its words so far (the floor, the feed) ...
PARTIAL_EVERY_MS = 1000      # ... this often
PARTIAL_SHARE = 0.25         # partials' recognition time, at most this share of whole utterances' ...
PARTIAL_ALLOWANCE_SECONDS = 3  # ... and this: on a quiet server, a 10 s sentence is shown growing throughout
TRACK_QUEUE = 3              # ... and per track: one track sending faster than it is heard crowds out no other
# Whisper's window: the utterance plus 4 s, in steps of 2 s (6, 8 ... 14 s), where the stock 30 s
# costs 3x for the same words; with less padding it says a sentence twice more often, or misses
# more words (tests/README.md has the figures).
WINDOW_PADDING_SECONDS, WINDOW_STEP_SECONDS = 4, 2
BATCH = 8                    # utterances of one window size recognized in one pass of the model
BEAM = 5                     # whole lines (greedy decoding loses 6 points of accuracy); partials: greedy


@dataclass(eq=False)
class Utterance:
    transcript: "TrackTranscript"
    at: float                 # seconds from the stream's first audio
    pcm: bytes                # 8 kHz 16-bit
    partial: bool = False     # the words so far of an utterance still being said (its index is the one it will have)
    index: int = -1           # a whole one's place among its track's: their lines are made in this order
    seconds: float = 0.0      # how long its speaker spoke (first voiced frame to last)
    window: int = 0           # the recognizer's batches hold utterances of one window size


class WhisperRecognizer:
    """Whisper (faster-whisper on CTranslate2): the words in 8 kHz 16-bit speech, a batch at a
    time. Loaded at start-up, where a model that cannot load stops the server with one line."""

    def __init__(self, model_name: str, threads: int, hint: str = ""):
        import numpy
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer
        self.numpy = numpy
        try:
            # int8: a quarter of the memory, and faster on a CPU; one core for each recognition
            self.whisper = WhisperModel(model_name, device="cpu", compute_type="int8", cpu_threads=1,
                                        num_workers=threads)
            self.tokenizer = Tokenizer(self.whisper.hf_tokenizer, self.whisper.model.is_multilingual,
                                       task="transcribe", language="en")
            # `hint`: text as if said just before (Whisper's prompt), which makes its words likelier
            self.prompt = [self.tokenizer.sot_prev, *self.tokenizer.encode(" " + hint)[-223:]] if hint else []
            self.batch([bytes(8000)])  # a broken model fails here, not on the first call
        except Exception as exc:  # whatever faster-whisper, huggingface_hub or CTranslate2 raise
            hint = "" if os.path.isdir(os.path.expanduser(model_name)) else \
                " (a model name is downloaded from huggingface.co on first use; offline, give a model directory)"
            raise SettingsError(f"--transcribe-model (TRANSCRIBE_MODEL): cannot load {model_name!r}{hint}: "
                                f"{type(exc).__name__}: {first_sentences(str(exc), 300)}") from None

    @staticmethod
    def window(pcm_bytes: int) -> int:
        """The window, in seconds, of an utterance this long: what it is batched by."""
        seconds = pcm_bytes / 16000 + WINDOW_PADDING_SECONDS
        return min(30, WINDOW_STEP_SECONDS * math.ceil(seconds / WINDOW_STEP_SECONDS))

    def batch(self, pcms: list[bytes], partial: bool = False) -> list[str]:
        """On a native thread: one encoder pass over the batch's windows, then their words
        decoded together. An utterance's words do not depend on what it is batched with."""
        import ctranslate2
        from faster_whisper.audio import pad_or_trim
        np = self.numpy
        window = max(self.window(len(pcm)) for pcm in pcms)
        features = []
        for pcm in pcms:
            samples = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768
            audio = np.interp(np.arange(2 * len(samples)) / 2, np.arange(len(samples)), samples).astype(np.float32)
            features.append(pad_or_trim(self.whisper.feature_extractor(audio), 100 * window))
        encoded = self.whisper.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(features)))
        prompt = [*self.prompt, *self.tokenizer.sot_sequence, self.tokenizer.no_timestamps]
        longest = len(self.prompt) + 20 + 10 * (window - WINDOW_PADDING_SECONDS)  # tokens: the window's, not the batch's
        results = self.whisper.model.generate(encoded, [prompt] * len(pcms), beam_size=1 if partial else BEAM,
                                              suppress_blank=True, suppress_tokens=[-1], max_length=longest)
        return [without_repeats(self.tokenizer.decode([token for token in result.sequences_ids[0]
                                                       if token < self.tokenizer.eot]).strip()) for result in results]


def without_repeats(text: str) -> str:
    """Whisper's words without the sentence it said again (and again) to fill its window: "Help
    the woman get back to her feet. Help the woman". What repeats must be 4 words or more, 3 of
    them different: "one one one one" of a card number is what was said."""
    words = text.split()
    plain = [re.sub(r"[^\w']", "", word.lower()) for word in words]
    for period in range(4, len(words) - 2):
        if len(set(plain[:period])) >= 3 and all(plain[n] == plain[n - period] for n in range(period, len(words))):
            return " ".join(words[:period])
    return text


class Transcriber:
    """One per process: utterances wait in one bounded queue and are recognized a batch at a
    time (the oldest whole utterance and up to BATCH-1 more of its window size) on native
    threads, which CTranslate2 lets run without the GIL, so no call's greenlet waits for it.
    A lone utterance is never held back for company: it waits at most for the batch being
    recognized. When recognition falls behind the oldest waiting one is dropped and counted.
    `recognize`: WhisperRecognizer, or a test's own (pcm -> text, one at a time)."""

    def __init__(self, recognize: Callable[[bytes], str] | WhisperRecognizer, threads: int,
                 queue_size: int = Limits.transcript_queue):
        self.queue_size = queue_size
        self.recognize_batch: Callable[[list[bytes], bool], list[str]] = getattr(recognize, "batch", None) or \
            (lambda pcms, partial: [recognize(pcm) for pcm in pcms])  # type: ignore[operator]
        self.window: Callable[[int], int] = getattr(recognize, "window", None) or (lambda size: 0)
        self.threads = gevent.threadpool.ThreadPool(threads)
        self.waiting: deque[Utterance] = deque()
        self.arrived = gevent.event.Event()
        self.spent = {False: 0.0, True: 0.0}  # seconds recognizing whole utterances and partials, halved each minute
        self.last_partials = 0.0              # what the last batch of partials took: the next is charged it up front
        self.spent_since = time.monotonic()
        for _ in range(threads):
            gevent.spawn(self.recognize_waiting)

    def submit(self, utterance: Utterance) -> None:
        transcript = utterance.transcript
        utterance.window = self.window(len(utterance.pcm))
        # what waited of this track's speech so far is out of date, whatever comes
        self.waiting = deque(waiting for waiting in self.waiting
                             if not (waiting.partial and waiting.transcript is transcript))
        if utterance.partial:
            self.waiting.append(utterance)
            self.arrived.set()
            return
        same_track = [waiting for waiting in self.waiting if waiting.transcript is transcript]
        if len(same_track) >= TRACK_QUEUE:
            self.drop(same_track[0])
        elif sum(not waiting.partial for waiting in self.waiting) >= self.queue_size:
            self.drop(next(waiting for waiting in self.waiting if not waiting.partial))
        transcript.pending += 1
        self.waiting.append(utterance)
        self.arrived.set()

    def drop(self, utterance: Utterance) -> None:
        self.waiting.remove(utterance)
        utterance.transcript.dropped_one(utterance)

    def forget(self, transcript: "TrackTranscript") -> None:
        """A transcript's utterances still waiting: its call has ended."""
        self.waiting = deque(waiting for waiting in self.waiting if waiting.transcript is not transcript)

    def next_batch(self) -> list[Utterance]:
        """Whole utterances first, the oldest and those of its window; then partials, while
        they have cost less than PARTIAL_SHARE of the time whole ones took (else they are skipped)."""
        chosen = [waiting for waiting in self.waiting if not waiting.partial]
        if not chosen:
            affordable = self.spent[True] + self.last_partials <= \
                PARTIAL_SHARE * self.spent[False] + PARTIAL_ALLOWANCE_SECONDS
            self.waiting = deque(waiting for waiting in self.waiting
                                 if affordable and waiting.transcript.still_saying(waiting))
            chosen = list(self.waiting)
        batch = [utterance for utterance in chosen if utterance.window == chosen[0].window][:BATCH]
        for utterance in batch:
            self.waiting.remove(utterance)
        return batch

    def count_time(self, partial: bool, seconds: float) -> None:
        now = time.monotonic()
        halved = 0.5 ** ((now - self.spent_since) / 60)  # what counts is the last few minutes
        self.spent = {kind: spent * halved for kind, spent in self.spent.items()}
        self.spent_since = now
        self.spent[partial] += seconds
        if partial:
            self.last_partials = seconds

    def recognize_waiting(self) -> None:
        while True:
            batch = self.next_batch()
            if not batch:
                self.arrived.clear()
                self.arrived.wait()
                continue
            started = time.monotonic()
            texts = self.recognized(batch)
            self.count_time(batch[0].partial, time.monotonic() - started)
            for utterance, text in zip(batch, texts):
                utterance.transcript.heard(utterance, text)

    def recognized(self, batch: list[Utterance]) -> list[str]:
        """The words of each; a batch that fails is tried one by one, so that audio a model
        fails on costs only its own utterance."""
        try:
            texts = self.threads.apply(self.recognize_batch, ([utterance.pcm for utterance in batch], batch[0].partial))
            if len(texts) == len(batch):
                return texts
            raise ValueError(f"{len(texts)} results for {len(batch)} utterances")
        except Exception as exc:  # a model that fails on some audio: that utterance only
            if len(batch) > 1:
                return [self.recognized([utterance])[0] for utterance in batch]
            batch[0].transcript.stream.warn(f"transcript recognition failed: {type(exc).__name__}: "
                                            f"{printable(str(exc), 200)}")
            return [""]


class TrackTranscript:
    """One track's speech, cut into utterances where voice activity (WebRTC's detector, on
    the 8 kHz audio) pauses, and the words recognized in them, as Transcribed events."""

    def __init__(self, stream: "MediaStream", track: str):
        import webrtcvad
        self.stream, self.track = stream, track
        self.transcriber: Transcriber = stream.runtime.transcriber  # type: ignore[assignment]
        self.partials = stream.runtime.partials  # the words so far, while someone speaks: something shows them
        self.vad = webrtcvad.Vad(2)  # 0-3: how sure it must be that a frame is speech
        self.rest = b""             # less than a frame, left from the last chunk
        self.preroll: deque[bytes] = deque(maxlen=PREROLL_MS // 20)
        self.speech: bytearray | None = None  # the utterance being heard
        self.start_ms = self.voiced_ms = self.silent_ms = self.partial_ms = 0
        self.pending = 0            # utterances submitted, not yet heard
        self.utterances = self.dropped = 0
        self.moods: list[float] = []  # --mood: each line's score
        self.alerts = 0             # --alerts raised by its lines
        self.all_heard = gevent.event.Event()
        self.closed = False         # its call has ended: what comes back now is too late
        self.redact = stream.runtime.settings.redact
        self.submitted = 0          # whole utterances so far: the next one's index
        self.heard_lines: dict[int, tuple[Utterance, str | None]] = {}  # heard (or dropped), not yet made lines
        self.next_line = 0          # the index of the next utterance to make a line of
        self.held: tuple[Utterance, str, list] | None = None  # a line that may go on in the next (redaction)
        self.holding: gevent.Greenlet | None = None
        self.said_before = ""       # the last line's words as heard: what announced a number may be there
        self.redactions = 0
        self.voiced_from = self.last_voiced_ms = 0
        self.spoke: list[tuple[int, int]] = []  # when this track's speaker spoke: (start, end) in ms, in order

    def feed(self, at_ms: int, pcm: bytes) -> None:
        """A chunk of the track: `at_ms` from the stream's first audio."""
        data = self.rest + pcm if self.rest else pcm
        at_ms -= len(self.rest) // 16
        for offset in range(0, len(data) - FRAME_BYTES + 1, FRAME_BYTES):
            self.frame(at_ms + offset // 16, data[offset:offset + FRAME_BYTES])
        self.rest = data[len(data) - len(data) % FRAME_BYTES:]

    def frame(self, at_ms: int, frame: bytes) -> None:
        voiced = self.vad.is_speech(frame, 8000)
        if self.speech is None:
            self.preroll.append(frame)
            if voiced:
                self.start_ms = at_ms - 20 * (len(self.preroll) - 1)
                self.speech = bytearray().join(self.preroll)
                self.preroll.clear()
                self.voiced_ms, self.silent_ms = 20, 0
                self.partial_ms = at_ms + PARTIAL_AFTER_MS - PARTIAL_EVERY_MS  # the first after PARTIAL_AFTER_MS
                self.voiced_from, self.last_voiced_ms = at_ms, at_ms + 20
            return
        self.speech += frame
        self.voiced_ms += 20 if voiced else 0
        self.last_voiced_ms = at_ms + 20 if voiced else self.last_voiced_ms
        self.silent_ms = 0 if voiced else self.silent_ms + 20
        if self.silent_ms >= SPEECH_END_MS or len(self.speech) >= MAX_UTTERANCE_SECONDS * 16000:
            self.end_utterance()
        elif self.partials and at_ms - self.partial_ms >= PARTIAL_EVERY_MS:
            self.partial_ms = at_ms
            self.transcriber.submit(Utterance(self, self.start_ms / 1000, bytes(self.speech), partial=True,
                                              index=self.submitted))

    def end_utterance(self) -> None:
        if self.speech is not None and self.voiced_ms >= MIN_SPEECH_MS:
            self.spoke.append((self.voiced_from, self.last_voiced_ms))
            self.transcriber.submit(Utterance(self, self.start_ms / 1000, bytes(self.speech), index=self.submitted,
                                              seconds=(self.last_voiced_ms - self.voiced_from) / 1000))
            self.submitted += 1
        self.speech = None

    def discard(self) -> None:
        """What is being said is not recognized (a secure section begins)."""
        self.speech, self.rest = None, b""
        self.preroll.clear()

    def still_saying(self, partial: Utterance) -> bool:
        """Whether the utterance a partial is the words so far of is still being said."""
        return not self.closed and self.speech is not None and partial.index == self.submitted

    def heard(self, utterance: Utterance, text: str) -> None:
        if self.closed:
            return
        if utterance.partial:
            if text and self.still_saying(utterance):
                self.stream.emit(Transcribed, track=self.track, at=utterance.at, partial=True,
                                 text=partial_redacted(text) if self.redact else text)
            return
        self.heard_lines[utterance.index] = (utterance, text)
        self.make_lines()
        self.one_less_pending()

    def dropped_one(self, utterance: Utterance) -> None:
        self.dropped += 1
        self.stream.warn(f"transcript track={self.track}: recognition is behind, the oldest utterance waiting "
                         f"was dropped ({self.transcriber.queue_size} waiting; see --transcribe-threads)")
        self.heard_lines[utterance.index] = (utterance, None)
        self.make_lines()
        self.one_less_pending()

    def make_lines(self) -> None:
        """The lines of the utterances heard, in the order they were said (several threads may
        hear them out of order)."""
        while self.next_line in self.heard_lines:
            utterance, text = self.heard_lines.pop(self.next_line)
            self.next_line += 1
            if text:
                self.redacted_line(utterance, text) if self.redact else self.line(utterance, text, [])

    def redacted_line(self, utterance: Utterance, text: str) -> None:
        """A line judged with the one before it, and with the one held back, if any: a number
        read in groups across a pause is redacted in both lines. A line that may go on in the
        next waits for it (at most Limits.redact_hold_seconds)."""
        held = self.held
        parts = [self.said_before, held[1] if held else "", text]
        found = redactions(" ".join(parts))
        offsets = [0, len(parts[0]) + 1, len(parts[0]) + len(parts[1]) + 2]
        spans = [[(max(start, offset) - offset, min(end, offset + len(part)) - offset, kind)
                  for start, end, kind in found if start < offset + len(part) and end > offset]
                 for part, offset in zip(parts, offsets)]
        if held:
            self.release_held(held[2] + [span for span in spans[1] if span not in held[2]])
        if may_go_on(text):
            self.held = (utterance, text, spans[2])
            self.holding = gevent.spawn_later(self.stream.runtime.limits.redact_hold_seconds, self.hold_expired)
        else:
            self.line(utterance, text, spans[2])

    def hold_expired(self) -> None:
        """The held line's time is up: it goes, unless the speaker is still being heard (speaking,
        or their next utterance waits for recognition), for REDACT_HOLD_MAX_SECONDS at most."""
        deadline = time.monotonic() + REDACT_HOLD_MAX_SECONDS
        while (self.pending or self.speech is not None) and time.monotonic() < deadline:
            gevent.sleep(0.1)
        self.release_held()

    def release_held(self, spans: list | None = None) -> None:
        """The line held back, made now: the next line came, it waited long enough, or the call ended."""
        if self.held is None:
            return
        utterance, text, held_spans = self.held
        self.held = None
        if self.holding is not None and self.holding is not gevent.getcurrent():
            self.holding.kill(block=False)
        self.holding = None
        self.line(utterance, text, held_spans if spans is None else spans)

    def line(self, utterance: Utterance, text: str, spans: list) -> None:
        """One line: its words with what must not be kept replaced by markers, the audio of an
        utterance that had any silenced in the recording; then its mood and alerts."""
        self.said_before = text
        if spans:
            self.redactions += len(spans)
            text = redacted(text, spans)
            recording = self.stream.tracks[self.track].recording
            if recording is not None:
                start = round(utterance.at * 8000)
                recording.silence(start, start + len(utterance.pcm) // 2)
        self.utterances += 1
        mood = self.stream.runtime.mood(text) if self.stream.runtime.mood else None
        if mood is not None:
            self.moods.append(mood)
        self.stream.emit(Transcribed, track=self.track, at=utterance.at, text=text, mood=mood,
                         redacted=tuple(kind for _, _, kind in spans), seconds=utterance.seconds)
        alerts = self.stream.runtime.settings.alerts
        for category, phrase in alerts.said(text) if alerts else ():
            self.alerts += 1
            self.stream.emit(Alerted, track=self.track, category=category, phrase=phrase, text=text,
                             caller=self.stream.caller)

    def one_less_pending(self) -> None:
        self.pending -= 1
        if not self.pending:
            self.all_heard.set()

    def close(self) -> None:
        """Its call has ended: the lines heard are made, the one held back too; what was not
        heard by now is counted as dropped."""
        self.next_line = min(self.heard_lines, default=self.next_line)
        while self.heard_lines:  # what was heard, past the ones that never were
            self.make_lines()
            self.next_line = min(self.heard_lines, default=self.next_line)
        self.release_held()
        self.closed = True
        self.transcriber.forget(self)
        if self.pending:
            self.dropped += self.pending
            self.stream.warn(f"transcript track={self.track}: {self.pending} utterance(s) not recognized before "
                             "the call ended")


def end_transcripts(transcripts: list[TrackTranscript]) -> None:
    """A call's last words recognized before its summary: what was still being said is
    sent, and every utterance is heard within Limits.transcript_wait_seconds, or within the time a
    shutdown leaves (STREAM_END_SECONDS); what is left is counted as dropped."""
    for transcript in transcripts:
        transcript.end_utterance()
    runtime = transcripts[0].stream.runtime
    deadline = STREAM_END_SECONDS - 1 if runtime.shutting_down else runtime.limits.transcript_wait_seconds
    try:
        with gevent.Timeout(deadline, False):
            for transcript in transcripts:
                while transcript.pending:
                    transcript.all_heard.clear()
                    transcript.all_heard.wait()
    except (gevent.GreenletExit, IdleTimeout):  # the server is stopping: the summary and the files first
        pass
    for transcript in transcripts:
        transcript.close()


# --- Alerts (--alerts): the phrases that matter, in what is said ----------------------------

NUMBER_WORDS = {word: n for n, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())} | {word: 10 * n for n, word in enumerate(
        "twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
NUMBER_SCALES = {"hundred": 100, "thousand": 1000}


def digits_for_numbers(words: list[str]) -> list[str]:
    """Numbers said in words, as digits: "forty two" 42, "two hundred" 200; "one two" stays
    two numbers (1 2), as a phone number or an order's digits are said."""
    out: list[str] = []
    value, tens = None, False  # the number being read; whether its last word was a ten (or a scale)
    for word in words:
        n = NUMBER_WORDS.get(word)
        if n is not None and value is not None and tens and n < 10:
            value, tens = value + n, False
        elif n is not None:
            if value is not None:
                out.append(str(value))
            value, tens = n, n >= 20
        elif word in NUMBER_SCALES and value is not None:
            value, tens = value * NUMBER_SCALES[word], True
        else:
            if value is not None:
                out.append(str(value))
            value = None
            out.append(word)
    return out + ([str(value)] if value is not None else [])


def matchable(text: str) -> str:
    """Text as phrases are matched in it: lower case, words only (punctuation and hyphens are
    spaces, "don't" is "dont", "1,000" is "1000"), numbers as digits; spaces around."""
    text = re.sub(r"(?<=\d)[,.](?=\d{3}\b)", "", text.casefold().replace("'", "").replace("\u2019", ""))
    return " " + " ".join(digits_for_numbers(re.sub(r"[\W_]+", " ", text).split())) + " "


@dataclass(frozen=True)
class Alerts:
    """--alerts FILE: each category and the phrases that raise it, one category a line:
    `refund: refund, money back, charged twice` (blank lines and # comments are skipped)."""
    path: str
    categories: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]  # (category, ((phrase, matchable), ...))

    @classmethod
    def read(cls, path: str) -> "Alerts":
        try:
            with open(path, encoding="utf-8") as file:
                lines = file.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"a file it can read ({getattr(exc, 'strerror', None) or exc})") from None
        categories: dict[str, tuple] = {}
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, colon, rest = (part.strip() for part in line.partition(":"))
            phrases = tuple((phrase.strip(), matchable(phrase)) for phrase in rest.split(","))
            wrong = ("no `:` after a category" if not colon
                     else "the category is not one word" if not re.fullmatch(r"[\w.-]+", name)
                     else f"`{name}` is on an earlier line too" if name in categories
                     else "a phrase with no word in it" if any(not m.strip() for _, m in phrases) else None)
            if wrong:
                raise ValueError(f"a file of `category: phrase, phrase` lines: line {number}, "
                                 f"{printable(line.strip(), 80)!r}: {wrong}")
            categories[name] = phrases
        return cls(path, tuple(categories.items()))

    def said(self, text: str) -> list[tuple[str, str]]:
        """(category, phrase) for each category one of whose phrases `text` says: the longest.
        A one-word phrase matches two words that make it too: Whisper hears "chargeback" as
        "charge back"."""
        words = matchable(text)
        tokens = words.split()
        joined = " " + " ".join(a + b for a, b in zip(tokens, tokens[1:])) + " "
        found = []
        for category, phrases in self.categories:
            said = [(len(pattern), phrase) for phrase, pattern in phrases
                    if pattern in words or pattern.count(" ") == 2 and pattern in joined]
            if said:
                found.append((category, max(said)[1]))
        return found


# --- Alerts to people (--alert-webhook): each alert POSTed once, as Slack and Teams show it ---
# An alert helps only if someone sees it in time. Each is POSTed as JSON to one URL by a
# greenlet of its own (urllib's blocking request on a native thread where sockets are not
# gevent's), one at a time in the order raised, never in a call's way. Without Redis the
# process that has the call sends it. With Redis, one process at a time (the holder of a
# lease) reads every process's alerts from the stream through one consumer group: each is
# sent once however many processes run, and another process takes over within
# Limits.alert_lease_seconds if it dies (what it had not acknowledged is sent by the next).

ALERT_GROUP = "alert-webhook"      # the consumer group on REDIS_STREAM; its one consumer is ALERT_CONSUMER
ALERT_CONSUMER = "sender"          # whoever holds the lease reads as this one: what a dead sender left, it finds
ALERT_LEASE = "mediastreams:alert-webhook:sender"  # who sends: this process's name, for Limits.alert_lease_seconds
ALERT_QUEUE = 1000                 # without Redis: alerts waiting to be sent; beyond, the oldest is dropped
ALERT_BACKOFF_SECONDS = (0.5, 30.0)  # after a failed POST, wait this long, doubling up to this
ALERT_SIGNATURE_HEADER = "X-Mediastreams-Signature"  # sha256=<HMAC-SHA256 of the body with ALERT_WEBHOOK_SECRET>
ALERT_RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def alert_message(record: dict, floor_url: str | None, history: bool = True) -> dict:
    """What the webhook gets: the alert's fields, a link to the call on the floor's history,
    and `text`, one line that a Slack or Teams incoming webhook shows as it is."""
    caller = record.get("caller")  # a string, or none: checked_record() has seen to it for Redis' entries
    link = None if not floor_url else f"{floor_url.rstrip('/')}/history/{urlquote(record['stream'], safe='')}" \
        if history else f"{floor_url.rstrip('/')}/"  # a floor that keeps no history: its page
    text = f'Alert {record["category"]}: "{record["phrase"]}" from {caller or "an unknown caller"}: "{record["text"]}"'
    return {"text": text + (f" {link}" if link else ""), "category": record["category"], "phrase": record["phrase"],
            "line": record["text"], "track": record.get("track"), "caller": caller,
            "call": record.get("call"), "stream": record["stream"], "server": record.get("server"),
            "time": record.get("time"), "link": link, "id": record.get("uid")}


class NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a POST redirected becomes a GET: the alert would be lost
        return None


def post_alert(url: str, body: bytes, headers: dict, timeout: float) -> int:
    """One POST; its HTTP status. Raises OSError (or http.client's) when no answer came."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.build_opener(NoRedirects).open(request, timeout=timeout) as response:
            response.read(65536)
            return response.status
    except urllib.error.HTTPError as refused:
        return refused.code


class AlertWebhook:
    """--alert-webhook: a sink of this process's alerts (without Redis), or the reader of every
    process's from the Redis stream (with it), and the greenlet that POSTs them in order. An
    alert not taken (2xx) is tried again with back-off until Limits.alert_webhook_seconds after
    it was raised, then dropped: one warning, counted (mediastreams_alert_webhooks_total)."""

    def __init__(self, url: str, secret: str | None, floor_url: str | None, server: str,
                 redis_url: str | None = None, metrics: Metrics | None = None, limits: Limits = Limits(),
                 history: bool = True):
        self.secret, self.floor_url, self.server = secret, floor_url, server
        self.history = history  # the floor linked to keeps a history: link to the call's page there
        self.redis_url, self.metrics, self.limits = redis_url, metrics, limits
        self.shown = shown_web_address(url)
        self.queue: deque = deque()
        self.queued = gevent.event.Event()
        self.idle = gevent.event.Event()
        self.greenlet: gevent.Greenlet | None = None
        self.failing_since: float | None = None
        self.drops = LogThrottle("alerts dropped", 5)
        patched = gevent.monkey.is_module_patched("socket")  # gunicorn's worker: urllib waits as a greenlet does
        self.post = functools.partial(post_alert, url) if patched else \
            lambda *args: gevent.get_hub().threadpool.apply(post_alert, (url, *args))

    def __call__(self, event: CallEvent) -> None:
        if isinstance(event, Alerted) and not self.redis_url:
            record = floor_record(event, self.server)
            if record is None:
                return
            if len(self.queue) >= ALERT_QUEUE:
                self.give_up(self.queue.popleft(), f"{ALERT_QUEUE} alerts waiting")
            self.queue.append(record)
            self.idle.clear()
            self.queued.set()
            self.start()

    def start(self) -> None:
        if self.greenlet is None:
            self.greenlet = gevent.spawn(self.send_from_redis if self.redis_url else self.send_from_queue)

    def flush(self, timeout: float) -> None:
        """At exit: the alerts waiting in this process sent, within `timeout`."""
        if self.greenlet is not None and not self.redis_url and not self.idle.wait(timeout):
            log.warning("alert webhook %s: %d alert(s) not sent: this process is stopping", self.shown,
                        len(self.queue) + 1)

    def send_from_queue(self) -> None:
        while True:
            while not self.queue:
                self.idle.set()
                self.queued.clear()
                self.queued.wait()
            self.deliver(self.queue.popleft())

    def deliver(self, record: dict, still_mine: Callable[[], bool] = lambda: True) -> bool:
        """One alert, until the webhook takes it or its time is up (then dropped). False: it is
        no longer this process's to send (another holds the lease now)."""
        body = json_dumps(alert_message(record, self.floor_url, self.history))
        headers = {"Content-Type": "application/json", "User-Agent": "twilio-media-streams-server"}
        if self.secret:
            digest = hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
            headers[ALERT_SIGNATURE_HEADER] = f"sha256={digest}"
        deadline = time.monotonic() + self.limits.alert_webhook_seconds - age_of(record.get("time"))
        wait = ALERT_BACKOFF_SECONDS[0]
        while True:
            try:
                status: int | None = self.post(body, headers, self.limits.alert_webhook_timeout)
                why = f"HTTP {status}"
            except (OSError, http.client.HTTPException, ValueError) as exc:
                status, why = None, f"{type(exc).__name__}: {printable(str(exc), 200)}"
            if status is not None and 200 <= status < 300:
                self.counted("sent")
                if self.failing_since is not None:
                    log.info("alert webhook %s takes alerts again, after %.0f s", self.shown,
                             time.monotonic() - self.failing_since)
                    self.failing_since = None
                return True
            if status is not None and 400 <= status < 500 and status not in (408, 429):  # it will refuse again
                self.give_up(record, f"{why}, refused")
                return True
            if self.failing_since is None:
                self.failing_since = time.monotonic()
                log.warning("alert webhook %s failed (%s): trying again for up to %.0f s after each alert", self.shown,
                            why, self.limits.alert_webhook_seconds)
            if time.monotonic() + wait > deadline:
                self.give_up(record, why)
                return True
            gevent.sleep(wait)
            wait = min(wait * 2, ALERT_BACKOFF_SECONDS[1])
            if not still_mine():
                return False

    def give_up(self, record: dict, why: str) -> None:
        self.counted("dropped")
        self.drops.warning("alert webhook %s: alert dropped (%s): category=%s stream=%s", self.shown, why,
                           printable(str(record.get("category")), 64), printable(str(record.get("stream")), 64))

    def counted(self, result: str) -> None:
        if self.metrics:
            self.metrics.alert_webhooks.labels(result).inc()

    def lead(self, client: Any) -> bool:
        """Whether this process sends (it holds the lease, renewed), taking it if nobody holds it."""
        ms = int(self.limits.alert_lease_seconds * 1000)
        return bool(client.set(ALERT_LEASE, self.server, nx=True, px=ms) or
                    client.eval(ALERT_RENEW_SCRIPT, 1, ALERT_LEASE, self.server, ms))

    def send_from_redis(self) -> None:
        """With --redis-url: while this process holds the lease, every process's alerts from the
        stream, through the consumer group (first what was read and not acknowledged)."""
        import redis
        assert self.redis_url
        down = RedisDown(self.redis_url, "alerts wait in Redis until it is back")
        client, leading, wanted = None, False, "0"
        while True:
            try:
                if client is None:
                    client = connect_redis(self.redis_url)
                    client.set_response_callback("XREADGROUP", lambda reply, **options: reply)
                if not self.lead(client):
                    leading = False
                    down.worked()
                    gevent.sleep(self.limits.alert_lease_seconds / 3)
                    continue
                if not leading:
                    try:
                        client.xgroup_create(REDIS_STREAM, ALERT_GROUP, id="$", mkstream=True)
                    except redis.ResponseError as exc:  # BUSYGROUP: it knows where it was
                        if "BUSYGROUP" not in str(exc):
                            raise
                    leading, wanted = True, "0"
                    log.info("This process sends the alerts of every process to %s (the lease %s)", self.shown,
                             ALERT_LEASE)
                read = client.xreadgroup(ALERT_GROUP, ALERT_CONSUMER, {REDIS_STREAM: wanted}, count=REDIS_BATCH,
                                         block=1000)
                down.worked()
                entries = [entry for _, got in (read.items() if isinstance(read, dict) else read or ()) for entry in got]
                if wanted == "0" and not entries:
                    wanted = ">"
                done: list = []
                for entry_id, values in entries:
                    record = redis_record(values)  # None: another program's entry, or one trimmed since
                    if record is not None and record["type"] == "alert":
                        if done:
                            client.xack(REDIS_STREAM, ALERT_GROUP, *done)
                            done = []
                        if not self.deliver(record, lambda: self.lead(client)):
                            leading = False
                            break
                    done.append(entry_id)
                if done:
                    client.xack(REDIS_STREAM, ALERT_GROUP, *done)
            except (redis.RedisError, OSError) as exc:
                if client is not None:
                    client.close()
                    client = None
                leading = False
                down.failed(exc)


def age_of(time_text: Any) -> float:
    """Seconds since an event's `time` (UTC, ISO 8601), from 0 (now, or a time that cannot be read)."""
    try:
        then = datetime.datetime.fromisoformat(str(time_text).replace("Z", "+00:00"))
        return max(0.0, (datetime.datetime.now(datetime.timezone.utc) - then).total_seconds())
    except (ValueError, TypeError):
        return 0.0


def shown_web_address(url: str) -> str:
    """A webhook's URL for the console: its scheme and host only (a Slack URL's path is its secret)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/…"


# --- Mood (--mood): how each line sounds, from -1 (angry, fed up) to +1 (pleased) -----------
# VADER (a general English lexicon and its rules: negation, "very", capitals, "!") scores
# "I have been on hold for 40 minutes and nobody can tell me anything" 0.0 and "I would like
# to cancel my account, please" +0.42. On calls, these words matter too, on VADER's scale
# (-4 to +4 a word): each phrase a line says (matched as --alerts phrases are) adds its own.

MOOD_RULES = {
    # kept waiting, on hold
    "on hold": -2.0, "been waiting": -2.0, "kept waiting": -2.5, "still waiting": -2.0, "waiting for": -1.0,
    "an hour": -1.0, "for hours": -1.5, "all day": -1.5, "for ages": -1.5, "minutes": -0.7,
    # nobody helping
    "nobody": -1.5, "no one": -1.5, "cant tell me": -1.5, "cant help": -2.0, "not helping": -2.0,
    "no help": -2.0, "hung up on": -2.5, "transferred": -1.0, "transferring": -1.0, "waste of time": -2.5,
    "you promised": -1.5, "called me back": -0.5,
    # charged wrongly, or twice
    "charged twice": -2.5, "charged me twice": -2.5, "double charged": -2.5, "overcharged": -2.5,
    "wrong amount": -2.0, "extra charge": -1.5, "never ordered": -1.5, "didnt order": -1.5,
    "refund": -1.5, "money back": -1.5,
    # cancelling, leaving
    "cancel my": -1.0, "close my account": -2.0, "switch to": -1.0, "switching": -1.0,
    "another provider": -1.5, "going elsewhere": -2.0,
    # again, still
    "still": -1.0, "again": -1.0, "second time": -1.0, "third time": -2.0, "every time": -1.0,
    "keep calling": -2.0, "already called": -1.5, "already told": -1.5,
    # asking for someone else
    "manager": -1.5, "supervisor": -1.5, "someone else": -1.5, "real person": -2.0, "a human": -1.5,
    # a request is not a liking ("I would like to cancel")
    "would like": -1.5, "id like": -1.5,
    # what went right
    "fixed": 2.0, "works now": 2.5, "working now": 2.5, "sorted": 1.5, "solved": 2.0, "you helped": 2.0,
    "that helps": 1.5, "made my day": 3.0, "what i needed": 2.0,
}
MOOD_NEUTRAL_WORDS = ("please", "yes", "yeah", "ok", "okay", "sure", "well", "true", "help", "no", "kind", "free",
                      "number", "accept", "promised", "holiday", "holidays")  # "my account number", "do you accept"


class Mood:
    """--mood: a transcript line's score, -1 to +1: VADER's, with MOOD_RULES added to its sum
    and MOOD_NEUTRAL_WORDS (politeness, answers, requests) weighing nothing."""

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        self.vader = SentimentIntensityAnalyzer()
        for word in MOOD_NEUTRAL_WORDS:
            self.vader.lexicon.pop(word, None)
        self.rules = [(matchable(phrase), valence) for phrase, valence in MOOD_RULES.items()]

    def __call__(self, text: str) -> float:
        compound = self.vader.polarity_scores(text)["compound"]
        total = compound * math.sqrt(15 / max(1e-6, 1 - compound * compound))  # VADER's sum, before it normalized it
        words = matchable(text)
        total += sum(valence for phrase, valence in self.rules if phrase in words)
        return round(total / math.sqrt(total * total + 15), 2)  # normalized as VADER does


# --- Redaction: card numbers, codes, expiry dates and SSNs never kept (unless --no-redact) ---
# A step between the call and what keeps it: every transcript line is redacted before its
# event is made, so no sink (console, files, floor, Redis, metrics) ever sees the digits. What
# Whisper makes of a card read aloud varies ("4 111 111 111 111 111", "for 111, 111, ...",
# "four one one one ..."), so what counts is a run of digits, however written and heard, and
# the words before it. A number read in groups across pauses is two lines: a line that ends in
# digits, or in the words that ask for them, waits for the speaker's next line (at most
# Limits.redact_hold_seconds), and the two are judged together.

CARD, CODE, EXPIRY, SSN, KEYS = "card number", "security code", "expiry date", "social security number", "keyed digits"
REDACT_CUE_WORDS = 10         # words before a run of digits where what announces it is looked for
CARD_DIGITS = 12              # this many digits in a run are a card number, whatever is said around them
REDACT_HOLD_MAX_SECONDS = 20  # a held line waits no longer than this for a speaker still being heard
PARTIAL_DIGITS = 4            # a partial line shows no more of a number than this

REDACT_CUES = {  # what announces each kind: whole words, lower case, digits as said
    CARD: ("card", "credit", "debit", "visa", "mastercard", "master card", "amex", "american express", "discover"),
    CODE: ("security code", "cvv", "cvc", "cv2", "csc", "cid", "verification code", "verification value",
           "card code", "on the back", "back of the card", "three digits", "3 digits", "security number"),
    EXPIRY: ("expiry", "expiration", "expires", "expire", "expiring", "exp", "valid through", "valid thru",
             "valid until", "good through", "good thru", "valid till"),
    SSN: ("social security", "social", "ssn", "s s n"),
}
CODE_IN_CARD_TALK = ("code", "pin")  # a code, when a card was spoken of just before
EXPIRY_IN_CARD_TALK = ("valid", "date")  # "valid 305 29" (through, misheard), "the next primary date is 928"
LAST_FOUR = ("ends in", "ending in", "ends with", "ending with", "last four", "last 4", "last four digits")
PHONE_CUES = ("phone", "mobile", "cell", "call me", "reach me", "telephone", "call back", "callback", "fax")
AMOUNT_WORDS = ("dollars", "dollar", "cents", "bucks", "pounds", "euros", "percent", "grand", "minutes", "hours",
                "seconds", "days", "weeks", "months", "years", "times", "people")  # amounts and quantities
MONTH_WORDS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
               "november", "december", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct",
               "nov", "dec")
DIGIT_WORDS = {word: 1 for word in "zero one two three four five six seven eight nine".split()} | {
    word: 2 for word in "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty "
                        "thirty forty fifty sixty seventy eighty ninety".split()}
SEPARATORS = (",", "-", ".", "/", "–")
WORD = re.compile(r"\d+|[^\W\d_]+(?:'[^\W\d_]+)?|\S")


@dataclass(frozen=True)
class Run:
    """Digits said in a row: from character `start` to `end` of the text, how many, in what groups."""
    start: int
    end: int
    first: int                # index of its first word
    digits: int
    groups: tuple[int, ...]   # digits of each numeral written as digits, 1 for a digit said as a word
    numerals: str             # its digits, where all were written as digits (for Luhn's check)


def words_of(text: str) -> list[tuple[str, int, int]]:
    """(word in lower case, start, end) of each word, number and mark."""
    return [(match.group().casefold(), match.start(), match.end()) for match in WORD.finditer(text)]


def runs_of(words: list[tuple[str, int, int]]) -> list[Run]:
    """Each run of digits: numerals and number words ("four one one one", "for 111, 111", "oh
    nine"), separated by nothing but spaces, commas, dashes, dots or slashes."""
    def digits(i: int) -> int:
        word = words[i][0]
        if word.isdigit():
            return len(word)
        if word in DIGIT_WORDS:
            tens = word.endswith("ty") and i + 1 < len(words) and DIGIT_WORDS.get(words[i + 1][0]) == 1
            return 1 if tens else DIGIT_WORDS[word]  # "forty one": two digits, counted here and there
        if word == "hundred" and i and digits_said(i - 1):
            return 2
        if word in ("oh", "o", "for", "double", "triple"):  # heard for 0 and 4; "double four" is 44
            beside = [j for j in (i - 1, i + 1) if 0 <= j < len(words) and digits_said(j)]
            if word in ("double", "triple"):
                return (1 if word == "double" else 2) if i + 1 in beside else 0
            if word == "for":  # "for 111", "for one one": four; "for 30 days": for
                return 1 if i + 1 in beside and (len(words[i + 1][0]) >= 3 or DIGIT_WORDS.get(words[i + 1][0]) == 1
                                                 or len(words[i + 1][0]) == 1) else 0
            return 1 if beside else 0
        return 0

    def digits_said(i: int) -> bool:
        word = words[i][0]
        return word.isdigit() or word in DIGIT_WORDS

    runs: list[Run] = []
    i = 0
    while i < len(words):
        if not digits(i):
            i += 1
            continue
        first, count, groups, numerals, end = i, 0, [], "", i
        while i < len(words):
            if digits(i):
                count += digits(i)
                groups.append(len(words[i][0]) if words[i][0].isdigit() else digits(i))
                numerals += words[i][0] if words[i][0].isdigit() else "?"
                end, i = i, i + 1
            elif (words[i][0] in SEPARATORS or len(words[i][0]) == 1 and words[i][0] not in "ai") \
                    and i + 1 < len(words) and digits(i + 1):  # "4 5 5 6 H 6 8 9": a digit heard as a letter
                i += 1
            else:
                break
        runs.append(Run(words[first][1], words[end][2], first, count, tuple(groups), numerals))
    return runs


def said_before(words: list[tuple[str, int, int]], index: int, phrases: Sequence[str], within: int) -> bool:
    """Whether one of `phrases` is among the `within` words before word `index`."""
    before = " " + " ".join(word for word, _, _ in words[max(0, index - within):index]
                            if word not in SEPARATORS) + " "
    return any(f" {phrase} " in before for phrase in phrases)


def luhn_valid(numerals: str) -> bool:
    if not numerals.isdigit():
        return False
    total = 0
    for n, digit in enumerate(reversed(numerals)):
        value = int(digit) * (2 if n % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def kind_of(run: Run, words: list[tuple[str, int, int]]) -> str | None:
    """What a run of digits is, by its length, its groups and the words before it; None: a
    number that stays (an order number, an amount, a time, a phone number)."""
    index = run.first
    end_word = next((n for n, (_, start, _) in enumerate(words) if start >= run.end), len(words))
    following = words[end_word][0] if end_word < len(words) else ""
    if (index and words[index - 1][0] in ("$", "£", "€")) or following in AMOUNT_WORDS + ("%",):
        return None
    cue = functools.partial(said_before, words, index, within=REDACT_CUE_WORDS)
    after_month = index and words[index - 1][0] in MONTH_WORDS
    if cue(REDACT_CUES[EXPIRY]) and (2 <= run.digits <= 6 or after_month):
        return EXPIRY
    if (cue(REDACT_CUES[CODE]) or cue(CODE_IN_CARD_TALK) and cue(REDACT_CUES[CARD], within=2 * REDACT_CUE_WORDS)) \
            and 3 <= run.digits <= 4:
        return CODE
    if cue(EXPIRY_IN_CARD_TALK) and (3 <= run.digits <= 6 and cue(REDACT_CUES[CARD], within=2 * REDACT_CUE_WORDS)
                                     or month_and_year(run.numerals)):
        return EXPIRY
    if run.groups == (3, 2, 4) or cue(REDACT_CUES[SSN]) and run.digits == 9:
        return SSN
    if 13 <= len(run.numerals) <= 19 and luhn_valid(run.numerals):
        return CARD
    if run.digits >= CARD_DIGITS and not (cue(PHONE_CUES) and run.digits <= 13):
        return CARD
    if cue(REDACT_CUES[CARD], within=2 * REDACT_CUE_WORDS):  # card talk: its number, then its date and code
        if run.digits >= 6:
            return CARD
        if run.digits == 4 and (cue(LAST_FOUR, within=3) or cue(("in",), within=1)):  # "ending in 1234": the
            return None                                                                    # last four may be shown
        if 3 <= run.digits <= 4 and not (run.numerals.isdigit() and 1900 <= int(run.numerals) <= 2099):  # a year
            return EXPIRY if month_and_year(run.numerals) else CODE
    return None


def month_and_year(numerals: str) -> bool:
    """Whether 3 or 4 digits read as a card's month and year: 0928, 928 (September 2028)."""
    return numerals.isdigit() and len(numerals) in (3, 4) and 1 <= int(numerals[:-2]) <= 12


def redactions(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of what must not be kept in `text`: each run of digits that is a
    card number, a security code, an expiry date or a social security number; an expiry said
    with its month ("september 28") from the month on."""
    words = words_of(text)
    found = []
    for run in runs_of(words):
        kind = kind_of(run, words)
        if kind:
            start = words[run.first - 1][1] if kind == EXPIRY and run.first and \
                words[run.first - 1][0] in MONTH_WORDS else run.start
            found.append((start, run.end, kind))
    return found


def redacted(text: str, spans: Sequence[tuple[int, int, str]]) -> str:
    """`text` with each span replaced by its marker: [card number], [security code], ..."""
    for start, end, kind in sorted(spans, reverse=True):
        text = f"{text[:start]}[{kind}]{text[end:]}"
    return text


def partial_redacted(text: str) -> str:
    """A partial line: redacted as a final one would be, and no run shows more than PARTIAL_DIGITS
    digits (the rest of the number may come in the next second)."""
    spans = redactions(text)
    spans += [(run.start, run.end, "number") for run in runs_of(words_of(text)) if run.digits > PARTIAL_DIGITS
              and not any(start < run.end and run.start < end for start, end, _ in spans)]
    return redacted(text, spans)


def may_go_on(text: str) -> bool:
    """Whether a line ends in digits, or in words that ask for them: the next line may hold the rest."""
    words = [word for word in words_of(text) if word[0] not in SEPARATORS + ("?", "!", ":", ";")]
    if not words:
        return False
    runs = runs_of(words)
    if runs and runs[-1].end == words[-1][2]:
        return True
    cues = [phrase for kind in (CARD, CODE, EXPIRY, SSN) for phrase in REDACT_CUES[kind]]
    return said_before(words, len(words), cues, within=4)


# --- Sinks: what consumes call events ------------------------------------------------------

class Console:
    """The console's lines about calls, one per event, as the README's "What you see" lists
    them (a level line only if it builds its meter: not with --quiet-levels). Warnings, which
    any client can cause at will, go through the runtime's throttle."""

    def __init__(self, stream_warnings: LogThrottle, quiet_levels: bool = False, partials: bool = False):
        self.partials = partials  # --transcript-partials: the words so far too (else a line per utterance)
        self.stream_warnings = stream_warnings
        self.lines: dict[type, Callable[[Any], None]] = {
            Accepted: lambda e: log.info("Connection accepted %s", e.label),
            Connected: lambda e: log.info("%s connected protocol=%s version=%s", e.label, e.protocol, e.version),
            Started: self.started,
            FirstMedia: lambda e: log.info("%s first media track=%s: %d bytes of audio per message (%d ms)",
                                           e.label, e.track, e.size, e.size // 8),
            **({} if quiet_levels else {  # --quiet-levels: no level lines (the floor still has them)
                Level: lambda e: log.info("%s level track=%s %s", e.label, e.track, level_meter(e.mean_square))}),
            Dtmf: lambda e: log.info("%s dtmf digit=%s", e.label, e.digit),
            MarkEchoed: lambda e: log.info("%s mark name='%s' %s after=%.0fms", e.label, e.name,
                                           "cancelled" if e.cancelled else "played", e.waited_ms),
            BargeIn: lambda e: log.info("%s barge-in: the caller spoke over %.2f s of audio still to play: clear",
                                        e.label, e.queued_seconds),
            UnknownEvent: lambda e: log.info("%s unknown event '%s': ignored", e.label, e.event),
            Stopped: lambda e: log.info("%s stop", e.label),
            SecureSection: lambda e: log.info("%s %s", e.label, "secure section: recordings silent, nothing transcribed, "
                                              "keys hidden" if e.paused else "secure section over"),
            Transcribed: self.transcribed,
            Alerted: lambda e: log.info('%s alert track=%s category=%s phrase="%s" text="%s"', e.label, e.track,
                                        e.category, quoted(e.phrase), quoted(e.text)),
            Warned: lambda e: self.stream_warnings.warning("%s %s", e.label, e.message),
            HookFailed: lambda e: log.warning("%s bug in %s(): %s: %s (the call goes on; later ones are counted: "
                                              "%s_errors=)", e.label, e.hook, type(e.error).__name__,
                                              printable(str(e.error), 200), e.hook, exc_info=e.error),
            Failed: lambda e: log.warning("%s handler error: %s: %s (traceback at --log-level debug)", e.label,
                                          type(e.error).__name__, printable(str(e.error), 200),
                                          exc_info=e.error if log.isEnabledFor(logging.DEBUG) else None),
            Ended: lambda e: log.info("%s", e.summary.line()),
        }

    def __call__(self, event: CallEvent) -> None:
        line = self.lines.get(type(event))
        if line:
            line(event)

    def transcribed(self, e: Transcribed) -> None:
        if e.partial and not self.partials:  # the words so far: the floor's, the console's only if asked
            return
        log.info('%s transcript%s track=%s at=%.2fs text="%s"%s', e.label, "-partial" if e.partial else "", e.track,
                 e.at, quoted(e.text), "" if e.mood is None else f" mood={e.mood:.2f}")

    @staticmethod
    def started(event: Started) -> None:
        log.info("%s start call=%s tracks=%s format=%s params=%s", event.label, event.call_sid,
                 printable(",".join(event.tracks), 100), event.media_format,
                 printable(",".join(event.parameters), 300) or "-")
        log.debug("%s customParameters=%s", event.label, printable(repr(event.parameters), 2000))


class TranscriptFiles:
    """With --record and --transcribe: each track's transcript beside its recording,
    RECORD_DIR/<recording's name>.txt, a line per utterance, on disk as soon as it is heard."""

    def __init__(self, folder: str, warnings: LogThrottle):
        self.folder, self.warnings = folder, warnings
        self.recordings: dict[tuple[int, str], str] = {}  # (call, track): its recording's path
        self.files: dict[tuple[int, str], Any] = {}  # (call, track): its open file

    def __call__(self, event: CallEvent) -> None:
        if isinstance(event, Transcribed) and not event.partial:
            self.write(event)
        elif isinstance(event, RecordingStarted):
            self.recordings[event.call_key, event.track] = event.path
        elif isinstance(event, Ended):
            for key in [key for key in self.files.keys() | self.recordings.keys() if key[0] == event.call_key]:
                self.recordings.pop(key, None)
                if key in self.files:
                    self.files.pop(key).close()

    def write(self, event: Transcribed) -> None:
        key = (event.call_key, event.track)
        try:
            file = self.files.get(key)
            if file is None:
                recording = self.recordings.get(key)
                name = recording[:-4] if recording else os.path.join(
                    self.folder, f"{safe_name(event.stream_sid or '-')}_{event.track}")
                file = self.files[key] = open(name + ".txt", "a", encoding="utf-8", opener=private)
            file.write(f"{event.at:.2f}s {printable(event.text, 2000)}\n")
            file.flush()  # complete on disk whenever and however the call ends
        except OSError as exc:
            self.warnings.warning("%s transcript file track=%s: %s", event.label, event.track, exc)


# --- Metrics: Prometheus, with the official client, imported only with --metrics-port -----

METRICS_CONNECTIONS = 8    # scrapes served at once; more wait in the backlog, holding no descriptor of ours


class Metrics:
    """This process's streams counted for Prometheus, a sink of call events: each call's
    counts, as its summary has them, are added as it ends and every COUNTS_EVERY_SECONDS
    while it is open (Counted), so counting costs nothing per message. Under gunicorn each worker writes them to
    PROMETHEUS_MULTIPROC_DIR and the master serves their sum (serve_metrics_of_workers)."""

    def __init__(self):
        from prometheus_client import (GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry,
                                       Counter, Gauge, disable_created_metrics)
        disable_created_metrics()  # a <name>_created series beside each count: no dashboard needs it
        self.registry = CollectorRegistry()  # this runtime's own: a test may make several in one process
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # the process's memory, CPU, GC
            self.registry.register(standard)

        def counter(name, help_text, *labels):
            return Counter(f"mediastreams_{name}", help_text, labels, registry=self.registry)

        self.streams_open = Gauge("mediastreams_streams_open", "streams open now", multiprocess_mode="livesum",
                                  registry=self.registry)
        self.streams_ended = counter("streams_ended", "streams ended, by how (the summary's ended=)", "ended")
        self.media_messages = counter("media_messages", "media messages received", "track")
        self.audio_seconds = counter("audio_seconds", "seconds of audio received", "track")
        self.gaps = counter("gaps", "places where audio went missing (timestamps jumped)", "track")
        self.duplicates = counter("duplicate_messages", "messages received twice (same sequenceNumber)")
        self.out_of_order = counter("out_of_order_messages", "messages received after a later one")
        self.bad_messages = counter("bad_messages", "messages skipped, by why (the summary's bad_<kind>=)", "kind")
        self.handshakes_refused = counter("handshakes_refused", "connections refused before the WebSocket opened",
                                          "status", "reason")
        self.recordings = counter("recordings", "WAV files closed, and those stopped early (disk, limit)", "result")
        self.sent_messages = counter("sent_media_messages", "media messages sent back (<Connect><Stream>)")
        self.marks = counter("marks", "marks sent, and their echoes: played or cancelled by a clear", "state")
        self.clears = counter("clears", "clear messages sent")
        self.alerts = counter("alerts", "alerts raised (--alerts), by category", "category")
        self.stream_status = counter("stream_status", "Twilio's stream status callbacks (/stream-status), by "
                                     "StreamEvent", "event")
        self.redactions = counter("redactions", "what was taken out before anything kept it (card numbers, codes, "
                                  "expiry dates, social security numbers, keyed digits), by kind", "kind")
        self.floor_events_dropped = counter("floor_events_dropped", "call events that never reached Redis "
                                            "(--redis-url): it was down, slow or refusing")
        self.alert_webhooks = counter("alert_webhooks", "alerts POSTed to --alert-webhook (sent), and those given up "
                                      "on (dropped)", "result")
        self.added: dict[int, dict] = {}  # each open call: the counts added so far, by metric and labels

    def __call__(self, event: CallEvent) -> None:
        """The sink: a call is counted from its Accepted event to its Ended one, its counts
        added once a second (Counted) and as it ends."""
        if isinstance(event, Accepted):
            self.added[event.call_key] = {}
            self.streams_open.inc()
        elif isinstance(event, Counted) and event.call_key in self.added:
            self.add_counts(event.summary, self.added[event.call_key])
        elif isinstance(event, Ended) and event.call_key in self.added:
            summary = event.summary
            self.add_counts(summary, self.added.pop(event.call_key))
            self.streams_open.dec()
            self.streams_ended.labels(summary.ended).inc()
            for result, count in (("written", len(summary.recordings)), ("stopped", summary.recordings_stopped)):
                if count:
                    self.recordings.labels(result).inc(count)
        elif isinstance(event, Alerted):
            self.alerts.labels(event.category).inc()
        elif isinstance(event, Transcribed):
            for kind in event.redacted:
                self.redactions.labels(kind).inc()
        elif isinstance(event, Dtmf) and event.masked:
            self.redactions.labels(KEYS).inc()

    def add_counts(self, summary: CallSummary, added: dict) -> None:
        """What a call counted since `added` (updated) was taken."""
        now: dict[tuple, float] = {
            (self.duplicates, ()): summary.duplicates, (self.out_of_order, ()): summary.out_of_order,
            (self.sent_messages, ()): summary.sent, (self.clears, ()): summary.clears,
            (self.marks, ("sent",)): summary.marks_sent, (self.marks, ("played",)): summary.marks_played,
            (self.marks, ("cancelled",)): summary.marks_cancelled}
        for track in summary.tracks:
            now[self.media_messages, (track.name,)] = track.messages
            now[self.audio_seconds, (track.name,)] = track.bytes / 8000
            now[self.gaps, (track.name,)] = track.gaps
        for kind, count in summary.bad.items():
            now[self.bad_messages, (kind,)] = count
        for (metric, labels), value in now.items():
            more = value - added.get((metric, labels), 0)
            if more:
                (metric.labels(*labels) if labels else metric).inc(more)
                added[metric, labels] = value


# --- The floor: every live call on one page and one feed (--floor-port) ---------------------

FLOOR_ENDED_SECONDS = 600       # ... for this long
FLOOR_CALL_LINES = 500          # per call: transcript lines, key presses, marks and warnings kept for its page ...
FLOOR_CALL_OTHER_LINES = 20     # ... of which at most this many are not what was said (keys, marks, warnings)
SAID = ("transcript", "alert")
FLOOR_MOODS_KEPT = 12           # per call and track: the moods of its latest lines, its trend on the page
FLOOR_CONNECTIONS = 64          # pages and feeds served at once
FLOOR_FEEDS = FLOOR_CONNECTIONS // 2  # /events open at once: pages and /calls keep the other half
FLOOR_KEEPALIVE_SECONDS = 15    # a comment line on a quiet feed: proxies and browsers keep it open


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


FLOOR_KINDS: dict[type, tuple[str, Callable[[Any], dict]]] = {  # an event's type on the floor, and its fields
    Started: ("start", lambda e: {"tracks": list(e.tracks), "parameters": e.parameters, "format": e.media_format}),
    Level: ("level", lambda e: {"track": e.track, "dbfs": round(dbfs(e.mean_square), 1)}),
    Transcribed: ("transcript", lambda e: {"track": e.track, "offset": round(e.at, 2), "text": e.text,
                                           "partial": e.partial, **({} if e.mood is None else {"mood": e.mood}),
                                           **({"seconds": round(e.seconds, 2)} if e.seconds else {}),
                                           **({"redacted": sorted(set(e.redacted))} if e.redacted else {})}),
    Dtmf: ("dtmf", lambda e: {"digit": e.digit}),
    MarkEchoed: ("mark", lambda e: {"name": e.name, "cancelled": e.cancelled, "waited_ms": round(e.waited_ms)}),
    BargeIn: ("barge_in", lambda e: {"queued_seconds": round(e.queued_seconds, 2)}),
    Alerted: ("alert", lambda e: {"track": e.track, "category": e.category, "phrase": e.phrase, "text": e.text,
                                  **({"caller": e.caller} if e.caller else {})}),
    StatusCallback: ("status", lambda e: {"event": e.event, "error": e.error}),
    Warned: ("warning", lambda e: {"message": e.message}),
    Stopped: ("stop", lambda e: {}),
    Ended: ("end", lambda e: e.summary.fields()),
}


def floor_record(event: CallEvent, server: str) -> dict | None:
    """A call event as the floor and the Redis stream carry it: type, stream, call, server,
    time and the fields of its kind. None: not shown (before `start` a call has no SID)."""
    kind = FLOOR_KINDS.get(type(event))
    if kind is None or event.stream_sid is None:
        return None
    name, fields = kind
    return {"type": name, "stream": event.stream_sid, "call": event.call_sid, "server": server, "time": utc_now(),
            "uid": f"{server}/{event.number}", **fields(event)}


class Floor:
    """A sink of call events: the open and recently ended calls of this process (or, with
    --redis-url, of every process: follow_redis() publishes what they sent), and the feed of
    their events, numbered for Last-Event-ID. The page, /events and /calls read it."""

    def __init__(self, server: str, limits: Limits = Limits(), history: History | None = None):
        self.server, self.limits, self.history = server, limits, history
        self.redis_url: str | None = None          # with --redis-url: where a deletion is said to every floor
        if history is not None:
            history.forgotten.append(self.forget_call)
        self.calls: dict[str, dict] = {}          # stream SID: the call as the page shows it
        self.ended: deque = deque()                # (SID, time.monotonic()) of each ended call, oldest first
        self.events: deque = deque()               # the latest records, for a feed that resumes ...
        self.event_sizes: deque = deque()          # ... the length of each one's JSON
        self.events_bytes = 0                      # ... and their sum (Limits.floor_events_bytes at most)
        self.last_id = 0
        self.clients: set = set()                  # each feed's gevent queue
        self.heard: dict[str, float] = {}          # stream SID of each open call: time.monotonic() of its last event
        self.checked_silence_at = 0.0
        self.skipped = 0                           # Redis entries that were not call events (checked_record)

    def __call__(self, event: CallEvent) -> None:
        record = floor_record(event, self.server)
        if record is not None:
            self.publish(record)

    def publish(self, record: dict) -> None:
        """One event of any process (this one's, or another's through Redis): into the
        calls' state and out to every feed."""
        self.last_id += 1
        record["id"] = self.last_id
        self.update(record)
        if self.history is not None:
            self.history.add(record)
        self.keep(record)
        for client in list(self.clients):
            if client.qsize() >= self.limits.floor_client_queue:  # a feed that does not read: dropped, it resumes
                self.clients.discard(client)
                client.put(None)
            else:
                client.put(record)

    def keep(self, record: dict) -> None:
        """The latest events, for a feed that resumes: within a count and a size, whatever they hold."""
        size = len(json_dumps(record))
        self.events.append(record)
        self.event_sizes.append(size)
        self.events_bytes += size
        while len(self.events) > self.limits.floor_events_kept or self.events_bytes > self.limits.floor_events_bytes:
            self.events.popleft()
            self.events_bytes -= self.event_sizes.popleft()

    def update(self, record: dict) -> None:
        sid, kind = record["stream"], record["type"]
        if kind == "delete":  # someone deleted the call from its history: every floor forgets it
            return self.forget_call(sid)
        call = self.calls.get(sid)
        if call is None:
            parameters = record.get("parameters") or {}
            call = self.calls[sid] = {
                "stream": sid, "call": record["call"], "server": record["server"], "since": record["time"],
                "from": parameters.get("From") or record["call"], "parameters": parameters,
                "tracks": record.get("tracks", []), "levels": {}, "words": "", "lines": [], "alerts": 0,
                "moods": {}, "ended": None}
        elif call["ended"] and call["ended"]["how"] == "lost" and kind != "end":  # not lost after all
            call["ended"] = None
            self.ended = deque(item for item in self.ended if item[0] != sid)
        if call["ended"] is None:
            self.heard[sid] = time.monotonic()
        if kind == "level":
            call["levels"][record["track"]] = record["dbfs"]
        elif kind == "end":
            call["ended"] = {"time": record["time"], "how": record.get("ended"), "summary": {
                k: v for k, v in record.items() if k not in ("id", "type", "stream", "call", "server", "time", "uid")}}
            call["levels"] = {}
            if self.heard.pop(sid, None) is not None:
                self.ended.append((sid, time.monotonic()))
            self.forget_old_calls()
        elif kind in ("transcript", "alert", "dtmf", "mark", "warning", "barge_in", "stop"):
            if kind == "transcript":
                call["words"] = record["text"]
                if record["partial"]:  # the words so far of someone speaking: shown, not a line yet
                    return
                if "mood" in record:  # --mood: each speaker's trend, their latest lines
                    trend = call["moods"].setdefault(record["track"], [])
                    trend.append(record["mood"])
                    del trend[:-FLOOR_MOODS_KEPT]
            call["alerts"] += kind == "alert"
            lines = call["lines"]
            lines.append(record)
            if kind not in SAID and (others := [n for n, line in enumerate(lines) if line["type"] not in SAID]) \
                    and len(others) > FLOOR_CALL_OTHER_LINES:  # 500 key presses leave what was said alone
                del lines[others[0]]
            del lines[:-FLOOR_CALL_LINES]

    def forget_call(self, sid: str) -> None:
        self.calls.pop(sid, None)
        self.heard.pop(sid, None)
        self.ended = deque(item for item in self.ended if item[0] != sid)

    def delete(self, sid: str) -> bool:
        """A call deleted from the history (its rows, search entries, recordings, files) and
        forgotten here; with Redis, a `delete` event tells every floor, and the stream's own
        copies of the call's events are removed. False if this floor had not kept it."""
        found = self.history.forget(sid) if self.history is not None else False
        record = {"type": "delete", "stream": sid, "call": None, "server": self.server, "time": utc_now(),
                  "uid": f"{self.server}/delete/{sid}"}
        if self.redis_url:
            gevent.spawn(delete_from_redis, self.redis_url, record)
        else:
            self.publish(record)
        return found

    def end_silent_calls(self) -> None:
        """A call whose process was killed, or whose machine is gone, sends no `end`: once
        none of its events came for Limits.floor_silent_seconds, this floor ends it, `lost` (an event
        of its own, on this floor's feed only). Called only while Redis is read, and caught up."""
        now = time.monotonic()
        if now - self.checked_silence_at < 1:
            return
        self.checked_silence_at = now
        for sid, heard in list(self.heard.items()):
            if now - heard > self.limits.floor_silent_seconds:
                call = self.calls[sid]
                self.publish({"type": "end", "stream": sid, "call": call["call"], "server": call["server"],
                              "time": utc_now(), "ended": "lost", "silent_seconds": round(now - heard)})

    def forget_old_calls(self) -> None:
        cutoff = time.monotonic() - FLOOR_ENDED_SECONDS
        while self.ended and (len(self.ended) > self.limits.floor_ended_kept or self.ended[0][1] < cutoff):
            self.calls.pop(self.ended.popleft()[0], None)

    def snapshot(self) -> dict:
        """/calls: the open calls, those with alerts first, newest first; then the ended ones,
        the last to end first."""
        self.forget_old_calls()
        return {"server": self.server, "time": utc_now(), "last_id": self.last_id,
                "open": sorted((call for call in self.calls.values() if not call["ended"]),
                               key=lambda call: (call["alerts"] > 0, call["since"]), reverse=True),
                "ended": [self.calls[sid] for sid, _ in reversed(self.ended)]}

    def since(self, last_id: int | None) -> list[dict] | None:
        """The events after `last_id`, if they are all still kept; None: start again."""
        if last_id is None or last_id > self.last_id:
            return None
        if last_id == self.last_id:
            return []
        if not self.events or self.events[0]["id"] > last_id + 1:
            return None
        return [record for record in self.events if record["id"] > last_id]


SNAPSHOT_CALLS_AT_ONCE = 50  # calls serialized in one turn of the event loop (about 0.1-2 ms): then the others go on


def snapshot_pieces(snapshot: dict):
    """A snapshot's JSON in pieces, a few calls at a time, letting the event loop go on between
    them: a floor of many calls (each up to 100 parameters and 500 lines) never holds up the
    calls it shows. Each call is serialized whole, as it is at that moment."""
    head = json_dumps({name: value for name, value in snapshot.items() if name not in ("open", "ended")})
    yield head[:-1] + (b"," if len(head) > 2 else b"")
    done = 0
    for name in ("open", "ended"):
        yield (b"," if name == "ended" else b"") + f'"{name}":['.encode()
        for n, call in enumerate(snapshot[name]):
            yield (b"," if n else b"") + json_dumps(call)
            done += 1
            if done % SNAPSHOT_CALLS_AT_ONCE == 0:
                gevent.sleep(0)
        yield b"]"
    yield b"}"


def sse(record: dict, kind: str | None = None) -> bytes:
    """One Server-Sent Event: its id (Last-Event-ID), its kind if not `message`, its JSON."""
    head = f"id: {record['id']}\n" + (f"event: {kind}\n" if kind else "")
    return head.encode() + b"data: " + json_dumps(record) + b"\n\n"


FLOOR_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}  # on every answer


def floor_app(floor: Floor, token: str | None) -> Flask:
    """The floor's routes, a Flask app of their own on a listener of their own: `/` the page,
    `/events` the feed (Server-Sent Events), `/calls` one JSON document. With FLOOR_TOKEN
    every request needs it: `Authorization: Bearer <token>`, or `?token=` once (a browser
    keeps it in a cookie). Only GET (and HEAD) is answered; the token is checked first."""
    web = Flask("floor")

    @web.before_request
    def token_then_method() -> Response | None:
        if token and not floor_token_given(token):
            return Response(b"the floor needs its token (FLOOR_TOKEN): Authorization: Bearer <token>, or ?token=\n",
                            401, {"Content-Type": "text/plain; charset=utf-8", "WWW-Authenticate": "Bearer"})
        deleting = request.method == "POST" and request.path.startswith("/history/") and request.path.endswith("/delete")
        if request.method not in ("GET", "HEAD") and not deleting:
            return Response(b"", 405, {"Allow": "GET"})
        return None

    @web.after_request
    def on_every_answer(response: Response) -> Response:
        if token and request.args.get("token") and response.status_code != 401:
            if response.status_code == 200 and response.mimetype == "text/html":
                response = page_without_the_token()
            response.headers["Set-Cookie"] = f"floor_token={token}; HttpOnly; SameSite=Strict; Path=/"
        response.headers.update(FLOOR_HEADERS)
        return response

    @web.get("/", provide_automatic_options=False)
    def page() -> Response:
        return Response(FLOOR_PAGE, content_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": FLOOR_PAGE_POLICY})

    @web.get("/calls", provide_automatic_options=False)
    def calls() -> Response:
        return Response(snapshot_pieces(floor.snapshot()), content_type="application/json")

    refused = LogThrottle("floor requests refused", 5)

    @web.get("/events", provide_automatic_options=False)
    def events() -> Response:
        resume = request.headers.get("Last-Event-ID") or None
        if resume is not None and not re.fullmatch(r"[0-9]{1,18}", resume):  # int() of 4,301 digits raises
            refused.warning("bad floor request remote=%s path=/events status=400 reason=Last-Event-ID %s is not an "
                            "event's id", request.remote_addr, printable(resume, 40))
            return Response(b"Last-Event-ID: the id of an event this feed sent, a number\n", 400,
                            content_type="text/plain")
        if len(floor.clients) >= FLOOR_FEEDS:  # half the floor's connections: pages and /calls keep the rest
            refused.warning("floor request refused remote=%s path=/events status=503 reason=%d feeds open already",
                            request.remote_addr, FLOOR_FEEDS)
            return Response(b"too many feeds open: try again later\n", 503, {"Retry-After": "10"},
                            content_type="text/plain")
        return Response(floor_feed(floor, resume), content_type="text/event-stream", headers={"X-Accel-Buffering": "no"})

    @web.errorhandler(404)
    def not_found(_) -> Response:
        return Response(b"not found: the floor serves /, /events and /calls" +
                        (b", and the history at /history" if floor.history else b"") + b"\n", 404,
                        content_type="text/plain")

    def kept() -> History:
        if floor.history is None:
            abort(Response(b"the call history is off (--history off)\n", 404, content_type="text/plain"))
        return floor.history

    def found(history: History, limit: int = HISTORY_PAGE_CALLS) -> dict:
        try:
            return history.search(history_query(request.args), limit)
        except HistoryError as wrong:
            abort(Response(json_dumps({"error": str(wrong)}), 400, content_type="application/json"))
            raise

    @web.get("/history", provide_automatic_options=False)
    def history_page() -> Response:
        kept()
        return Response(HISTORY_PAGE, content_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": HISTORY_PAGE_POLICY})

    @web.get("/history.json", provide_automatic_options=False)
    def history_json() -> Response:
        return Response(json_dumps(found(kept())), content_type="application/json")

    @web.get("/history.csv", provide_automatic_options=False)
    def history_csv() -> Response:
        import csv
        calls = found(kept(), HISTORY_CSV_CALLS)["calls"]
        out = io.StringIO()
        writer = csv.writer(out)
        columns = ("stream", "call", "server", "caller", "called", "started", "ended_at", "ended", "duration", "alerts",
                   "categories", "mood_min", "mood_max", "hit")
        writer.writerow(columns)
        for call in calls:
            writer.writerow([csv_cell(str(call.get(name, "")).replace("\x02", "").replace("\x03", "")
                                      if name == "hit" else call.get(name)) for name in columns])
        return Response(out.getvalue(), content_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="calls.csv"'})

    @web.get("/history/<sid>", provide_automatic_options=False)
    def call_page(sid: str) -> Response:
        kept()
        return Response(CALL_PAGE, content_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": CALL_PAGE_POLICY})

    def the_call(sid: str) -> dict:
        call = kept().call(sid)
        if call is None:
            abort(Response(b"no such call in the history\n", 404, content_type="text/plain"))
        return call

    @web.get("/history/<sid>.json", provide_automatic_options=False)
    def call_json(sid: str) -> Response:
        call = the_call(sid)
        try:
            kept().stereo(call)
            call["recordings_here"] = True
        except OSError:
            call["recordings_here"] = False
        return Response(json_dumps(call), content_type="application/json")

    @web.get("/history/<sid>.wav", provide_automatic_options=False)
    def call_wav(sid: str) -> Response:
        """Both tracks as one stereo WAV (the caller on the left), served in ranges: the player seeks."""
        try:
            paths, frames = kept().stereo(the_call(sid))
        except OSError:
            return Response(b"this call's recordings are not on this machine\n", 404, content_type="text/plain")
        total = WAV_HEADER_BYTES + 4 * frames
        wanted = request.range.range_for_length(total) if request.range else None
        start, end = wanted or (0, total)
        body = stereo_wav_bytes(paths, frames, start, end)
        response = Response(body, 206 if wanted else 200, content_type="audio/wav", headers={"Accept-Ranges": "bytes"})
        if wanted:
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{total}"
        return response

    @web.post("/history/<sid>/delete", provide_automatic_options=False)
    def delete_call(sid: str) -> Response:
        kept()
        gone = floor.delete(sid)
        return Response(b"deleted\n" if gone else b"not kept here; every floor is told to forget it\n",
                        200 if gone else 404, content_type="text/plain")

    return web


def page_without_the_token() -> Response:
    """A page opened with ?token=: the same page again without it (303), once its cookie is set,
    so that the token leaves the address bar, the browser's history and what a screen shows."""
    query = urlencode([(name, value) for name, value in request.args.items(multi=True) if name != "token"])
    return Response(b"", 303, {"Location": request.path + ("?" + query if query else "")})


def floor_token_given(token: str) -> bool:
    """Whether the request carries the floor's token: ?token=, its cookie, or Authorization: Bearer."""
    offered = [request.args.get("token"), request.cookies.get("floor_token"),
               request.headers.get("Authorization", "").removeprefix("Bearer ")]
    return any(hmac.compare_digest(candidate.encode(), token.encode()) for candidate in offered if candidate)


def floor_feed(floor: Floor, last_event_id: str | None):
    """/events: the open calls first (a `snapshot` event), or, resuming, the events missed;
    then every event as it happens."""
    queue: gevent.queue.Queue = gevent.queue.Queue()
    floor.clients.add(queue)  # before the snapshot: nothing falls between the two
    try:
        missed = floor.since(int(last_event_id) if last_event_id else None)
        shown = floor.last_id  # what the snapshot, or the events missed, cover: the queue has what follows
        if missed is None:
            snapshot = {"id": shown, **floor.snapshot()}  # now, with `shown`: what follows is on the queue
            yield f"id: {shown}\nevent: snapshot\ndata: ".encode()
            yield from snapshot_pieces(snapshot)
            yield b"\n\n"
        for record in missed or ():
            yield sse(record)
        while True:
            try:
                batch = [queue.get(timeout=FLOOR_KEEPALIVE_SECONDS)]
            except gevent.queue.Empty:
                yield b": keep-alive\n\n"
                continue
            batch += [queue.get_nowait() for _ in range(queue.qsize())]  # all that came: one write
            yield b"".join(sse(record) for record in batch if record is not None and record["id"] > shown)
            if batch[-1] is None:  # it fell Limits.floor_client_queue behind: it reconnects, and resumes
                return
    finally:
        floor.clients.discard(queue)


# --- The floor's page: plain HTML, CSS and JavaScript, nothing fetched from elsewhere -------
# Whatever a client sent (parameters, SIDs, words) is set with textContent, never as markup,
# and the page's policy allows no script but this one (its hash) and no connection but ours.

PAGE_HELPERS = r"""
"use strict";
const $ = (id) => document.getElementById(id);
function el(tag, className, text) {  // what a client sent goes in as text, never as markup
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}
"""  # the start of every page's script

FLOOR_SCRIPT = PAGE_HELPERS + r"""
// Each call keeps its row; an event marks its call changed, and the next frame redraws only
// the rows of changed calls (a whole table of 1,000 rows took 0.8 s to rebuild in Chromium).
const calls = new Map(), changed = new Set();
const KEPT = 500, ENDED_KEPT = 200, MOODS = 12;
let selected = null, drawing = false, live = 0, ended = 0;
const clock = (iso) => iso ? new Date(iso).toLocaleTimeString() : "";
function add(call) {
  calls.set(call.stream, call);
  changed.add(call);
  if (call.ended) ended++; else live++;
}
function apply(r) {
  let call = calls.get(r.stream);
  if (r.type === "delete") {  // deleted from the history: gone from every floor
    if (call) { if (call.tr) call.tr.remove(); calls.delete(r.stream); if (call.ended) ended--; else live--; }
    return;
  }
  if (!call) {
    const p = r.parameters || {};
    call = {stream: r.stream, call: r.call, server: r.server, since: r.time, from: p.From || r.call,
            parameters: p, tracks: r.tracks || [], levels: {}, words: "", lines: [], alerts: 0, moods: {}, ended: null};
    add(call);
  }
  changed.add(call);
  if (call.ended && call.ended.how === "lost" && r.type !== "end") {  // its process was not gone after all
    call.ended = null; live++; ended--; call.moved = true;
  }
  if (r.type === "level") call.levels[r.track] = r.dbfs;
  else if (r.type === "end") {
    const summary = Object.assign({}, r);
    for (const key of ["id", "type", "stream", "call", "server", "time", "uid"]) delete summary[key];
    if (!call.ended) { live--; ended++; call.moved = true; }
    call.ended = {time: r.time, how: r.ended, summary: summary};
    call.levels = {};
  } else if (["transcript", "alert", "dtmf", "mark", "warning", "barge_in", "stop"].includes(r.type)) {
    if (r.type === "transcript") {
      call.words = r.text;
      if (r.partial) return;  // the words so far of someone speaking: shown, not a line yet
      if (typeof r.mood === "number") (call.moods[r.track] ||= []).push(r.mood) > MOODS && call.moods[r.track].shift();
    }
    if (r.type === "alert" && !call.alerts++ && !call.ended) call.moved = true;  // up, among the calls with alerts
    call.lines.push(r);
    if (call.lines.length > KEPT) call.lines.splice(0, call.lines.length - KEPT);
  }
}
function bar(levels, track) {
  const box = el("span", "level"), fill = el("span", "fill " + track);
  box.append(el("span", "track", track === "inbound" ? "in" : "out"), fill);
  levels.append(box);
  return (dbfs) => {
    box.title = track + " " + dbfs + " dBFS";
    set(fill.style, "transform", "scaleX(" + Math.max(0, Math.min(1, (dbfs + 60) / 60)).toFixed(2) + ")");  // no layout
  };
}
function row(call) {  // open calls newest first, then ended ones, the last to end first
  const tr = call.tr = el("tr");
  tr.dataset.stream = call.stream;
  call.cells = {who: el("td", "who"), since: el("td", "since"), levels: el("td", "levels"),
                words: el("td", "words"), mood: el("td", "mood"), state: el("td", "state")};
  call.bars = {};
  tr.append(...Object.values(call.cells));
  tr.addEventListener("click", () => {
    const before = calls.get(selected);
    if (before) changed.add(before);
    selected = call.stream;
    changed.add(call);
    draw();
  });
  return tr;
}
// Open calls with alerts first, then the other open ones, each newest first; then the ended
// ones, the last to end first. A row is placed when it is new, or moved (ended, alerted, back).
function place(call, table) {
  if (call.tr && !call.moved) return;
  call.moved = false;
  const tr = call.tr || row(call);
  const firstEnded = table.querySelector("tr.ended");
  const top = call.ended ? firstEnded
            : call.alerts ? table.firstChild
            : table.querySelector("tr.open:not(.alerted)") || firstEnded;
  if (top !== tr) table.insertBefore(tr, top);
}
function set(node, key, value) { if (node[key] !== value) node[key] = value; }  // unchanged: no layout
function refresh(call) {
  const cells = call.cells;
  set(call.tr, "className", (call.ended ? "ended" : "open") + (call.alerts ? " alerted" : "") +
                            (call.stream === selected ? " selected" : ""));
  set(cells.who, "textContent", String(call.from));
  set(cells.since, "textContent", clock(call.since));
  if (call.ended && cells.levels.firstChild) { cells.levels.replaceChildren(); call.bars = {}; }
  for (const [track, dbfs] of Object.entries(call.levels)) (call.bars[track] ||= bar(cells.levels, track))(dbfs);
  set(cells.words, "textContent", call.words);
  const moods = JSON.stringify(call.moods || {});
  if (call.shownMoods !== moods) { call.shownMoods = moods; cells.mood.replaceChildren(...trends(call.moods || {})); }
  const alerts = call.alerts ? " · " + call.alerts + (call.alerts > 1 ? " alerts" : " alert") : "";
  const state = call.ended ? "ended " + (call.ended.how || "") + " " + clock(call.ended.time) : "live";
  set(cells.state, "textContent", state + alerts);
}
function mark(mood) {  // a line's mood: red (-1) to green (+1)
  const box = el("span", "m");
  box.style.background = "hsl(" + Math.round(60 + 60 * mood) + ", 70%, 45%)";
  box.title = String(mood);
  return box;
}
function trends(moods) {  // each speaker's latest lines, oldest first
  return Object.entries(moods).map(([track, scores]) => {
    const line = el("div", "trend", track === "inbound" ? "caller " : "agent ");
    line.append(...scores.map(mark));
    return line;
  });
}
function detail(call) {
  const box = $("detail");
  box.replaceChildren();
  if (!call) { box.append(el("p", "hint", "Click a call to follow it.")); return; }
  box.append(el("h2", null, call.from), el("p", "sids", call.stream + " · " + call.call + " · " + call.server));
  if (call.ended) {
    const review = el("a", null, "review it in the history");
    review.href = "history/" + encodeURIComponent(call.stream);
    box.append(review);
  }
  const params = el("dl", "params");
  for (const [name, value] of Object.entries(call.parameters)) params.append(el("dt", null, name), el("dd", null, value));
  box.append(params);
  const lines = el("ol", "conversation");
  for (const r of call.lines) {
    const li = el("li", r.type + (r.track ? " " + r.track : ""));
    li.append(el("time", null, clock(r.time)));
    if (r.type === "transcript") {
      li.append(el("b", null, r.track === "inbound" ? "caller" : "agent"), el("span", null, r.text));
      if (typeof r.mood === "number") li.append(" ", mark(r.mood), el("small", "mood", " " + r.mood.toFixed(2)));
    }
    else if (r.type === "alert") li.append(el("b", null, "alert " + r.category), el("span", null, "“" + r.phrase + "”"));
    else if (r.type === "dtmf") li.append(el("span", null, "pressed " + r.digit));
    else if (r.type === "mark") li.append(el("span", null, "mark " + r.name + (r.cancelled ? " cancelled" : " played")));
    else if (r.type === "warning") li.append(el("span", null, "warning: " + r.message));
    else if (r.type === "barge_in") li.append(el("span", null, "the caller spoke over the audio"));
    else li.append(el("span", null, r.type));
    lines.append(li);
  }
  box.append(lines);
  if (call.ended) {
    const summary = el("dl", "summary");
    for (const [name, value] of Object.entries(call.ended.summary)) summary.append(el("dt", null, name), el("dd", null, value));
    box.append(el("h3", null, "ended " + (call.ended.how || "")), summary);
  }
}
function draw() {
  drawing = false;
  const table = $("calls");
  const shown = calls.get(selected);
  for (const call of changed) {
    if (calls.get(call.stream) !== call) continue;  // forgotten, or replaced by a snapshot
    place(call, table);
    refresh(call);
  }
  while (ended > ENDED_KEPT && table.lastChild && table.lastChild.classList.contains("ended")) {
    calls.delete(table.lastChild.dataset.stream);
    table.lastChild.remove();
    ended--;
  }
  if (!shown || changed.has(shown)) detail(shown);
  changed.clear();
  $("count").textContent = live + " live";
}
const later = () => { if (!drawing) { drawing = true; requestAnimationFrame(draw); } };
const feed = new EventSource("events");
feed.addEventListener("snapshot", (e) => {
  const s = JSON.parse(e.data);
  calls.clear();
  changed.clear();
  live = ended = 0;
  $("calls").replaceChildren();
  for (const call of [...s.ended].reverse()) add(call);  // each placed at the top of its part
  for (const call of [...s.open].reverse()) add(call);
  $("detail").replaceChildren();
  later();
});
feed.onmessage = (e) => { apply(JSON.parse(e.data)); later(); };
feed.onerror = () => { $("count").textContent = "reconnecting…"; };
"""

FLOOR_PAGE_POLICY = ("default-src 'none'; style-src 'unsafe-inline'; connect-src 'self'; "
                     f"script-src 'sha256-{base64.b64encode(hashlib.sha256(FLOOR_SCRIPT.encode()).digest()).decode()}'")

FLOOR_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Calls: the floor</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 14px system-ui, sans-serif; margin: 0; display: flex; height: 100vh; color: #222; }
main { flex: 3; min-width: 0; overflow: auto; padding: 1em; } aside { flex: 1.5; overflow: auto; padding: 1em; background: #f6f6f6; }
table { border-collapse: collapse; width: 100%; table-layout: fixed; }
td { padding: .4em .6em; border-bottom: 1px solid #ddd; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
th:nth-child(2) { width: 7em; } th:nth-child(3) { width: 7em; } th:nth-child(5) { width: 5em; }
th:nth-child(6) { width: 9em; } .m { display: inline-block; width: .5em; height: .8em; margin-right: 1px; }
.trend { font-size: 70%; white-space: nowrap; } .conversation .mood { color: #888; }
td.levels { white-space: normal; }
tr { cursor: pointer; } tr.selected { background: #e6f0ff; } tr.ended { color: #888; }
.level { display: inline-block; width: 6em; height: .8em; background: #eee; margin-right: .4em; position: relative; }
.level .fill { position: absolute; left: 1.6em; right: 0; top: 0; bottom: 0; background: #3a3; transform-origin: left; }
.level .fill.outbound { background: #36c; } .level .track { font-size: 70%; }
.conversation { list-style: none; padding: 0; } .conversation li { margin: .3em 0; }
.conversation time { color: #888; margin-right: .5em; } .conversation b { margin-right: .5em; }
.conversation .outbound { text-align: right; } .conversation .warning { color: #a40; }
tr.alerted td.state, .conversation .alert { color: #b00; font-weight: bold; }
dt { font-weight: bold; float: left; clear: left; margin-right: .5em; } dd { margin: 0; }
.sids { color: #888; font-size: 85%; }
</style></head>
<body><main><h1>Calls <small id="count"></small> <small><a href="history">history</a></small></h1>
<table><thead><tr><th>who</th><th>since</th><th>level</th><th>latest words</th><th>mood</th><th></th></tr></thead>
<tbody id="calls"></tbody></table></main>
<aside id="detail"></aside>
<script>""" + FLOOR_SCRIPT + """</script></body></html>
"""


# --- The floor across processes: one Redis stream (--redis-url) ------------------------------
# Every process adds its calls' events to one Redis stream; every floor reads all of it, as
# would another program of yours (XREADGROUP: the README). redis-py is imported only here.

REDIS_STREAM = "mediastreams:events"  # each entry: one field, `event`, the floor's JSON record
REDIS_BATCH = 500             # events sent, or read, in one round trip
REDIS_GATHER_SECONDS = 0.1    # events gathered for one round trip: its cost (about 0.3 ms of CPU) ten times a second
REDIS_TIMEOUT_SECONDS = 5     # a command still unanswered after this long: Redis counts as down
REDIS_RETRY_SECONDS = (0.1, 5.0)   # after a failure, wait this long before the next try, doubling up to this
REDIS_WARN_SECONDS = 60       # while Redis stays down: a warning this often, with what was dropped

# A batch of events in one command: redis-py's pipeline of one XADD each cost the publishing
# process about 20 µs an event, this script about 2 (tests/README.md). Redis runs it atomically.
REDIS_ADD_SCRIPT = """
for i = 2, #ARGV do redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'event', ARGV[i]) end
return #ARGV - 1
"""


def give_redis_gevent_sockets() -> None:
    """Once, at start-up (create_runtime() with --redis-url): redis-py's connections made on
    gevent's socket and ssl, so that a command waits as a greenlet does and never holds up
    the event loop (`python app.py` does not monkey-patch; gunicorn's worker does). redis-py
    reads both as globals of its connection module (LIBRARY_EDGES)."""
    import gevent.ssl
    import redis.connection

    def create_default_context() -> gevent.ssl.SSLContext:  # gevent.ssl's own is the stdlib's: it blocks
        context = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_CLIENT)
        context.load_default_certs()
        return context

    redis.connection.socket = gevent.socket
    redis.connection.ssl = types.SimpleNamespace(**{  # type: ignore[assignment]
        **vars(gevent.ssl), "create_default_context": create_default_context})


def connect_redis(url: str) -> Any:
    """A redis-py client (on gevent's sockets: give_redis_gevent_sockets()). One for each
    greenlet that uses one: redis-py's pool locks belong to the thread, not the greenlet."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    return redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_SECONDS, retry=Retry(NoBackoff(), 0),
                                socket_connect_timeout=REDIS_TIMEOUT_SECONDS, health_check_interval=0)


def shown_redis_url(url: str) -> str:
    """The URL without its password, for the console."""
    parts = urlsplit(url)
    return parts._replace(netloc=f"{parts.username or ''}:***@{parts.hostname}" + (
        f":{parts.port}" if parts.port else "")).geturl() if parts.password else url


class RedisDown:
    """What a greenlet that talks to Redis says while it cannot: one warning as Redis goes
    down, then at most one every REDIS_WARN_SECONDS, one line when it is back; and how long
    to wait before the next try (back-off)."""

    def __init__(self, url: str, doing: str):
        self.url, self.doing = shown_redis_url(url), doing
        self.since: float | None = None
        self.warned_at = 0.0
        self.retry = REDIS_RETRY_SECONDS[0]

    def failed(self, exc: Exception, dropped: int | None = None) -> None:
        now = time.monotonic()
        if self.since is None or now - self.warned_at >= REDIS_WARN_SECONDS:
            down = f"still down after {now - self.since:.0f} s" if self.since else "down"
            log.warning("Redis at %s %s (%s: %s): %s%s; trying again", self.url, down, type(exc).__name__,
                        printable(str(exc), 200), self.doing, "" if dropped is None else f", {dropped} dropped so far")
            self.warned_at = now
        self.since = self.since or now
        gevent.sleep(self.retry)
        self.retry = min(self.retry * 2, REDIS_RETRY_SECONDS[1])

    def worked(self, dropped: int | None = None) -> None:
        if self.since is not None:
            log.info("Redis at %s is back after %.0f s%s", self.url, time.monotonic() - self.since,
                     "" if dropped is None else f"; {dropped} event(s) dropped while it was down")
        self.since, self.retry = None, REDIS_RETRY_SECONDS[0]


class RedisPublisher:
    """A sink: this process's call events, as the floor's records, added to the Redis stream
    by a greenlet of its own (start()). A call never waits for Redis: while it is down,
    slow or refusing, events wait in a bounded queue, and what does not fit is dropped and
    counted (mediastreams_floor_events_dropped_total)."""

    def __init__(self, url: str, server: str, max_events: int, metrics: Metrics | None = None,
                 queue_size: int = Limits.redis_queue):
        self.url, self.server, self.max_events, self.metrics = url, server, max_events, metrics
        self.queue_size = queue_size
        self.queue: deque = deque()
        self.queued = gevent.event.Event()
        self.sent = gevent.event.Event()  # nothing waits, nothing is on its way
        self.dropped = 0
        self.greenlet: gevent.Greenlet | None = None

    def __call__(self, event: CallEvent) -> None:
        record = floor_record(event, self.server)
        if record is None:
            return
        if len(self.queue) >= self.queue_size // 2 and record["type"] == "level":  # the next second's level will do
            self.drop(1)
            return
        if len(self.queue) >= self.queue_size:  # the floor catches up on what happened last
            self.queue.popleft()
            self.drop(1)
        self.queue.append(record)
        self.queued.set()
        self.sent.clear()
        self.start()

    def drop(self, count: int) -> None:
        self.dropped += count
        if self.metrics:
            self.metrics.floor_events_dropped.inc(count)

    def start(self) -> None:
        if self.greenlet is None:
            self.greenlet = gevent.spawn(self.publish_forever)

    def flush(self, timeout: float) -> None:
        """At exit: the last events (the summaries of the calls just ended) sent, within `timeout`."""
        if self.greenlet is not None:
            self.sent.wait(timeout)

    def publish_forever(self) -> None:
        import redis
        down = RedisDown(self.url, f"the floor's events wait for it, up to {self.queue_size}")
        dropped_before = 0
        client = None
        while True:
            try:
                client = client or connect_redis(self.url)
                client.ping()  # at start-up, an unreachable Redis is a warning then, not at the first call
                add = client.register_script(REDIS_ADD_SCRIPT)  # loaded again by redis-py if Redis lost it
                if not self.queue:  # else it is back once what waits is taken: a Redis that answers but
                    down.worked(self.dropped - dropped_before)  # refuses (out of memory) is still down
                while True:
                    while not self.queue:
                        self.sent.set()
                        self.queued.clear()
                        self.queued.wait()
                    gevent.sleep(REDIS_GATHER_SECONDS)
                    batch = [self.queue.popleft() for _ in range(min(REDIS_BATCH, len(self.queue)))]
                    try:
                        add(keys=[REDIS_STREAM], args=[self.max_events, *map(json_dumps, batch)])
                    except BaseException:  # not sent, or not known to be: sent again (at least once)
                        self.queue.extendleft(reversed(batch))
                        raise
                    down.worked(self.dropped - dropped_before)
            except (redis.RedisError, OSError) as exc:
                if client is not None:
                    client.close()
                    client = None
                if down.since is None:
                    dropped_before = self.dropped
                down.failed(exc, self.dropped - dropped_before)


def delete_from_redis(url: str, record: dict) -> None:
    """A call deleted: its events removed from the Redis stream, and a `delete` event added
    for every floor (this one's included: it forgets the call when it reads it)."""
    import redis
    sid = record["stream"]
    try:
        client = connect_redis(url)
        client.set_response_callback("XRANGE", lambda reply, **options: reply)
        start = "-"
        while True:
            entries = client.xrange(REDIS_STREAM, start, "+", count=REDIS_BATCH)
            ids = [entry_id for entry_id, fields in entries
                   if f'"stream":{json.dumps(sid)}'.encode() in b"".join(fields[1::2])]
            if ids:
                client.xdel(REDIS_STREAM, *ids)
            if len(entries) < REDIS_BATCH:
                break
            start = "(" + entries[-1][0].decode()
        client.xadd(REDIS_STREAM, {"event": json_dumps(record)})
        client.close()
    except (redis.RedisError, OSError) as exc:
        log.warning("Redis at %s: deleting call %s failed (%s: %s); this floor forgot it, others keep it",
                    shown_redis_url(url), printable(sid, 64), type(exc).__name__, printable(str(exc), 200))


REDIS_ENTRY_BYTES = 65_536  # a call event is a few hundred bytes (a start with its parameters a few KiB): more is skipped


def text_of(limit: int) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and len(value) <= limit


def optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool) or is_number(value) or text_of(2000)(value)


RECORD_FIELDS: dict[str, Callable[[Any], bool]] = {  # every record's: the floor sorts, shows and keeps by them
    "stream": text_of(64), "call": optional(text_of(64)), "server": text_of(200), "uid": optional(text_of(300)),
    "time": lambda value: isinstance(value, str) and bool(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z",
                                                                   value))}
KIND_FIELDS: dict[str, dict[str, Callable[[Any], bool]]] = {  # each kind's own, as FLOOR_KINDS makes them
    "start": {"tracks": lambda value: isinstance(value, list) and len(value) <= 4 and all(map(text_of(100), value)),
              "parameters": lambda value: isinstance(value, dict) and len(value) <= 100 and all(
                  text_of(100)(name) and text_of(1000)(v) for name, v in value.items()),
              "format": optional(text_of(200))},
    "level": {"track": text_of(20), "dbfs": is_number},
    "transcript": {"track": text_of(20), "offset": is_number, "text": text_of(5000),
                   "partial": lambda value: isinstance(value, bool), "mood": optional(is_number), "seconds": optional(is_number),
        "redacted": optional(lambda value: isinstance(value, list) and all(map(text_of(40), value)))},
    "dtmf": {"digit": text_of(4)}, "mark": {"name": text_of(300)}, "barge_in": {"queued_seconds": is_number},
    "alert": {"track": text_of(20), "category": text_of(100), "phrase": text_of(300), "text": text_of(5000),
              "caller": optional(text_of(64))},
    "status": {"event": text_of(40), "error": optional(text_of(300))}, "warning": {"message": text_of(400)},
    "stop": {}, "end": {}, "delete": {}}


def checked_record(record: Any) -> dict | None:
    """A record read from the Redis stream, which other programs may write to, if each field the
    floor reads has the type and size it needs (None: skipped). Fields of a kind's own it does
    not know must be plain values."""
    if not isinstance(record, dict) or record.get("type") not in KIND_FIELDS:
        return None
    own = KIND_FIELDS[record["type"]]
    for name, value in record.items():
        check = RECORD_FIELDS.get(name) or own.get(name) or (None if name in ("type", "id") else is_scalar)
        if check is not None and not check(value):
            return None
    required = ("stream", "server", "time", *(name for name, check in own.items() if check(None) is False))
    return record if all(name in record for name in required) else None


def redis_record(fields: Any) -> dict | None:
    """The call event an entry of the Redis stream holds (its `event` field), checked; None if it
    holds none: another program's entry, one over REDIS_ENTRY_BYTES, or one trimmed away."""
    try:
        raw = fields[fields[::2].index(b"event") * 2 + 1]
        return checked_record(json_loads(raw)) if len(raw) <= REDIS_ENTRY_BYTES else None
    except (TypeError, ValueError, AttributeError, RecursionError):
        return None


def follow_redis(url: str, floor: Floor) -> None:
    """A floor's greenlet: every process's events from the Redis stream (from its oldest
    kept, so calls already open are shown), onto this floor; after Redis was down, on from
    the last one read."""
    import redis
    down = RedisDown(url, "the floor shows nothing new until it is back")
    skipped = LogThrottle("Redis entries that are not call events", 1)
    last, client = "0-0", None
    while True:
        try:
            if client is None:
                client = connect_redis(url)
                client.set_response_callback("XREAD", lambda reply, **options: reply)  # no dict made per entry
            read = client.xread({REDIS_STREAM: last}, count=REDIS_BATCH, block=1000)
            if down.since is not None:  # what the calls sent meanwhile comes now: none is lost for it
                floor.heard = dict.fromkeys(floor.heard, time.monotonic())
            down.worked()
        except (redis.RedisError, OSError) as exc:
            if client is not None:
                client.close()
                client = None
            down.failed(exc)
            continue
        behind = False
        for _stream, entries in read.items() if isinstance(read, dict) else read or ():  # RESP3, RESP2
            behind = len(entries) >= REDIS_BATCH
            for entry_id, fields in entries:
                last = entry_id
                record = redis_record(fields)
                if record is None:  # another program's entry, or one broken: skipped, counted, said
                    floor.skipped += 1
                    skipped.warning("Redis stream %s: entry %s is not a call event (or one over %d bytes): skipped, "
                                    "%d so far", REDIS_STREAM, printable(entry_id.decode("ascii", "replace"), 40),
                                    REDIS_ENTRY_BYTES, floor.skipped)
                else:
                    floor.publish(record)
        if not behind:
            floor.end_silent_calls()
        gevent.sleep(0 if behind else REDIS_GATHER_SECONDS)  # a round trip for many events; catching up, pages get in


# --- The call history (--history): every call a floor sees, kept in SQLite -------------------
# Whatever serves a floor keeps what it shows: every call, its lines (what was said, already
# redacted, with its mood; alerts, keys, marks, warnings) and its summary, in one SQLite file
# (the standard library's sqlite3, WAL, FTS5 for what was said). The floor hands each record
# over; a greenlet gathers them and a native thread writes them in batches, so no call and no
# turn of the event loop ever waits for the disk. Each event carries a `uid`: written once,
# however many times it is read (a Redis outage, a floor restarted reading the stream again).

HISTORY_QUEUE = 50_000          # records waiting to be written; beyond, the newest are dropped and counted
HISTORY_BATCH = 5_000           # records written in one transaction
HISTORY_GATHER_SECONDS = 0.2    # records gathered for one transaction
HISTORY_PAGE_CALLS = 50         # calls on a page of /history
HISTORY_CSV_CALLS = 10_000      # calls in an export (/history.csv)
HISTORY_SWEEP_SECONDS = 3600    # how often calls older than --history-days are forgotten
HISTORY_LINES = ("transcript", "alert", "dtmf", "mark", "warning", "barge_in", "status", "stop")  # a call's lines
HISTORY_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    stream TEXT PRIMARY KEY, call TEXT, server TEXT, caller TEXT, called TEXT, parameters TEXT, tracks TEXT,
    started TEXT, ended_at TEXT, ended TEXT, duration REAL, summary TEXT, recordings TEXT,
    alerts INTEGER NOT NULL DEFAULT 0, categories TEXT NOT NULL DEFAULT ' ', mood_min REAL, mood_max REAL);
CREATE INDEX IF NOT EXISTS calls_by_start ON calls(started);
CREATE INDEX IF NOT EXISTS calls_by_caller ON calls(caller, started);
CREATE TABLE IF NOT EXISTS lines (
    id INTEGER PRIMARY KEY, stream TEXT NOT NULL, uid TEXT UNIQUE, time TEXT, kind TEXT, track TEXT,
    offset REAL, seconds REAL, text TEXT, mood REAL, data TEXT);
CREATE INDEX IF NOT EXISTS lines_by_call ON lines(stream, id);
CREATE VIRTUAL TABLE IF NOT EXISTS said USING fts5(text, content='lines', content_rowid='id');
CREATE TRIGGER IF NOT EXISTS a_line_said AFTER INSERT ON lines WHEN new.kind = 'transcript' BEGIN
    INSERT INTO said(rowid, text) VALUES (new.id, new.text);
    UPDATE calls SET mood_min = min(coalesce(mood_min, new.mood), new.mood),
                     mood_max = max(coalesce(mood_max, new.mood), new.mood)
        WHERE stream = new.stream AND new.mood IS NOT NULL;
END;
CREATE TRIGGER IF NOT EXISTS a_line_unsaid AFTER DELETE ON lines WHEN old.kind = 'transcript' BEGIN
    INSERT INTO said(said, rowid, text) VALUES ('delete', old.id, old.text);
END;
CREATE TRIGGER IF NOT EXISTS an_alert AFTER INSERT ON lines WHEN new.kind = 'alert' BEGIN
    UPDATE calls SET alerts = alerts + 1, categories = categories || json_extract(new.data, '$.category') || ' '
        WHERE stream = new.stream;
END;
"""


class HistoryError(Exception):
    """A search the history cannot make: one line for the client (400)."""


def history_query(args) -> dict:
    """The filters of /history.json and /history.csv, checked: `q` (words, "phrases",
    prefix*), `since` and `until` (ISO dates or times, UTC), `caller`, `category`,
    `mood_below`, `mood_above`, `ended`, `min_seconds`, `page`."""
    def number(name: str, low: float, high: float):
        raw = args.get(name) or ""
        if not raw:
            return None
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (low <= value <= high):
            raise HistoryError(f"{name}: a number from {low:g} to {high:g}")
        return value

    def moment(name: str) -> str | None:
        raw = (args.get(name) or "").strip()
        if not raw:
            return None
        try:
            when = datetime.datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise HistoryError(f"{name}: a date or time, such as 2026-12-06 or 2026-12-06T09:30") from None
        if when.tzinfo:
            when = when.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        return when.isoformat(timespec="milliseconds") + "Z"

    def text(name: str, limit: int) -> str | None:
        return (args.get(name) or "").strip()[:limit] or None

    page = number("page", 1, 100_000)
    return {"q": text("q", 500), "since": moment("since"), "until": moment("until"), "caller": text("caller", 100),
            "category": text("category", 100), "mood_below": number("mood_below", -1, 1),
            "mood_above": number("mood_above", -1, 1), "ended": text("ended", 40),
            "min_seconds": number("min_seconds", 0, 10**7), "page": int(page or 1)}


def on_thread(pool: gevent.threadpool.ThreadPool, function: Callable, *args) -> Any:
    """function(*args) on one of `pool`'s native threads, this greenlet waiting for it; what it
    raises is raised here (gevent's pool would also print it, as a traceback on the console)."""
    def caught() -> tuple[bool, Any]:
        try:
            return True, function(*args)
        except Exception as exc:  # handed back to the greenlet, which raises it
            return False, exc
    done, result = pool.apply(caught)
    if not done:
        raise result
    return result


class History:
    """--history FILE: the floor's records, kept (add()), found (search(), call()) and
    forgotten (forget(), and every HISTORY_SWEEP_SECONDS what is older than --history-days).
    Writing happens on a native thread of its own; reads on others (WAL lets them run beside
    the writer). A database that is full, locked or gone costs no call: records are dropped and
    counted, with one warning at a time."""

    def __init__(self, path: str, days: float, limits: Limits = Limits()):
        self.path, self.days, self.limits = path, days, limits
        self.queue: deque = deque()
        self.arrived = gevent.event.Event()
        self.written = gevent.event.Event()  # nothing waits: what was added is on disk
        self.dropped = 0
        self.writer_thread = gevent.threadpool.ThreadPool(1)
        self.readers = gevent.threadpool.ThreadPool(2)
        self.connections = threading.local()
        self.failing: str | None = None       # why the last write failed, while it does
        self.forgotten: list[Callable[[str], None]] = []  # told of each call forgotten here (the floor)
        self.greenlets: list = []

    def open(self) -> None:
        """At start-up: the file made and checked, or SettingsError with one line."""
        try:
            folder = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(folder, mode=0o700, exist_ok=True)
            connection = sqlite3.connect(self.path)
            connection.executescript(HISTORY_SCHEMA)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.close()
            os.chmod(self.path, 0o600)  # what callers said: for the server's user only
        except (OSError, sqlite3.Error) as exc:
            raise SettingsError(f"--history (HISTORY): cannot keep the call history in {self.path!r}: {exc}") from None

    def start(self) -> None:
        if not self.greenlets:
            self.greenlets = [gevent.spawn(self.write_forever), gevent.spawn(self.sweep_forever)]

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3's belong to the thread that made them)."""
        connection = getattr(self.connections, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.path, timeout=self.limits.history_busy_seconds, isolation_level=None)
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA synchronous=NORMAL")
            self.connections.connection = connection
        return connection

    # --- kept -------------------------------------------------------------------------------

    def add(self, record: dict) -> None:
        """A floor's record, to be written: never waits."""
        if record["type"] == "level" or record.get("partial"):
            return
        if len(self.queue) >= HISTORY_QUEUE:
            self.dropped += 1
            return
        self.queue.append(record)
        self.written.clear()
        self.arrived.set()

    def write_forever(self) -> None:
        warned_at = -math.inf
        while True:
            while not self.queue:
                self.written.set()
                self.arrived.clear()
                self.arrived.wait()
            gevent.sleep(HISTORY_GATHER_SECONDS)
            batch = [self.queue.popleft() for _ in range(min(HISTORY_BATCH, len(self.queue)))]
            try:
                forgotten = on_thread(self.writer_thread, self.write, batch)
                if self.failing:
                    log.info("the call history (%s) is written again; %d record(s) were dropped", self.path,
                             self.dropped)
                    self.failing = None
            except (sqlite3.Error, OSError) as exc:  # full, locked, read-only, gone: the calls go on
                self.dropped += len(batch)
                self.failing = f"{type(exc).__name__}: {printable(str(exc), 200)}"
                if time.monotonic() - warned_at >= REDIS_WARN_SECONDS:
                    log.warning("the call history (%s) cannot be written (%s): %d record(s) dropped so far; "
                                "calls go on", self.path, self.failing, self.dropped)
                    warned_at = time.monotonic()
                continue
            for sid in forgotten:
                for tell in self.forgotten:
                    tell(sid)

    def write(self, batch: list[dict]) -> list[str]:
        """On the writer's thread: a batch, in one transaction; the calls it forgot."""
        db = self.connection()
        forgotten: list[str] = []
        db.execute("BEGIN")
        try:
            for record in batch:
                sid, kind = record.get("stream"), record.get("type")
                if not isinstance(sid, str) or not isinstance(kind, str):
                    continue
                if kind == "delete":
                    self.forget_rows(db, sid)
                    forgotten.append(sid)
                    continue
                db.execute("INSERT OR IGNORE INTO calls(stream, call, server, started) VALUES (?, ?, ?, ?)",
                           (sid, str(record.get("call")), str(record.get("server")), str(record.get("time"))))
                if kind == "start":
                    given = record.get("parameters")
                    parameters: dict = given if isinstance(given, dict) else {}
                    db.execute("UPDATE calls SET caller = ?, called = ?, parameters = ?, tracks = ?, started = ? "
                               "WHERE stream = ?", (str(parameters.get("From") or record.get("call")),
                                                    str(parameters.get("To") or ""), json.dumps(parameters),
                                                    json.dumps(record.get("tracks")), str(record.get("time")), sid))
                elif kind == "end":
                    summary = {k: v for k, v in record.items()
                               if k not in ("type", "stream", "call", "server", "time", "uid", "id")}
                    duration = str(summary.get("duration", "")).rstrip("s")
                    recordings = [part.rsplit(":", 1)[0] for part in str(summary.get("recordings", "")).split(",")
                                  if part]
                    db.execute("UPDATE calls SET ended_at = ?, ended = ?, duration = ?, summary = ?, recordings = ? "
                               "WHERE stream = ?", (str(record.get("time")), str(summary.get("ended")),
                                                    float(duration) if duration.replace(".", "", 1).isdigit() else None,
                                                    json.dumps(summary), json.dumps(recordings), sid))
                elif kind in HISTORY_LINES:
                    data = {k: v for k, v in record.items() if k not in (
                        "type", "stream", "call", "server", "time", "uid", "id", "track", "offset", "seconds", "text",
                        "mood")}
                    text = record.get("text")
                    if kind == "dtmf":
                        text = f"pressed {record.get('digit')}"
                    db.execute("INSERT OR IGNORE INTO lines(stream, uid, time, kind, track, offset, seconds, text, "
                               "mood, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               (sid, record.get("uid"), str(record.get("time")), kind, record.get("track"),
                                record.get("offset"), record.get("seconds"),
                                None if text is None else str(text), record.get("mood"), json.dumps(data)))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return forgotten

    # --- found ------------------------------------------------------------------------------

    def search(self, query: dict, limit: int = HISTORY_PAGE_CALLS) -> dict:
        return on_thread(self.readers, self.search_here, query, limit)

    def search_here(self, query: dict, limit: int) -> dict:
        """On a reader's thread: the calls that match, newest first, a page of them; with `q`,
        each with its first matching line, its words between \\x02 and \\x03."""
        db = self.connection()
        where, values = ["1"], []
        for column, operator, key in (("started", ">=", "since"), ("started", "<", "until"), ("caller", "=", "caller"),
                                      ("mood_min", "<", "mood_below"), ("mood_max", ">", "mood_above"),
                                      ("ended", "=", "ended"), ("duration", ">=", "min_seconds")):
            if query.get(key) is not None:
                where.append(f"c.{column} {operator} ?")
                values.append(query[key])
        if query.get("category"):
            where.append("instr(c.categories, ?) > 0")
            values.append(f" {query['category']} ")
        offset = (query.get("page", 1) - 1) * limit
        columns = ("c.stream, c.call, c.server, c.caller, c.called, c.started, c.ended_at, c.ended, c.duration, "
                   "c.alerts, trim(c.categories) AS categories, c.mood_min, c.mood_max")
        try:
            if not query.get("q"):
                rows = db.execute(f"SELECT {columns} FROM calls c WHERE {' AND '.join(where)} "
                                  "ORDER BY c.started DESC LIMIT ? OFFSET ?", (*values, limit + 1, offset)).fetchall()
                calls = [dict(row) for row in rows]
            else:
                calls, seen, skipped, chunk = [], set(), 0, 0
                while len(calls) <= limit:  # matching lines, newest first, a call once
                    rows = db.execute(
                        f"SELECT {columns}, l.id AS line, l.offset, l.track, "
                        "highlight(said, 0, char(2), char(3)) AS hit FROM said JOIN lines l ON l.id = said.rowid "
                        f"JOIN calls c ON c.stream = l.stream WHERE said MATCH ? AND {' AND '.join(where)} "
                        "ORDER BY said.rowid DESC LIMIT 500 OFFSET ?", (query["q"], *values, chunk)).fetchall()
                    for row in rows:
                        if row["stream"] in seen:
                            continue
                        seen.add(row["stream"])
                        if skipped < offset:
                            skipped += 1
                        elif len(calls) <= limit:
                            calls.append(dict(row))
                    if len(rows) < 500:
                        break
                    chunk += 500
        except sqlite3.OperationalError as exc:
            if query.get("q"):  # what FTS5 cannot read: an unclosed quote, a lone operator
                raise HistoryError('q: words, "a phrase in quotes", or a prefix* (' +
                                   printable(str(exc), 80) + ")") from None
            raise
        return {"calls": calls[:limit], "more": len(calls) > limit, "page": query.get("page", 1)}

    def call(self, sid: str) -> dict | None:
        return on_thread(self.readers, self.call_here, sid)

    def call_here(self, sid: str) -> dict | None:
        db = self.connection()
        row = db.execute("SELECT * FROM calls WHERE stream = ?", (sid,)).fetchone()
        if row is None:
            return None
        call = dict(row)
        for name in ("parameters", "tracks", "summary", "recordings"):
            call[name] = json.loads(call[name]) if call[name] else None
        call["categories"] = call["categories"].split()
        call["lines"] = [dict(line, data=json.loads(line["data"] or "{}")) for line in db.execute(
            "SELECT kind, track, time, offset, seconds, text, mood, data FROM lines WHERE stream = ? ORDER BY id",
            (sid,))]
        return call

    # --- forgotten --------------------------------------------------------------------------

    def forget(self, sid: str) -> bool:
        """A call deleted here, at once (its rows, search entries, recordings and text files);
        False if it was not kept."""
        return on_thread(self.writer_thread, self.forget_now, sid)

    def forget_now(self, sid: str) -> bool:
        db = self.connection()
        db.execute("BEGIN")
        try:
            found = self.forget_rows(db, sid)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return found

    def forget_rows(self, db: sqlite3.Connection, sid: str) -> bool:
        row = db.execute("SELECT recordings FROM calls WHERE stream = ?", (sid,)).fetchone()
        db.execute("DELETE FROM lines WHERE stream = ?", (sid,))
        db.execute("DELETE FROM calls WHERE stream = ?", (sid,))
        for wav in json.loads(row["recordings"] or "[]") if row else ():
            for path in (wav, wav[:-4] + ".txt" if wav.endswith(".wav") else None):
                if path:
                    try:
                        os.unlink(path)
                    except OSError:  # not here (another server's), or gone already
                        pass
        return row is not None

    def sweep_forever(self) -> None:
        """Calls that started more than --history-days ago, forgotten: at start and every hour."""
        while True:
            if self.days > 0:
                cutoff = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=self.days))
                try:
                    for sid in on_thread(self.readers, self.older_than, cutoff.isoformat(timespec="milliseconds")
                                         .replace("+00:00", "Z")):
                        self.forget(sid)
                        for tell in self.forgotten:
                            tell(sid)
                except (sqlite3.Error, OSError) as exc:
                    log.warning("the call history (%s): forgetting old calls failed: %s", self.path, exc)
            gevent.sleep(HISTORY_SWEEP_SECONDS)

    def older_than(self, moment: str) -> list[str]:
        return [row[0] for row in self.connection().execute("SELECT stream FROM calls WHERE started < ?", (moment,))]

    def stereo(self, call: dict) -> tuple[list[str], int]:
        """The call's two recordings, inbound and outbound ("" for a track without one), and
        the frames of the stereo WAV made of them; FileNotFoundError if none can be read here."""
        paths = {"inbound": "", "outbound": ""}
        for path in call.get("recordings") or ():
            for track in paths:
                if os.path.basename(path).rsplit(".", 1)[0].rsplit("-", 1)[0].endswith("_" + track):
                    paths[track] = path
        frames = [(os.path.getsize(path) - WAV_HEADER_BYTES) // 2 for path in paths.values()
                  if path and os.path.exists(path)]
        if not frames:
            raise FileNotFoundError("no recording of this call here")
        return [paths["inbound"], paths["outbound"]], max(frames)


def stereo_wav_bytes(paths: list[str], frames: int, start: int, end: int) -> bytes:
    """Bytes `start` to `end` (exclusive) of the stereo WAV made of two mono 16-bit 8 kHz
    files, the first on the left: its header, then each frame's two samples."""
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + 4 * frames, b"WAVE", b"fmt ", 16, 1, 2, 8000,
                         8000 * 4, 4, 16, b"data", 4 * frames)
    out = bytearray(header[start:end])
    first, last = max(0, start - 44) // 4, min(frames, -(-(end - 44) // 4))
    if last > first:
        channels = []
        for path in paths:
            data = b""
            if path and os.path.exists(path):
                with open(path, "rb") as file:
                    file.seek(WAV_HEADER_BYTES + 2 * first)
                    data = file.read(2 * (last - first))
            channels.append(data.ljust(2 * (last - first), b"\0"))
        frames_bytes = bytearray(4 * (last - first))
        frames_bytes[0::4], frames_bytes[1::4] = channels[0][0::2], channels[0][1::2]
        frames_bytes[2::4], frames_bytes[3::4] = channels[1][0::2], channels[1][1::2]
        skip = max(0, start - 44) - 4 * first
        out += frames_bytes[skip:skip + (end - max(start, 44))]
    return bytes(out)


# --- The history's pages: search, and a call to review -----------------------------------------
# As the floor's page: plain HTML, CSS and JavaScript, nothing fetched from elsewhere, what a
# client sent set as text (a search's highlights too: the server marks them with \x02 and \x03,
# the page makes <mark> elements of them), and a policy that allows no other script.

HISTORY_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1em; color: #222; } a { color: #24c; }
table { border-collapse: collapse; width: 100%; } td, th { padding: .35em .5em; border-bottom: 1px solid #ddd;
text-align: left; vertical-align: top; } th { font-weight: 600; } mark { background: #fe6; }
form { display: flex; flex-wrap: wrap; gap: .4em; margin-bottom: 1em; } input, select { font: inherit; }
.muted { color: #888; } .alert { color: #b00; font-weight: bold; } .pager { margin: 1em 0; }
"""

HISTORY_SCRIPT = PAGE_HELPERS + r"""
function marked(text) {  // the server puts \x02 ... \x03 around the words found: <mark>, as text
  const out = el("span");
  String(text).split("\x02").forEach((part, n) => {
    if (n === 0) { out.append(part); return; }
    const [hit, rest] = part.split("\x03");
    out.append(el("mark", null, hit), rest || "");
  });
  return out;
}
const when = (iso) => iso ? new Date(iso).toLocaleString() : "";
const query = new URLSearchParams(location.search);
for (const [name, value] of query) if ($(name)) $(name).value = value;
$("csv").href = "/history.csv" + location.search;
fetch("/history.json" + location.search).then(async (answer) => {
  const found = await answer.json();
  if (!answer.ok) { $("calls").replaceChildren(el("tr", "alert", found.error)); return; }
  $("calls").replaceChildren(...found.calls.map((call) => {
    const tr = el("tr");
    const who = el("a", null, call.caller || call.call);
    who.href = "/history/" + encodeURIComponent(call.stream);
    const words = call.hit ? marked(call.hit) : el("span", "muted", "");
    const mood = call.mood_min === null ? "" : call.mood_min.toFixed(2) + " … " + call.mood_max.toFixed(2);
    tr.append(el("td", null, when(call.started)), el("td"), el("td", null, call.duration === null ? "" :
              call.duration.toFixed(0) + " s"), el("td", null, call.ended || "live"),
              el("td", call.alerts ? "alert" : null, call.categories), el("td", null, mood), el("td"));
    tr.children[1].append(who);
    tr.children[6].append(words);
    return tr;
  }));
  $("none").hidden = found.calls.length > 0;
  const page = found.page;
  for (const [id, to, show] of [["previous", page - 1, page > 1], ["next", page + 1, found.more]]) {
    const link = $(id), next = new URLSearchParams(location.search);
    next.set("page", to);
    link.href = "/history?" + next;
    link.hidden = !show;
  }
});
"""

HISTORY_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Calls: the history</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>""" + HISTORY_STYLE + """</style></head>
<body><h1>The history <small><a href="/">the floor</a></small></h1>
<form method="get" action="/history">
<input id="q" name="q" placeholder='words, "a phrase", prefix*' size="30">
<input id="since" name="since" placeholder="since 2026-12-06" size="12">
<input id="until" name="until" placeholder="until" size="12">
<input id="caller" name="caller" placeholder="caller" size="14">
<input id="category" name="category" placeholder="alert category" size="12">
<input id="mood_below" name="mood_below" placeholder="mood below" size="8">
<input id="mood_above" name="mood_above" placeholder="mood above" size="8">
<input id="ended" name="ended" placeholder="ended (stop, ...)" size="12">
<input id="min_seconds" name="min_seconds" placeholder="at least s" size="8">
<button>Search</button> <a id="csv" href="/history.csv">CSV</a></form>
<table><thead><tr><th>when</th><th>who</th><th>length</th><th>ended</th><th>alerts</th><th>mood</th>
<th>what was said</th></tr></thead><tbody id="calls"></tbody></table>
<p id="none" class="muted" hidden>No call found.</p>
<p class="pager"><a id="previous" hidden>newer</a> <a id="next" hidden>older</a></p>
<script>""" + HISTORY_SCRIPT + """</script></body></html>
"""

CALL_SCRIPT = PAGE_HELPERS + r"""
const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attributes) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}
const clock = (seconds) => Math.floor(seconds / 60) + ":" + String(Math.floor(seconds % 60)).padStart(2, "0");
const speaker = (track) => track === "outbound" ? "agent" : "caller";
const sid = decodeURIComponent(location.pathname.split("/").pop());
function plot(call, said, seconds) {  // who spoke when (bars), and each speaker's mood (points joined)
  const width = 800, height = 120, x = (t) => 40 + (width - 50) * t / Math.max(seconds, 1);
  const box = svg("svg", {viewBox: "0 0 " + width + " " + height, width: "100%", role: "img"});
  box.append(svg("line", {x1: 40, x2: width - 10, y1: 60, y2: 60, stroke: "#ccc"}));
  const rows = {inbound: 100, outbound: 112};
  for (const line of said) {
    box.append(svg("rect", {x: x(line.offset), y: rows[line.track] || 100, width: Math.max(1, x(line.offset +
      (line.seconds || 1)) - x(line.offset)), height: 8, fill: line.track === "outbound" ? "#36c" : "#3a3"}));
  }
  for (const track of ["inbound", "outbound"]) {
    const points = said.filter((line) => line.track === track && typeof line.mood === "number")
                       .map((line) => x(line.offset).toFixed(1) + "," + (60 - 50 * line.mood).toFixed(1));
    if (points.length) box.append(svg("polyline", {points: points.join(" "), fill: "none", "stroke-width": 2,
                                                   stroke: track === "outbound" ? "#36c" : "#3a3"}));
  }
  const label = svg("text", {x: 2, y: 14, "font-size": 10, fill: "#888"});
  label.textContent = "mood +1";
  const low = svg("text", {x: 2, y: 92, "font-size": 10, fill: "#888"});
  low.textContent = "-1";
  box.append(label, low);
  return box;
}
fetch("/history/" + encodeURIComponent(sid) + ".json").then(async (answer) => {
  if (!answer.ok) { $("who").textContent = "No such call."; return; }
  const call = await answer.json();
  $("who").textContent = call.caller || call.call;
  $("when").textContent = new Date(call.started).toLocaleString() + " · " + (call.ended || "live") +
    (call.duration === null ? "" : " · " + call.duration.toFixed(1) + " s") + " · " + call.stream + " · " + call.server;
  const summary = $("summary");
  for (const [name, value] of Object.entries(call.summary || {})) summary.append(el("dt", null, name), el("dd", null, value));
  const said = call.lines.filter((line) => line.kind === "transcript");
  const seconds = Math.max(call.duration || 0, ...said.map((line) => line.offset + (line.seconds || 1)));
  $("plot").append(plot(call, said, seconds));
  const audio = $("audio");
  if (call.recordings_here) audio.src = "/history/" + encodeURIComponent(call.stream) + ".wav";
  else { audio.hidden = true; $("elsewhere").textContent = call.recordings && call.recordings.length ?
    "Its recordings are not on this floor's machine: " + call.server + " has them." : "This call was not recorded."; }
  const items = [];
  for (const line of call.lines) {
    const li = el("li", line.kind + (line.track ? " " + line.track : ""));
    li.append(el("time", null, line.offset === null ? "" : clock(line.offset)));
    if (line.kind === "transcript") {
      li.append(el("b", null, speaker(line.track)), el("span", null, line.text));
      if (typeof line.mood === "number") li.append(el("small", "mood", " " + line.mood.toFixed(2)));
      if (call.recordings_here) {
        li.tabIndex = 0;
        li.addEventListener("click", () => { audio.currentTime = line.offset; audio.play().catch(() => {}); });
      }
      items.push([line, li]);
    } else if (line.kind === "alert") li.append(el("b", null, "alert " + (line.data.category || "")), el("span", null, "“" + (line.data.phrase || "") + "”"));
    else li.append(el("span", null, line.text || line.kind));
    $("conversation").append(li);
  }
  audio.addEventListener("timeupdate", () => {  // the line being heard
    const t = audio.currentTime;
    for (const [line, li] of items) li.classList.toggle("playing", line.offset <= t && t < line.offset + Math.max(line.seconds || 0, 1));
  });
  $("delete").addEventListener("click", async () => {
    if (!confirm("Delete this call, its words and its recordings, on every floor?")) return;
    const done = await fetch("/history/" + encodeURIComponent(call.stream) + "/delete", {method: "POST"});
    if (done.ok) location.href = "/history";
  });
});
"""

CALL_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>A call</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>""" + HISTORY_STYLE + """
.conversation { list-style: none; padding: 0; } .conversation li { margin: .3em 0; padding: .1em .3em; }
.conversation li.transcript { cursor: pointer; } .conversation li.playing { background: #e6f0ff; }
.conversation time { color: #888; margin-right: .5em; } .conversation b { margin-right: .5em; }
.conversation .outbound { text-align: right; } .conversation .alert { color: #b00; } .mood { color: #888; }
dt { font-weight: bold; float: left; clear: left; margin-right: .5em; } dd { margin: 0; } audio { width: 100%; }
</style></head>
<body><p><a href="/history">the history</a> · <a href="/">the floor</a></p>
<h1 id="who"></h1><p id="when" class="muted"></p>
<audio id="audio" controls preload="metadata"></audio><p id="elsewhere" class="muted"></p>
<div id="plot"></div><ol id="conversation" class="conversation"></ol>
<h3>Summary</h3><dl id="summary"></dl>
<p><button id="delete">Delete this call</button></p>
<script>""" + CALL_SCRIPT + """</script></body></html>
"""


def page_policy(script: str) -> str:
    """A page's Content-Security-Policy: its own script (by hash), its own origin, nothing else."""
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    return (f"default-src 'none'; style-src 'unsafe-inline'; connect-src 'self'; media-src 'self'; "
            f"form-action 'self'; script-src 'sha256-{digest}'")


HISTORY_PAGE_POLICY, CALL_PAGE_POLICY = page_policy(HISTORY_SCRIPT), page_policy(CALL_SCRIPT)


def csv_cell(value: object) -> str:
    """A cell of /history.csv: a value a spreadsheet will not run (=, +, -, @ and control
    characters first are quoted with an apostrophe)."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


# === The transport: what a user need not read ===============================================

# --- WebSocket frames, without I/O (RFC 6455) ---------------------------------------------

class Opcode(enum.IntEnum):
    CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class State(enum.Enum):
    OPEN = "open"        # messages flow both ways
    CLOSING = "closing"  # we sent our close frame: waiting for the client's
    CLOSED = "closed"    # the closing handshake is over, or we failed the connection


# The members each frame is compared with, under module names: looked up through their enum
# class they cost 60 ns each, and a Twilio message's frame is parsed in about 2 µs.
TEXT, BINARY, CLOSE = Opcode.TEXT, Opcode.BINARY, Opcode.CLOSE
OPEN, CLOSING, CLOSED = State.OPEN, State.CLOSING, State.CLOSED


CLOSE_CODES_A_PEER_MAY_SEND = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}  # 7.4.1


class ProtocolError(Exception):
    """The client broke RFC 6455: the connection fails with `code` (7.4.1), `reason` said."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


def server_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A whole, unmasked frame (5.1: a server never masks)."""
    length = len(payload)
    if length < 126:
        return struct.pack("!BB", 0x80 | opcode, length) + payload
    if length < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, length) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, length) + payload


def unmask(payload: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    """5.3 unmasking with one big-integer XOR instead of a loop over the bytes."""
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class FrameParser:
    """The server's side of a WebSocket after the handshake, in the sans-I/O shape of
    python-websockets' frames.py and protocol.py: feed() takes the bytes read from the
    client, next_message() hands back each whole message (text as str, binary as bytes) or
    None until more bytes are needed, and `outgoing` gathers what to send back (pongs, close
    frames). Once `state` is not OPEN the connection is ending: `close_code` is the code sent
    or received, and `error` the reason when we failed the connection. Every way a client
    can break the protocol raises ProtocolError with its close code (1002 protocol error,
    1007 invalid UTF-8, 1009 over the size limit), which next_message() turns into the
    failure, in one place."""

    def __init__(self, max_message_bytes: int):
        self.max_message_bytes = max_message_bytes
        self.buffer = bytearray()
        self.outgoing = bytearray()
        self.fragments: bytearray | None = None  # a fragmented message so far (5.4)
        self.fragments_opcode = Opcode.TEXT
        self.state = State.OPEN
        self.close_code: int | None = None
        self.error: str | None = None

    def feed(self, data: bytes) -> None:
        if self.state is not CLOSED:  # after the close handshake or a failure, data is discarded
            self.buffer += data

    def next_message(self) -> str | bytes | None:
        try:
            buffer = self.buffer
            while len(buffer) >= 2:  # once the connection is closed, the buffer stays empty
                first, second = buffer[0], buffer[1]
                fin, opcode, length = first & 0x80, first & 0x0F, second & 0x7F
                if first & 0x70:
                    raise ProtocolError(1002, "reserved bits set without an extension")
                if not second & 0x80:
                    raise ProtocolError(1002, "client frame not masked")
                if opcode >= CLOSE and (not fin or length > 125):
                    raise ProtocolError(1002, "control frame fragmented or over 125 bytes")
                start = 6  # 2 bytes of header, 4 of mask
                if length > 125:
                    start = 8 if length == 126 else 14
                    if len(buffer) < start:
                        return None
                    length = int.from_bytes(buffer[2:start - 4], "big")
                if length > self.max_message_bytes:  # refused from the header, before the payload
                    raise ProtocolError(1009, f"frame of {length} bytes over the {self.max_message_bytes}-byte limit")
                end = start + length
                if len(buffer) < end:
                    return None
                payload = unmask(buffer[start:end], buffer[start - 4:start])
                del buffer[:end]
                if opcode == TEXT or opcode == BINARY:
                    if self.fragments is not None:
                        raise ProtocolError(1002, f"new message (opcode {opcode}) inside a fragmented one")
                    if not fin:
                        self.fragments, self.fragments_opcode = bytearray(payload), Opcode(opcode)
                        continue
                elif opcode == Opcode.CONTINUATION:
                    if self.fragments is None:
                        raise ProtocolError(1002, "continuation frame without a message")
                    self.fragments += payload
                    if len(self.fragments) > self.max_message_bytes:
                        raise ProtocolError(1009, f"message over the {self.max_message_bytes}-byte limit")
                    if not fin:
                        continue
                    payload, opcode, self.fragments = bytes(self.fragments), self.fragments_opcode, None
                elif opcode == Opcode.PING:
                    if self.state is State.OPEN:
                        self.outgoing += server_frame(Opcode.PONG, payload)
                    continue
                elif opcode == Opcode.CLOSE:
                    self.receive_close(payload)
                    continue
                elif opcode == Opcode.PONG:
                    continue
                else:
                    raise ProtocolError(1002, f"unknown opcode {opcode}")
                if self.state is CLOSING:  # we have sent our close frame: data is no longer handled
                    continue
                if opcode == BINARY:
                    return payload
                try:
                    return payload.decode()
                except UnicodeDecodeError:
                    raise ProtocolError(1007, "invalid UTF-8 in a text message") from None
            return None
        except ProtocolError as broken:  # every way to break the protocol ends here
            self.fail(broken.code, broken.reason)
            return None

    def receive_close(self, payload: bytes) -> None:
        """5.5.1: answer a close frame with one of our own, echoing its code (7.4)."""
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005  # 1005: no code
        if len(payload) == 1 or len(payload) >= 2 and not (code in CLOSE_CODES_A_PEER_MAY_SEND
                                                           or 3000 <= code <= 4999):
            raise ProtocolError(1002, f"invalid close frame (code {code})")
        try:
            payload[2:].decode()
        except UnicodeDecodeError:
            raise ProtocolError(1007, "invalid UTF-8 in a close frame's reason") from None
        if self.state is State.OPEN:
            self.outgoing += server_frame(Opcode.CLOSE, payload[:2])
            self.close_code = code
        self.state = State.CLOSED
        self.buffer.clear()

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake: our close frame, then wait for the client's."""
        if self.state is State.OPEN:
            reason_bytes = reason.encode()[:123].decode(errors="ignore").encode()  # 5.5: 125 bytes, whole characters
            self.outgoing += server_frame(Opcode.CLOSE, struct.pack("!H", code) + reason_bytes)
            self.close_code, self.state = code, State.CLOSING

    def fail(self, code: int, reason: str) -> None:
        """7.1.7: fail the connection: a close frame with the code and reason (while open),
        and nothing the client sends is read again."""
        if self.state is State.OPEN:
            self.close(code, reason)
            self.error = reason
        self.state = State.CLOSED
        self.buffer.clear()
        self.fragments = None


# --- The WebSocket and its handler: gevent-websocket and pywsgi, adapted --------------------

BEHIND_MS = 50            # an event loop this late: the process cannot keep up, batch listen-only reads
ON_TIME_MS = 10           # lateness below this counts as on time
LOOP_CHECK_SECONDS = 0.05  # how often the event loop's lateness is measured
MAX_HANDSHAKES = 100      # connections still sending their request; beyond, the oldest is dropped
UNFINISHED_BYTES_LIMIT = 32 << 20  # what all streams' half-received messages may hold together
SPARE_FILES = 64          # descriptors beyond sockets and recordings: listener, logs, imports
RECV_BYTES = 4096   # ten Twilio messages; 64 KiB reads fragmented the heap: RSS grew by the round
CATCH_UP_BYTES_PER_SECOND = 65_536  # a stream earns reading on past a full read, for each second it waited (a call
CATCH_UP_STREAM_BYTES = 65_536      # sends 8-33 KB/s), up to this; every stream together earns at most this a
CATCH_UP_ALL_BYTES_PER_SECOND = 1 << 20  # second (an equal share each), so that floods lengthen no turn much
SEND_BATCH = 16384   # bytes of frames the writer hands the socket at a time
OUTBOX_LIMIT = 1 << 20  # bytes waiting to be sent to a client beyond which we stop reading from it


def nothing_more(size: int) -> bytes:
    """A connection's reader once it is over."""
    return b""


def queued_bytes(item: "bytes | Playback") -> int:
    """What an item of the outbox counts toward OUTBOX_LIMIT: a frame its length; audio to play
    at most the SEND_BATCH framed from it at a time, since its mu-law is the stream's own (a
    greeting is one copy for every call) while the frames, echoes and pongs that a client can
    make us queue, one per message it sends, are what must not grow."""
    if isinstance(item, bytes):
        return len(item)
    return min(max(0, len(item.ulaw) - item.offset), SEND_BATCH)


class NoDirectIO:
    """What a MediaWebSocket's library slots `stream`, `raw_write` and `raw_read` hold: only its
    receive() reads the socket, and only its outbox writes to it."""

    @staticmethod
    def write(data: bytes) -> None:
        raise WebSocketError("MediaWebSocket: nothing writes to its socket past the outbox: use send()")

    @staticmethod
    def read(size: int) -> bytes:
        raise WebSocketError("MediaWebSocket: nothing reads its socket but receive(): use receive()")


NO_DIRECT_IO = NoDirectIO()


class MediaWebSocket(WebSocket):
    """gevent-websocket's WebSocket, reading through FrameParser with one recv() per
    network read (instead of three buffered reads per frame), and closing as RFC 6455 asks:
    after our close frame it waits, a bounded moment, for the client's, so a client still
    sending reads our close code instead of a TCP reset. `error` says why a connection was
    failed (None when the client closed or went away); `held` is what its half-received
    message holds, counted in the runtime's unfinished_bytes.

    Sending never waits: what is sent joins `outbox` (frames, and audio that is framed only
    as the socket takes it), which goes to the socket at once as far as the kernel takes it;
    the rest is left to one writer greenlet, and whatever is sent after waits behind it, so
    frames from several greenlets never interleave. A stream that talks back is read as each
    message lands (never batched by --read-interval-ms) and sends without Nagle's delay.
    What waits in the outbox is counted in `queued` (queued_bytes()); beyond OUTBOX_LIMIT
    nothing more is read from the client until it has taken half of it: a client that sends
    and never reads is held back by TCP, not by our memory.

    With `handle_as_it_lands` (the stream's handle_media(): hand_media_to()), the greenlet waiting
    in receive() for bytes is not woken for each message: the event loop reads them and
    handles each media message itself (on_readable), and wakes the greenlet only for the
    rest: other events, the end of the connection, replies to send, an error to raise."""

    __slots__ = ("runtime", "parser", "error", "last_received", "greenlet", "fill", "held", "outbox", "queued",
                 "writer", "taken", "broken", "talks_back", "hub", "readable", "drained", "handle_as_it_lands",
                 "landed", "recv", "receiving", "catch_up", "catch_up_at")
    closed: bool  # the library's WebSocket has this slot, and those let_go() empties

    def __init__(self, environ, stream, handler):
        super().__init__(environ, stream, handler)
        self.stream = NO_DIRECT_IO  # type: ignore[misc]  # the library's: nothing past the outbox or receive()
        self.raw_write, self.raw_read = NO_DIRECT_IO.write, NO_DIRECT_IO.read  # type: ignore[misc]
        self.runtime: Runtime = handler.runtime
        self.parser = FrameParser(self.runtime.settings.max_message_bytes)
        self.error = None
        self.last_received = self.catch_up_at = time.monotonic()
        self.catch_up = 0.0       # bytes it may read on past a full read before the loop goes round (reads_on)
        self.greenlet = gevent.getcurrent()
        self.receiving = False    # in receive(): waiting for the client's next message
        self.fill = self.first_fill
        self.held = 0
        self.outbox: deque = deque()  # frames (bytes) and audio still to be framed (Playback), in order
        self.queued = 0           # bytes in the outbox: its frames, and its audio's mu-law still to be framed
        self.writer: gevent.Greenlet | None = None
        self.taken = gevent.event.Event()  # set each time the writer hands the socket a batch
        self.broken = False       # a send failed, or the client took nothing for Limits.stall_seconds
        self.talks_back = False
        self.hub = gevent.get_hub()
        self.readable = self.hub.loop.io(self.handler.socket.fileno(), 1)  # 1: readable
        # True: the last read emptied the kernel's buffer (wait for bytes); False: it left more
        # (the event loop's turn first); None: the loop has just gone round (read at once)
        self.drained: bool | None = True
        self.handle_as_it_lands: Callable[[str | bytes], str | None] | None = None
        self.landed: str | bytes | Exception | None = None  # what on_readable leaves to receive()
        # The event loop reads only a plain socket: TLS (gunicorn's --certfile) may have to wait
        # for the rest of a record, and holds bytes of its own that the socket does not show.
        sock = self.handler.socket
        self.recv = sock._sock.recv if type(sock) is gevent.socket.socket else None

    def first_fill(self, size: int) -> bytes:
        # What the HTTP parser buffered past the request, to its end; then straight from the socket.
        if self.drained is False and not self.reads_on():  # the last read was full: as in read_when_ready
            self.hub.wait(self.hub.loop.timer(0))
        data = self.handler.rfile.read1(size)
        self.drained = len(data) < size
        if self.drained:
            self.fill = self.read_when_ready
        return data

    def read_when_ready(self, size: int) -> bytes:
        # As libuv reads: a read that did not fill `size` emptied the kernel's buffer, so wait
        # for the next bytes before reading again, rather than a recv() that fails first (a
        # Twilio message comes every 20 ms: that failed call cost 4 µs a message). A read that
        # filled it left more, but the event loop goes round first, polling every socket: a
        # client that always has more to send (a flood, or nginx on a unix socket) would
        # otherwise hold it, and every other call, for as long as it keeps sending. (Not
        # gevent.sleep(0): its callback can run again before the loop polls.)
        if self.drained:
            self.hub.wait(self.readable)
        elif self.drained is False and not self.reads_on():
            self.hub.wait(self.hub.loop.timer(0))
        data = self.handler.socket.recv(size)
        self.drained = len(data) < size
        return data

    def reads_on(self) -> bool:
        """After a full read: read on at once (True), or let the event loop go round first. A
        stream the loop left unread (a stall: a slow request, your code) catches up at once:
        read RECV_BYTES a turn, a call fell further behind at each stall when stalls came turn
        after turn (issue 37: 1.7 s behind after 10 s of 0.45 s stalls). What it reads on is
        earned by waiting, at CATCH_UP_BYTES_PER_SECOND or an equal share of
        CATCH_UP_ALL_BYTES_PER_SECOND, so floods, which always have more, gain little from it
        (a pool served first come would starve the streams the loop serves last)."""
        now = self.last_received
        rate = min(CATCH_UP_BYTES_PER_SECOND, CATCH_UP_ALL_BYTES_PER_SECOND / max(1, len(self.runtime.open_websockets)))
        self.catch_up = min(CATCH_UP_STREAM_BYTES, self.catch_up + rate * (now - self.catch_up_at))
        self.catch_up_at = now
        if self.catch_up < RECV_BYTES:
            return False
        self.catch_up -= RECV_BYTES
        return True

    def receive(self):
        if self.closed:
            raise WebSocketError("Connection is already closed")
        self.receiving = True  # while it is, and only then, a silent client is idle (sweep_idle_websockets)
        try:
            return self.next_message()
        finally:
            self.receiving = False

    def next_message(self):
        parser = self.parser
        while True:
            if self.landed is not None:
                landed, self.landed = self.landed, None
                if isinstance(landed, Exception):
                    try:
                        raise landed
                    finally:
                        del landed  # its traceback holds this frame: no cycle through the local
                return landed
            if parser.buffer:  # what the last read brought: a message, the start of one, or more
                message = parser.next_message()
                if message is not None:
                    return message
            if len(parser.buffer) > RECV_BYTES or parser.fragments is not None or self.held:
                self.hold_unfinished()  # a message longer than a read: counted (a shorter one is bounded by it)
            try:
                if parser.outgoing:
                    self.flush()
                if parser.state is not OPEN:  # the client closed, or we failed the connection: close() ends it
                    if parser.error:
                        self.error = f"WebSocket error, closed with {parser.close_code}: {parser.error}"
                    return None
                if self.queued > OUTBOX_LIMIT and self.writer is not None:
                    self.wait_until_taken()
                    continue
                if self.runtime.loop_behind and not parser.buffer and not self.talks_back and self.drained is not False:
                    # One wake-up for what gathered, all of it read (4 KiB a turn of the loop, read_when_ready)
                    # before the next nap: 4 KiB a nap, a call fell further behind at each stall of the loop.
                    gevent.sleep(self.runtime.settings.read_interval_ms / 1000)
                    self.drained = None
                elif self.handle_as_it_lands and self.recv and self.drained and self.fill == self.read_when_ready:
                    self.wait_handling_media()
                    continue
                data = self.fill(RECV_BYTES)
            except OSError:
                data = b""
            if not data:  # the client went away without a close frame
                self.closed = True  # type: ignore[misc]  # a slot of the library's WebSocket
                self.release_unfinished()
                self.abandon_sending()
                return None
            self.last_received = time.monotonic()
            parser.feed(data)

    def hand_media_to(self, stream: "MediaStream") -> None:
        """From now on the event loop handles `stream`'s media messages as they land, if what it
        runs for them is this module's own code (MediaStream._media_in_event_loop)."""
        if stream._media_in_event_loop:
            self.handle_as_it_lands = stream.handle_media

    def wait_handling_media(self) -> None:
        """Wait in the event loop, which handles the media messages that land meanwhile."""
        self.readable.start(self.on_readable)
        try:
            self.hub.switch()
        finally:
            self.readable.stop()

    def on_readable(self) -> None:
        # The event loop's callback while the greenlet waits: no switch to it and back per
        # message. Its work is receive()'s, for media; anything else is left to receive().
        parser = self.parser
        while True:
            try:
                data = self.recv(RECV_BYTES)  # type: ignore[misc]  # set: only a plain socket is read here
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.drained = False  # receive() reads the end, or the error, itself
                break
            self.last_received = time.monotonic()
            self.drained = len(data) < RECV_BYTES
            parser.feed(data)
            handle = self.handle_as_it_lands
            try:
                while handle and (message := parser.next_message()) is not None:
                    if handle(message) not in ("media", None):
                        self.landed = message
                        break
            except Exception as exc:  # a bug in the handling: raised in the stream's greenlet
                self.landed = exc
            if (self.landed is not None or parser.outgoing  # a pong, or a close frame: no longer OPEN
                    or len(parser.buffer) > RECV_BYTES or parser.fragments is not None or self.held
                    or self.queued > OUTBOX_LIMIT and self.writer is not None
                    or self.runtime.loop_behind and not self.talks_back):
                break
            if self.drained or not self.reads_on():  # else more waits, and this stream is catching up
                return
        self.greenlet.switch()

    def wait_until_taken(self) -> None:
        """Back-pressure: read nothing more from a client that leaves more than OUTBOX_LIMIT
        unread, until it has taken half of it (or is dropped for taking nothing: drain())."""
        while self.queued > OUTBOX_LIMIT // 2 and self.writer is not None:
            self.taken.clear()
            self.taken.wait()

    def hold_unfinished(self) -> None:
        """Count what this stream's half-received message holds; when all streams together
        hold more than UNFINISHED_BYTES_LIMIT, fail the connection that asks for more (1009)."""
        held = len(self.parser.buffer) + len(self.parser.fragments or b"")
        self.runtime.unfinished_bytes += held - self.held
        self.held = held
        if self.runtime.unfinished_bytes > UNFINISHED_BYTES_LIMIT and held:
            self.parser.fail(1009, f"half-received messages of all streams over the "
                                   f"{UNFINISHED_BYTES_LIMIT >> 20} MiB limit")
            self.release_unfinished()

    def release_unfinished(self) -> None:
        self.runtime.unfinished_bytes -= self.held
        self.held = 0

    def __del__(self):
        pass  # the library's close() from the garbage collector: closing may wait on the network

    def talk_back(self) -> None:
        """From now on this stream is read as each message lands, and its frames go out at once."""
        if not self.talks_back:
            self.talks_back = True
            try:  # Nagle's algorithm would hold a mark sent after audio until the client's next ACK: 20 ms
                self.handler.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # not TCP (gunicorn on a unix socket): nothing to turn off

    def send(self, message: str | bytes, binary: bool | None = None) -> None:
        """gevent-websocket's send(), through the outbox: in order behind what waits, held back
        with it, and refused (WebSocketError) once the connection is closing or gone. A
        stream's own send() (or play(), mark(), clear()) says False instead, and counts it."""
        if binary is None:
            binary = not isinstance(message, str)
        payload = message.encode() if isinstance(message, str) else bytes(message)
        if not self.queue(server_frame(Opcode.BINARY if binary else Opcode.TEXT, payload)):
            raise WebSocketError("the connection is closing or gone: nothing more can be sent")

    def send_frame(self, message, opcode):
        raise WebSocketError("MediaWebSocket.send_frame(): frames go out through the outbox only: use send()")

    def read_frame(self):
        raise WebSocketError("MediaWebSocket.read_frame(): only receive() reads the socket: use receive()")

    def read_message(self):
        raise WebSocketError("MediaWebSocket.read_message(): only receive() reads the socket: use receive()")

    def handle_close(self, header, payload):
        raise WebSocketError("MediaWebSocket.handle_close(): FrameParser answers control frames: use close()")

    def handle_ping(self, header, payload):
        raise WebSocketError("MediaWebSocket.handle_ping(): FrameParser answers pings itself, through the outbox")

    def handle_pong(self, header, payload):
        raise WebSocketError("MediaWebSocket.handle_pong(): FrameParser reads pongs itself")

    def send_text(self, text: bytes) -> bool:
        """Queue one text message (UTF-8 bytes); False once the connection is closing or gone."""
        return self.queue(server_frame(Opcode.TEXT, text))

    def send_audio(self, playback: "Playback") -> bool:
        """Queue audio, framed only as the socket takes it; False once the connection is closing or gone."""
        return self.queue(playback)

    def queue(self, item: "bytes | Playback") -> bool:
        if self.closed or self.broken or self.parser.state is not OPEN:  # nothing may follow a close frame
            return False
        self.talk_back()
        self.take_replies()  # a pong goes before what the rest of its read makes us send (RFC 6455 5.5.2)
        self.outbox.append(item)
        self.queued += queued_bytes(item)
        if self.writer is None:
            self.write_now()
        return True

    def flush(self) -> None:
        """What the parser has to send (pongs, our close frame), behind anything queued."""
        if self.take_replies() and self.writer is None:
            self.write_now()

    def take_replies(self) -> bool:
        """Move what the parser has to send to the outbox; False if it had nothing."""
        if not self.parser.outgoing:
            return False
        data, self.parser.outgoing = bytes(self.parser.outgoing), bytearray()
        self.outbox.append(data)
        self.queued += len(data)
        return True

    def next_bytes(self) -> bytes:
        """About SEND_BATCH bytes of what waits in the outbox, the audio framed as it comes."""
        outbox, data = self.outbox, b""
        while outbox and len(data) < SEND_BATCH:
            item = outbox[0]
            if isinstance(item, bytes):
                data += outbox.popleft()
                self.queued -= len(item)
            else:
                counted = queued_bytes(item)
                messages = item.messages(SEND_BATCH - len(data))
                data += b"".join(server_frame(TEXT, message) for message in messages)
                self.queued -= counted - queued_bytes(item)
                if item.done:
                    outbox.popleft()
        return data

    def write_now(self) -> None:
        """Send what the kernel takes without waiting; leave the rest to a writer greenlet."""
        sock = self.handler.socket
        while self.outbox and not self.broken:
            data = self.next_bytes()
            try:
                sent = sock.send(data, 0, 0.0)  # timeout 0: gevent never waits
            except BlockingIOError:
                sent = 0
            except OSError:
                return self.abandon_sending()
            if sent < len(data):
                self.outbox.appendleft(data[sent:])
                self.queued += len(data) - sent
                self.writer = gevent.spawn(self.drain, sock)
                return

    def drain(self, sock) -> None:
        """The writer greenlet: the outbox, in order, as fast as the client takes it. A client
        that takes nothing for Limits.stall_seconds holds what we queue for it: it is dropped."""
        stall_seconds = self.runtime.limits.stall_seconds
        try:
            while self.outbox and not self.broken:
                data, sent = self.next_bytes(), False
                with gevent.Timeout(stall_seconds, False):  # False: the timeout ends the block, raises nothing
                    sock.sendall(data)
                    sent = True
                if sent:
                    self.taken.set()
                    continue
                self.abandon_sending()
                if not self.closed:
                    gevent.kill(self.greenlet, Stalled(f"the client took nothing we sent for {stall_seconds:g} s"))
        except OSError:
            self.abandon_sending()
        finally:
            self.writer = None
            self.taken.set()

    def drop_audio(self) -> int:
        """Audio queued but not yet framed, gone (a clear cut it off, the call ended): how many
        media messages it would have made. Frames already made still go, whole."""
        dropped = sum(item.messages_left() for item in self.outbox if not isinstance(item, bytes))
        self.outbox = deque(item for item in self.outbox if isinstance(item, bytes))
        self.queued = sum(map(len, self.outbox))  # frames only, now
        return dropped

    def abandon_sending(self) -> None:
        """The client is gone, or takes nothing: drop what waits for it. A writer still in
        sendall() ends when the socket closes (it was given the socket: the handler lets go of it)."""
        self.broken = True
        self.outbox.clear()
        self.queued = 0

    def flushed(self) -> None:
        """Wait until the writer has sent everything queued."""
        if self.writer is not None:
            self.writer.join()
        if self.broken:
            raise ConnectionError("the client is gone")

    def close(self, code: int = 1000, message: bytes | str = b"") -> None:
        # gevent-websocket 0.10.1 sends the reason where the status code belongs (peers read
        # b"bye" as code 25193), no code at all without a reason, and never waits for the reply.
        if self.closed:  # the client went away (receive() saw it): nothing to say to it
            return self.let_go()
        self.closed = True  # type: ignore[misc]  # a slot of the library's WebSocket
        parser = self.parser
        parser.close(code, message.decode(errors="replace") if isinstance(message, bytes) else message)
        try:
            with gevent.Timeout(self.runtime.limits.close_timeout, False):  # one that reads nothing cannot hold us
                self.flush()
                self.flushed()
                if parser.error:  # failed: our EOF tells the client we will read nothing more
                    self.handler.socket.shutdown(socket.SHUT_WR)
                parser.next_message()  # the client's close frame may have come with its last message, as Twilio's does
                while parser.state is State.CLOSING or parser.error:
                    data = self.fill(RECV_BYTES)
                    if not data:
                        break
                    parser.feed(data)
                    parser.next_message()
        except OSError:
            pass  # the client is gone: nothing more to tell it
        finally:
            self.abandon_sending()  # whatever a client that reads nothing left unsent
            self.release_unfinished()
            self.let_go()

    def let_go(self) -> None:
        """The connection is over: nothing here refers back to it or to its stream (fill,
        handle_as_it_lands), so the call's objects go at once, not at the oldest collection."""
        self.readable.close()
        self.fill, self.handle_as_it_lands = nothing_more, None
        self.environ = None  # type: ignore[misc]  # the library's slot


class IdleTimeout(Exception):
    """Thrown into a stream's greenlet when its client has sent nothing for --idle-timeout."""


class HangUp(Exception):
    """Raised in, or thrown into, a stream's greenlet by its hang_up()."""


class Stalled(IdleTimeout):
    """Thrown into a stream's greenlet when its client has taken nothing we sent for Limits.stall_seconds."""


def sweep_idle_websockets(runtime: Runtime) -> None:
    # One greenlet for all streams: a timeout on every socket read would cost a timer per message.
    idle_timeout = runtime.settings.idle_timeout
    while True:
        gevent.sleep(min(1.0, idle_timeout / 4))
        silent_since = time.monotonic() - idle_timeout
        for ws in list(runtime.open_websockets):
            if ws.receiving and ws.last_received < silent_since:
                ws.last_received = math.inf  # thrown once
                gevent.kill(ws.greenlet, IdleTimeout(f"nothing received for {idle_timeout:g} s"))


def watch_the_event_loop(runtime: Runtime) -> None:
    """Batching's trigger. While the event loop runs BEHIND_MS late, this process cannot
    handle messages as fast as they come: listen-only streams are then read every
    --read-interval-ms (one wake-up for several messages costs less), until the loop has
    been on time for Limits.caught_up_seconds. Otherwise no read waits."""
    on_time_since = time.monotonic()
    while True:
        asleep_at = time.monotonic()
        gevent.sleep(LOOP_CHECK_SECONDS)
        now = time.monotonic()
        late_ms = (now - asleep_at - LOOP_CHECK_SECONDS) * 1000
        if late_ms >= ON_TIME_MS:
            on_time_since = now
        if late_ms >= BEHIND_MS and not runtime.loop_behind:
            runtime.loop_behind = True
            log.warning("event loop %.0f ms late with %d streams open: this process cannot keep up; reading "
                        "listen-only streams every %g ms (--read-interval-ms) until it can",
                        late_ms, len(runtime.open_websockets), runtime.settings.read_interval_ms)
        elif runtime.loop_behind and now - on_time_since >= runtime.limits.caught_up_seconds:
            runtime.loop_behind = False
            log.info("event loop on time for %d s with %d streams open: reading each message as it lands again",
                     runtime.limits.caught_up_seconds, len(runtime.open_websockets))


class HandshakeTimeout(Exception):
    """Thrown into a connection's greenlet when its HTTP request is not complete in time, or
    when it is the oldest of more than MAX_HANDSHAKES incomplete ones."""


BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
TLS_HANDSHAKE = b"\x16"  # the first byte a TLS client sends (a handshake record), where HTTP has a method


LISTENER_REQUEST_SECONDS = 10  # the floor's and the metrics' listeners: a connection sends each request within this


class ListenerTimeout(Exception):
    """Thrown into a floor or metrics connection that has not sent its request in time, or is
    the oldest of too many still sending one."""


class ListenerHandler(pywsgi.WSGIHandler):
    """The floor's and the metrics' connections (a listener of their own, few at a time): each
    request must come within LISTENER_REQUEST_SECONDS, the first as the next on a kept-alive
    connection, and at most half the listener's connections may be sending one (a new one
    drops the oldest), so idle connections cannot take every slot from a supervisor."""

    pending: dict  # this listener's connections still sending a request: their greenlets (for_listener)
    most_pending: int
    evicted = False
    deadline: Any = None

    @classmethod
    def for_listener(cls, connections: int) -> type["ListenerHandler"]:
        return type(cls.__name__, (cls,), {"pending": {}, "most_pending": max(1, connections // 2)})

    def handle_one_request(self):
        self.pending[self] = gevent.getcurrent()
        if len(self.pending) > self.most_pending:
            oldest = next(iter(self.pending))
            oldest.evicted = True
            gevent.kill(self.pending.pop(oldest), ListenerTimeout())  # does not wait for it
        self.deadline = gevent.Timeout.start_new(LISTENER_REQUEST_SECONDS, ListenerTimeout())
        try:
            return super().handle_one_request()
        except ListenerTimeout:  # idle, or trickling: closed without a word (any client can cause it)
            return None
        finally:
            self.deadline.close()
            self.pending.pop(self, None)

    def _handle_client_error(self, ex):
        if isinstance(ex, ListenerTimeout):  # while its headers came (pywsgi passes on only those): no word
            return None
        return super()._handle_client_error(ex)

    def handle_one_response(self):
        self.deadline.close()
        self.pending.pop(self, None)
        if self.evicted:  # dropped just as its request came in: its exception lands here, then it closes
            try:
                gevent.sleep(0)
            except ListenerTimeout:
                pass
            self.close_connection = True
            return
        super().handle_one_response()


class MediaStreamHandler(WebSocketHandler):
    """gevent-websocket answers 101 before Flask runs, so refusals happen here, before it.
    While it sends a request, a connection has --handshake-timeout, however slowly it
    trickles, and is one of at most MAX_HANDSHAKES (the oldest is dropped for a new one).
    A connection carries one request, without a body: nothing holds it after its answer."""

    evicted = False  # dropped as the oldest of too many: its HandshakeTimeout is on its way
    rfile: Any  # the socket, or a webhook's body once read (read_request)
    runtime: Runtime  # serving() makes the class that serves one

    @classmethod
    def serving(cls, runtime: Runtime) -> type["MediaStreamHandler"]:
        """This handler for a server of `runtime`'s: pywsgi and gunicorn take a class."""
        return type(cls.__name__, (cls,), {"runtime": runtime})

    def handle(self):
        try:
            super().handle()
        except HandshakeTimeout:
            pass  # came too late to matter: the connection is over
        finally:
            self.runtime.handshaking.pop(self, None)

    def read_requestline(self):
        if self.rfile.peek(1)[:1] == TLS_HANDSHAKE:  # no line will come: it waits for our TLS answer
            return self.rfile.read1(64).decode("latin-1")
        return super().read_requestline()

    def read_request(self, raw_requestline):
        super().read_request(raw_requestline)
        if self.content_length or "transfer-encoding" in self.headers:
            # a body never sent would hold the connection past its deadline: a webhook's is read
            # here, within it, whole and bounded; no other route takes one
            if self.command != "POST" or self.path.split("?")[0] not in WEBHOOK_ROUTES or \
                    "transfer-encoding" in self.headers:
                raise ValueError("a request body (only a POST to " + " or ".join(WEBHOOK_ROUTES) + " has one)")
            if self.content_length > WEBHOOK_BODY_BYTES:
                raise ValueError(f"a body of {self.content_length} bytes (a webhook's may have {WEBHOOK_BODY_BYTES})")
            body = self.rfile.read(self.content_length)
            if len(body) < self.content_length:
                raise ValueError("a body cut short")
            fields_sent = body.count(b"&") + 1
            if fields_sent > WEBHOOK_FIELDS:  # before any parsing or signature: each field costs
                raise ValueError(f"a body of {fields_sent} fields (Twilio's have fewer than {WEBHOOK_FIELDS})")
            self.rfile = io.BufferedReader(io.BytesIO(body))  # what pywsgi reads it from
        self.close_connection = True  # no keep-alive: a client cannot pipeline requests it never reads
        return True

    def handle_one_request(self):
        handshaking, timeout = self.runtime.handshaking, self.runtime.settings.handshake_timeout
        handshaking[self] = gevent.getcurrent()
        if len(handshaking) > MAX_HANDSHAKES:
            oldest = next(iter(handshaking))
            oldest.evicted = True
            gevent.kill(handshaking.pop(oldest), HandshakeTimeout(  # does not wait for it
                f"the oldest of more than {MAX_HANDSHAKES} connections still sending a request"))
        self.deadline = gevent.Timeout.start_new(timeout, HandshakeTimeout(
            f"no complete HTTP request within {timeout:g} s (--handshake-timeout)"))
        try:
            return super().handle_one_request()
        except HandshakeTimeout as exc:  # while the request line was read: pywsgi passes on only the rest
            return self._handle_client_error(exc)
        finally:
            self.deadline.close()
            self.runtime.handshaking.pop(self, None)

    def handle_one_response(self):
        self.deadline.close()  # the request is in: from here on, a stream's own limits apply
        self.runtime.handshaking.pop(self, None)
        if self.evicted:  # dropped just as its request came in: the exception must land here, not in a call
            try:
                gevent.sleep(0)
            except HandshakeTimeout as dropped:
                self._handle_client_error(dropped)
            self.close_connection = True
            return
        super().handle_one_response()

    def get_environ(self):
        environ = super().get_environ()
        proxies = self.runtime.settings.trusted_proxies
        if proxies:
            environ["REMOTE_ADDR"] = forwarded_client(environ, proxies) or environ["REMOTE_ADDR"]
        return environ

    def _handle_client_error(self, ex):
        # pywsgi's hook for a bad request prints a traceback for anything but a ValueError
        # (an IndexError for "HTTP/1", an HTTPException for over 100 headers) and logs the
        # request line, so a client could fill the log at will.
        remote = self.client_address[0] if self.client_address else "?"
        metrics, connection_warnings = self.runtime.metrics, self.runtime.connection_warnings
        if isinstance(ex, HandshakeTimeout):
            connection_warnings.warning("dropped connection remote=%s reason=%s", remote, ex)
            if metrics:
                metrics.handshakes_refused.labels("none", "handshake_timeout").inc()
            return None
        if (self.requestline or "").startswith(TLS_HANDSHAKE.decode("latin-1")):
            if metrics:
                metrics.handshakes_refused.labels("none", "tls").inc()
            connection_warnings.warning("bad request remote=%s reason=a TLS handshake (wss:// or https://) on this "
                                        "plain port: connect with ws://, or put a TLS proxy such as ngrok in front",
                                        remote)
            return None  # an HTTP answer means nothing to a TLS client
        if metrics:
            metrics.handshakes_refused.labels("400", "bad_request").inc()
        reason = str(ex) if isinstance(ex, ValueError) else f"malformed request ({type(ex).__name__})"
        connection_warnings.warning("bad request remote=%s status=400 reason=%s", remote, printable(reason, 100))
        return "400", BAD_REQUEST

    def upgrade_websocket(self):
        if self.environ.get("HTTP_UPGRADE", "").lower() != "websocket":
            return super().upgrade_websocket()
        runtime = self.runtime
        refused = refusal(runtime, self.environ)
        if refused:
            status, kind, reason = refused
            if runtime.metrics:
                runtime.metrics.handshakes_refused.labels(status.split()[0], kind).inc()
            runtime.connection_warnings.warning("refused WebSocket remote=%s path=%s status=%s reason=%s",
                                        self.environ.get("REMOTE_ADDR"),
                                        printable(self.environ.get("PATH_INFO", ""), 100), status.split()[0], reason)
            self.start_response(status, [("Content-Type", "text/plain"), ("Connection", "close"),
                                         ("Sec-WebSocket-Version", "13")])
            return [f"{status}: {reason}\n".encode()]
        result = super().upgrade_websocket()
        self.registered = getattr(self, "websocket", None)  # set only when upgraded
        if self.registered:
            runtime.open_websockets.add(self.registered)
            runtime.watch()
        return result

    def run_application(self):
        try:
            super().run_application()
        finally:
            self.runtime.open_websockets.discard(self.__dict__.pop("registered", None))


def use_our_websocket() -> None:
    """gevent-websocket builds each connection's socket from its module's name `WebSocket`
    (WebSocketHandler.upgrade_connection): make it ours. Its logger would print client
    input, without a timestamp; MediaStreamHandler checks every handshake before the
    library sees it. tests/test_adapters.py fails if the library stops reading that name."""
    geventwebsocket.handler.WebSocket = MediaWebSocket
    logging.getLogger("geventwebsocket.handler").propagate = False


# What this file relies on of its libraries' insides, beyond their documented API, in one
# place: tests/test_adapters.py checks each (a check for every entry), and names the one a
# new version of a library changed under us.
LIBRARY_EDGES = {
    "gevent: socket._sock": "the plain socket inside gevent's, read by the event loop's callback (MediaWebSocket)",
    "gevent: socket.send(data, flags, timeout)": "timeout 0.0, a send that never waits (MediaWebSocket.write_now)",
    "gevent: hub.loop.io, hub.loop.timer, hub.loop.run_callback, hub.wait": "a call's socket watched and read by "
        "the loop itself (MediaWebSocket.on_readable), its audio greenlet switched in (AudioGreenlet)",
    "gevent-websocket: handler.WebSocket": "the name upgrade_connection() builds each connection from "
        "(use_our_websocket)",
    "gevent-websocket: WebSocketHandler.run_application() -> upgrade_websocket(), self.websocket": "where "
        "MediaStreamHandler refuses a handshake, and registers the connection",
    "gevent-websocket: WebSocket's slots closed, environ, stream, raw_write, raw_read, handler": "set by its "
        "__init__, replaced or read by MediaWebSocket",
    "pywsgi: WSGIHandler._handle_client_error(ex)": "its hook for a bad request, and for a dropped one",
    "pywsgi: WSGIHandler.read_requestline, read_request, handle_one_request, handle_one_response, get_environ":
        "where MediaStreamHandler times, bounds and refuses a request",
    "pywsgi: WSGIHandler.rfile (peek, read1), content_length, headers, command, path, close_connection, "
    "requestline": "what MediaStreamHandler reads of a request",
    "flask-sockets: SocketMiddleware's ws, app, wsgi_app; Sockets.url_map, add_url_rule(rule, _, f)": "Sockets "
        "and SocketMiddleware, fixed for today's Werkzeug",
    "redis-py: redis.connection.socket, redis.connection.ssl": "the modules its connections are made with: "
        "gevent's (give_redis_gevent_sockets)",
    "gunicorn: GeventWebSocketWorker.server_class, wsgi_handler, load_wsgi, handle_exit, handle_quit, alive":
        "GunicornWorker: our handler, the runtime, the drain",
}


# === Start-up: main(), then the gunicorn worker =============================================

class ConsoleHandler(logging.StreamHandler):
    """Our console's handler: stderr, a timestamp and the level on each line."""


def setup_logging(level: str, worker: bool = False) -> None:
    """One console handler on our logger, whoever runs us (python app.py or gunicorn), beside
    any of yours; a gunicorn worker's lines say which worker (its process id) they come from."""
    console = next((handler for handler in log.handlers if isinstance(handler, ConsoleHandler)), None)
    if console is None:
        console = ConsoleHandler(sys.stderr)
        log.addHandler(console)
        log.propagate = False
    tag = "worker=%(process)d " if worker else ""
    console.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-7s {tag}%(message)s"))
    log.setLevel(level)
    startup_log.setLevel(logging.INFO)


def reserve_file_descriptors(settings: Settings) -> int:
    """Raise this process's limit on open files toward the hard one, so --max-streams can be
    reached: the streams this process can carry, fewer (with a warning) when even the hard
    limit cannot carry --max-streams."""
    per_stream = 1 + (len(TRACK_NAMES) if settings.record else 0)  # the socket, a WAV file per track
    needed = settings.max_streams * per_stream + MAX_HANDSHAKES + SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):  # macOS refuses more than OPEN_MAX whatever the hard limit
            pass
    can_carry = (soft - MAX_HANDSHAKES - SPARE_FILES) // per_stream
    if soft == resource.RLIM_INFINITY or can_carry >= settings.max_streams:
        return settings.max_streams
    if can_carry < 1:
        raise SettingsError(f"--max-streams (MAX_STREAMS): this process may open only {soft} files "
                            f"(ulimit -n), not enough for one stream")
    log.warning("--max-streams lowered from %d to %d: this process may open %d files (ulimit -n), and "
                "each stream takes %d", settings.max_streams, can_carry, soft, per_stream)
    return can_carry


def configure(argv: list[str] | None = None, environ=os.environ, stream_class=None,
              worker: bool = False, limits: Limits = Limits()) -> Runtime:
    """Read and check the settings, then make this process serve with them: the one place
    start-up happens, for main() and for each gunicorn worker. Returns the runtime, which
    the app now serves; raises SettingsError."""
    settings = read_settings(argv, environ)
    setup_logging(settings.log_level, worker)
    runtime = create_runtime(settings, stream_class, limits=limits, max_streams=reserve_file_descriptors(settings))
    use_our_websocket()
    install(runtime)
    return runtime


def url_host(host: str) -> str:
    """A host as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def cannot_listen(setting: str, host: str, port: int, exc: OSError) -> SettingsError:
    reason = exc.args[1] if len(exc.args) == 2 else str(exc)  # not strerror: gevent adds the address to it
    return SettingsError(f"{setting}: cannot listen on {host}:{port}: {reason}")


def serve_metrics(host: str, port: int, metrics: Metrics) -> None:
    """`python app.py --metrics-port`: this process's metrics, on a listener of their own
    (not /metrics on the app's port, which ngrok publishes), served by the event loop."""
    import prometheus_client
    server = pywsgi.WSGIServer((host, port), prometheus_client.make_wsgi_app(metrics.registry),
                               handler_class=ListenerHandler.for_listener(METRICS_CONNECTIONS),
                               spawn=Pool(METRICS_CONNECTIONS), log=None, error_log=log)
    try:
        server.start()
    except OSError as exc:
        raise cannot_listen("--metrics-port (METRICS_PORT)", host, port, exc) from None
    startup_log.info("Metrics for Prometheus at http://%s:%d/metrics", url_host(host),
                     server.server_port)


FLOOR_BIND_RETRY_SECONDS = 5  # under gunicorn: how often a worker tries the floor's port another one holds


def serve_floor(runtime: Runtime) -> None:
    """--floor-port: the floor, on a listener of its own (never the media port that ngrok
    and nginx publish), served by the event loop; with --redis-url, of every process's calls."""
    settings, floor = runtime.settings, runtime.floor
    assert floor is not None and settings.floor_port
    host, port = settings.floor_host, settings.floor_port
    server = pywsgi.WSGIServer((host, port), floor_app(floor, settings.floor_token), spawn=Pool(FLOOR_CONNECTIONS),
                               handler_class=ListenerHandler.for_listener(FLOOR_CONNECTIONS),
                               log=None, error_log=log)
    try:
        server.start()
    except OSError as exc:
        raise cannot_listen("--floor-port (FLOOR_PORT)", host, port, exc) from None
    if settings.redis_url:
        floor.redis_url = settings.redis_url
        gevent.spawn(follow_redis, settings.redis_url, floor)
    if floor.history is not None:
        floor.history.start()
        startup_log.info("The call history in %s, at http://%s:%d/history (%s)", os.path.abspath(floor.history.path),
                         url_host(host), server.server_port,
                         f"calls older than {settings.history_days:g} days forgotten" if settings.history_days
                         else "kept for ever")
    startup_log.info("The floor at http://%s:%d/ (its feed at /events)%s%s", url_host(host), server.server_port,
                     ", every process's calls from Redis" if settings.redis_url else "",
                     ", FLOOR_TOKEN needed" if settings.floor_token else "")


def serve_floor_once_free(runtime: Runtime) -> None:
    """Under gunicorn: the worker that gets the floor's port serves the floor. Another (with
    REDIS_URL, or a reload's new worker while the old one drains) tries again every few
    seconds, and takes over when that one exits. Its calls never wait for it."""
    said = False
    while True:
        try:
            return serve_floor(runtime)
        except SettingsError as error:
            if not said:
                log.info("%s: another worker (or another program) holds it; this worker tries again every %d s", error,
                         FLOOR_BIND_RETRY_SECONDS)
                said = True
            gevent.sleep(FLOOR_BIND_RETRY_SECONDS)


def threaded_metrics_server(host: str, port: int, wsgi_app: Callable) -> Any:
    """gunicorn's master serves metrics from threads (it runs no event loop), a thread a
    connection: as ListenerHandler does, each request must come within
    LISTENER_REQUEST_SECONDS, and at most half of METRICS_CONNECTIONS may be sending one (a
    new one drops the oldest), so idle connections neither pile up threads nor keep one."""
    import socketserver
    import wsgiref.simple_server  # here: http.server is 10 ms of every start-up otherwise

    class Handler(wsgiref.simple_server.WSGIRequestHandler):
        timeout = LISTENER_REQUEST_SECONDS  # each read and write on the connection, answers included
        pending: dict = {}  # connections still sending their request, oldest first: their deadlines
        lock = threading.Lock()
        dropped = False

        def setup(self):
            super().setup()
            with self.lock:
                self.pending[self] = time.monotonic() + LISTENER_REQUEST_SECONDS
                if len(self.pending) > METRICS_CONNECTIONS // 2:
                    oldest = next(iter(self.pending))
                    del self.pending[oldest]
                    oldest.drop()

        @classmethod
        def drop_late(cls):
            """One thread for every connection's deadline: dropped once it passed."""
            while True:
                time.sleep(1)
                with cls.lock:
                    late = [handler for handler, deadline in cls.pending.items() if deadline < time.monotonic()]
                    for handler in late:
                        del cls.pending[handler]
                        handler.drop()

        def drop(self):
            """Idle too long, or the oldest of too many: closed without a word (any client can cause it)."""
            self.dropped = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)  # its thread's read ends at once

        def parse_request(self):
            whole = super().parse_request()  # the request line and every header have come, or EOF
            self.done_sending()
            return whole and not self.dropped  # a request cut short by drop() is not answered

        def done_sending(self):
            with self.lock:
                self.pending.pop(self, None)

        def finish(self):
            self.done_sending()
            with contextlib.suppress(OSError):
                super().finish()

        def log_message(self, format, *args):  # a scrape is not news
            pass

    class Server(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
        address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        daemon_threads = True
        request_queue_size = 128  # socketserver's 5 would leave a burst of connections retrying SYNs for seconds

        def handle_error(self, request, client_address):  # a client gone mid-answer: nothing to say
            pass

    server = wsgiref.simple_server.make_server(host, port, wsgi_app, Server, handler_class=Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    threading.Thread(target=Handler.drop_late, name="metrics-deadlines", daemon=True).start()
    return server


def serve_metrics_of_workers(host: str, port: int) -> None:
    """gunicorn's master: the sum of its workers' metrics (prometheus-client's multiprocess
    mode), from a thread of its own; the workers inherit PROMETHEUS_MULTIPROC_DIR."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or ""
    if folder:  # the files of an earlier run would be added to this one's
        for stale in glob.glob(os.path.join(folder, "*.db")):
            os.unlink(stale)
    else:
        folder = tempfile.mkdtemp(prefix="mediastreams-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess

    class LiveWorkers(multiprocess.MultiProcessCollector):
        def collect(self):  # a worker that died without ending its streams no longer counts them as open
            for path in glob.glob(os.path.join(folder, "gauge_live*_*.db")):
                pid = int(path.rsplit("_", 1)[1][:-3])
                if sys.platform == "linux" and not os.path.exists(f"/proc/{pid}"):
                    multiprocess.mark_process_dead(pid, folder)
            return super().collect()

    registry = CollectorRegistry()
    LiveWorkers(registry, folder)
    try:
        threaded_metrics_server(host, port, make_wsgi_app(registry))
    except OSError as exc:
        raise cannot_listen("--metrics-port (METRICS_PORT)", host, port, exc) from None
    startup_log.info("Metrics for Prometheus at http://%s:%d/metrics, all workers together", url_host(host),
                     port)



def log_startup_notes(settings: Settings) -> None:
    if not settings.auth_token:
        log.warning("TWILIO_AUTH_TOKEN is not set: anyone who knows this URL can stream to it. "
                    "Set it to your Auth Token to accept only handshakes signed by Twilio.")
    elif settings.public_url:
        log.info("Accepting only handshakes Twilio signed for wss://%s/media (--public-url)",
                 public_host(settings.public_url))
    else:
        log.info("Accepting only handshakes Twilio signed for wss://<the request's Host>/media (behind a proxy "
                 "that rewrites Host, give --public-url)")
    if settings.record:
        log.info("Recording every stream to %s", os.path.abspath(settings.record))
    if not settings.redact:
        log.warning("Redaction is off (--no-redact): card numbers, security codes, expiry dates, social security "
                    "numbers and keyed digits are kept as said and keyed, in transcripts, recordings, the console, "
                    "the floor and Redis")
    if settings.alert_webhook:
        log.info("Alerts POSTed to %s%s%s", shown_web_address(settings.alert_webhook),
                 ", signed (ALERT_WEBHOOK_SECRET)" if settings.alert_webhook_secret else ", unsigned",
                 ", every process's, by one of those sharing Redis" if settings.redis_url else "")
    if settings.redis_url:
        log.info("Publishing every call's events to Redis at %s, stream %s (its latest %d kept: "
                 "--redis-max-events)", shown_redis_url(settings.redis_url), REDIS_STREAM, settings.redis_max_events)


def media_server(runtime: Runtime) -> pywsgi.WSGIServer:
    """The app on --host and --port, listening."""
    settings = runtime.settings
    # A connection a greenlet, no more than the streams and the handshakes we allow: beyond,
    # connections wait in the kernel's backlog and hold no file descriptor of ours.
    connections = Pool(runtime.max_streams + MAX_HANDSHAKES)
    server = pywsgi.WSGIServer((settings.host, settings.port), app,
                               handler_class=MediaStreamHandler.serving(runtime), spawn=connections, log=None,
                               error_log=log)
    try:
        server.start()
    except OSError as exc:
        setting = "--host (HOST)" if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL \
            else "--port (PORT)"
        raise cannot_listen(setting, settings.host, settings.port, exc) from None
    return server


def main(argv: list[str] | None = None, stream_class: type | None = None, limits: Limits = Limits()) -> None:
    """Serve until SIGINT or SIGTERM; `stream_class`: your MediaStream subclass."""
    try:
        runtime = configure(argv, stream_class=stream_class, limits=limits)
        settings = runtime.settings
        server = None if settings.floor_only else media_server(runtime)
        if runtime.metrics and settings.metrics_port:
            serve_metrics(settings.metrics_host, settings.metrics_port, runtime.metrics)
        if runtime.floor:
            serve_floor(runtime)
    except SettingsError as error:
        print(f"app.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    if runtime.publisher:
        runtime.publisher.start()
    if runtime.alert_webhook and settings.redis_url:
        runtime.alert_webhook.start()
    if server is None:
        startup_log.info("Only the floor (--floor-only): no media port")
        stopped = gevent.event.Event()
        gevent.signal_handler(signal.SIGTERM, stopped.set)
        gevent.signal_handler(signal.SIGINT, stopped.set)
        stopped.wait()
        log.info("Stopped")
        return
    port = server.server_port
    if settings.host in ("0.0.0.0", "::", ""):
        where, host = f"all interfaces: {settings.host or '0.0.0.0'}", "localhost"
    else:
        where, host = "this interface only", url_host(settings.host)
    startup_log.info("Listening on http://%s:%d (%s), WebSocket at ws://%s:%d/media", host, port, where, host, port)
    log_startup_notes(settings)

    def shutdown(signum: int) -> None:
        # Still accepting while open streams end: a new caller gets 503 (refusal()), where
        # stop_accepting() left it unanswered in the kernel's backlog until stop() reset it.
        runtime.end_open_streams(signal.Signals(signum).name)
        server.stop(timeout=1)
        runtime.connection_warnings.flush()
        runtime.stream_warnings.flush()

    gevent.signal_handler(signal.SIGTERM, shutdown, signal.SIGTERM)
    gevent.signal_handler(signal.SIGINT, shutdown, signal.SIGINT)
    server.serve_forever()
    if runtime.publisher:
        runtime.publisher.flush(1)
    if runtime.alert_webhook:
        runtime.alert_webhook.flush(1)
    if runtime.transcriber:  # a recognition still running on its native thread would abort the interpreter's exit
        with gevent.Timeout(STREAM_END_SECONDS, False):
            runtime.transcriber.threads.join()
    log.info("Stopped")


try:
    from geventwebsocket.gunicorn.workers import GeventWebSocketWorker
except ImportError:  # gunicorn is optional: only `gunicorn -k app.GunicornWorker` needs it
    GeventWebSocketWorker = None
else:
    class GunicornWorker(GeventWebSocketWorker):
        """gevent-websocket's gunicorn worker with our handler (signatures, limits), configured
        from the environment, ending open calls with a summary when gunicorn stops it."""
        wsgi_handler = MediaStreamHandler  # load_wsgi() sets the one serving this worker's runtime
        quitting = False  # handle_quit() has begun
        metrics_served = False  # gunicorn's master serves its workers' metrics (check_config)
        runtime: Runtime

        class server_class(GeventWebSocketWorker.server_class):  # gunicorn's PyWSGIServer
            def close(self):
                # gunicorn's run() calls this as the SIGTERM drain begins. On a reload (HUP) or
                # one worker fewer (TTOU), other workers go on serving the listener: close it,
                # as gunicorn does. When gunicorn stops, none will: closed, the listener would
                # answer new callers "connection refused" for the whole drain. Left open, it
                # answers them 503 (refusal()) until this worker's calls have ended and it
                # exits, closing it.
                if self.closed:
                    return
                runtime = self.handler_class.runtime
                if self.master_listens(self.socket):
                    super().close()
                    log.info("SIGTERM: draining, %d open stream(s); new ones go to the other workers",
                             len(runtime.open_websockets))
                elif not runtime.shutting_down:
                    runtime.shutting_down = True
                    log.info("SIGTERM: draining, %d open stream(s); new ones get 503", len(runtime.open_websockets))

            @staticmethod
            def master_listens(listener) -> bool:
                """Whether gunicorn's master still holds this listener: it closes its copies
                before it signals its workers to stop. Linux's /proc tells (a descriptor keeps
                its number across fork()); elsewhere, or with --reuse-port (each worker then
                has a listener of its own), assume it does."""
                if not os.path.isdir("/proc/self/fd") or listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
                    return True
                fd = listener.fileno()
                try:
                    return os.readlink(f"/proc/{os.getppid()}/fd/{fd}") == os.readlink(f"/proc/self/fd/{fd}")
                except OSError:  # no such descriptor in the master any more
                    return False

        @classmethod
        def check_config(cls, cfg, _log):
            # In gunicorn's master, once: a setting that cannot work stops gunicorn at start-up.
            environ = {**os.environ, **cfg.env}
            try:
                checked = read_settings([], environ)
                check_record_dir(checked.record)
                read_greeting(checked.greet)  # and kept, for the workers: a file gone later stops no worker
                talking_back_mode(checked, None)
                find_stream_class_module(checked.stream_class)
                stream_class_checked_apart(checked.stream_class, environ, [cfg.chdir or os.getcwd(), *[
                    path for path in (cfg.pythonpath or "").split(",") if path]])
                if checked.floor_port and cfg.workers > 1 and not checked.redis_url:
                    raise SettingsError(f"--floor-port (FLOOR_PORT) with {cfg.workers} workers: each would show only "
                                        "its own calls; set REDIS_URL (every worker's calls on one floor) or run "
                                        "one worker (-w 1)")
                setup_logging(checked.log_level)
                if checked.metrics_port and not cls.metrics_served:  # once: gunicorn checks again on SIGHUP
                    serve_metrics_of_workers(checked.metrics_host, checked.metrics_port)
                    cls.metrics_served = True
            except SettingsError as error:
                print(f"app.py: error: {error}", file=sys.stderr, flush=True)
                sys.exit(2)
            log_startup_notes(checked)  # here, not in load_wsgi(): once, not once per worker

        def load_wsgi(self):
            # In each worker, after gevent's patching and gunicorn's --env, before serving.
            try:
                self.runtime = configure([], worker=True)
            except SettingsError as error:  # STREAM_CLASS: only a worker imports your module
                print(f"app.py: error: {error}", file=sys.stderr, flush=True)
                sys.exit(3)  # gunicorn's "worker failed to boot": it stops instead of retrying
            self.wsgi_handler = MediaStreamHandler.serving(self.runtime)
            settings = self.runtime.settings
            if self.runtime.publisher:
                self.runtime.publisher.start()
            if self.runtime.alert_webhook and settings.redis_url:
                self.runtime.alert_webhook.start()
            if self.runtime.floor and settings.floor_port:
                gevent.spawn(serve_floor_once_free, self.runtime)
            super().load_wsgi()

        def run(self):
            super().run()  # returns once this worker's calls have ended: their last events go to Redis
            if self.runtime.publisher:
                self.runtime.publisher.flush(1)
            if self.runtime.alert_webhook:
                self.runtime.alert_webhook.flush(1)

        def handle_exit(self, sig, frame):
            # SIGTERM: gunicorn lets calls go on for --graceful-timeout, then kills the worker
            # outright, and calls still open would end with no summary: end them before that.
            if self.quitting or not self.alive:  # stopping already (systemd signals the whole group)
                return
            super().handle_exit(sig, frame)  # alive = False: run() drains, exits once no call is left
            ending_at = self.cfg.graceful_timeout - STREAM_END_SECONDS - 1
            gevent.spawn_later(max(0.0, ending_at), self.runtime.end_open_streams, "SIGTERM")

        def handle_quit(self, sig, frame):
            # SIGINT, SIGQUIT (Ctrl-C on gunicorn): a quick exit, after the summaries. Once only:
            # Ctrl-C sends SIGINT to the whole process group, then the master sends each worker
            # SIGQUIT; a second round would kill streams still ending, and its sys.exit() would
            # reach the main greenlet in the interpreter's shutdown: a SystemExit traceback.
            if self.quitting:
                return
            self.quitting = True

            def quit_after_summaries():
                self.runtime.end_open_streams(signal.Signals(sig).name)
                GeventWebSocketWorker.handle_quit(self, sig, frame)

            gevent.spawn(quit_after_summaries)


if __name__ == "__main__":
    sys.modules.setdefault("app", sys.modules[__name__])  # `import app` in your code: this module, not a copy
    main()
