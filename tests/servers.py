"""The servers tests start that are app.py with something of their own: a stream class, or a
setting no flag has. One entry each, run as

    python -m tests.servers NAME [app.py's flags]

(the start_server fixture: start_server(*flags, server="NAME")). Each class here is "yours"
as far as app.py can tell: it lives outside app.py, like a user's."""
import itertools
import logging
import os
import sys
import time

import gevent

import app


# --- Closing and fairness (test_fairness.py) -------------------------------------------------

PATIENT = app.Limits(close_timeout=60)  # a closing wait of a minute: a close that waits for bytes already sent shows
STALLS_IN_4_S = app.Limits(stall_seconds=4)  # long enough for a flood to fill the kernel's buffers on a busy machine
HINTED = app.Limits(whisper_hint=True)  # tests/bench_words.py --hint
SILENT_AFTER_2_S = app.Limits(floor_silent_seconds=2)  # a floor ends a call it heard nothing of for 2 s, not a minute


class HangsUp(app.MediaStream):
    """Ends the call from the server's side: on the key 9 (the call's greenlet), or after a
    second of audio (its on_audio(), in the audio greenlet)."""
    talks_back = True

    def on_dtmf(self, data):
        super().on_dtmf(data)
        if data["dtmf"]["digit"] == "9":
            self.hang_up()

    def on_audio(self, track, timestamp, pcm):
        if timestamp >= 1000 and self.call_sid and self.call_sid.endswith("audio"):
            self.hang_up()
            self.hang_up()  # again, and at every chunk after: only the first does anything


class ManyMarks(app.MediaStream):
    """Sends 10,000 marks when the stream starts (a test never echoes them)."""
    talks_back = True

    def on_start(self, data):
        super().on_start(data)
        for n in range(10_000):
            self.mark(f"sent-{n}")


# --- Where code runs (test_read_path.py, test_closing.py) -----------------------------------

def where(stream) -> str:
    """'loop' in the event loop's callback, 'greenlet' in the call's, else 'audio' (its audio greenlet)."""
    current = gevent.getcurrent()
    if current is gevent.get_hub():
        return "loop"
    return "greenlet" if current is stream.ws.greenlet else "audio"


class Watched(app.MediaStream):
    """Notes where each message of a call was handled, in order, and says it at `stop`. With
    WATCHED=own-media, its own on_media() (media in its greenlet); else its own on_audio()
    (media in the event loop, the audio in the call's audio greenlet)."""
    EVENTS = {**app.MediaStream.EVENTS, "custom": "on_custom"}

    def setup(self):
        self.seen = []

    def on_audio(self, track, timestamp, pcm):
        self.seen.append(f"audio{timestamp}@{where(self)}")

    def on_dtmf(self, data):
        super().on_dtmf(data)
        self.seen.append(f"dtmf{data['dtmf']['digit']}@{where(self)}")

    def on_custom(self, data):
        self.seen.append(f"custom@{where(self)}")
        app.log.info("%s custom", self.label)

    def on_stop(self, data):
        super().on_stop(data)
        self.finish_audio()  # every chunk through on_audio() first: the line says them all
        app.log.info("%s handled %s", self.label, " ".join(self.seen))


class WatchedWithItsOwnMedia(Watched):
    def on_media(self, data):
        super().on_media(data)
        self.seen.append(f"media{data['media']['chunk']}@{where(self)}")


class Waits(app.MediaStream):
    """Waits on gevent where the README used to warn it must not: in on_audio() and in meter()."""

    def on_audio(self, track, timestamp, pcm):
        gevent.sleep(0.001)

    def meter(self, track, ulaw):
        gevent.sleep(0)
        super().meter(track, ulaw)


class Slow(app.MediaStream):
    """An on_audio() that takes 50 ms a chunk, 2.5 times a chunk's length: it falls behind."""

    def on_audio(self, track, timestamp, pcm):
        gevent.sleep(0.05)


class Crashing(app.MediaStream):
    """A bug in on_audio() at every chunk from the 10th (the 2nd with CRASH_AT=2)."""

    def setup(self):
        self.chunks = 0

    def on_audio(self, track, timestamp, pcm):
        self.chunks += 1
        if self.chunks >= int(os.environ.get("CRASH_AT", "10")):
            raise RuntimeError("bug in on_audio")


def our_bug():
    """A bug in app.py's own handling of the 10th media message of a call: as if check_sequence() had one."""
    check_sequence = app.MediaStream.check_sequence

    def with_a_bug(self, data):
        if data.get("event") == "media" and self.tracks["inbound"].messages == 9:
            raise RuntimeError("a bug in app.py's own handling")
        return check_sequence(self, data)

    app.MediaStream.check_sequence = with_a_bug


class Bursts(app.MediaStream):
    """When its stream's SID ends in 0, stops the whole process at `start` (an overload);
    notes when each chunk comes while the process is behind, and says how many came in bursts."""

    def setup(self):
        self.behind_at = []

    def on_start(self, data):
        super().on_start(data)
        if self.stream_sid.endswith("0"):
            time.sleep(0.2)  # the whole process stops: its event loop runs late, as in an overload

    def on_audio(self, track, timestamp, pcm):
        if self.runtime.loop_behind:
            self.behind_at.append(time.monotonic())

    def on_stop(self, data):
        super().on_stop(data)
        self.finish_audio()
        at = self.behind_at  # a burst: 4 or more handled within 2 ms, after a pause
        bursts = sum(at[i + 3] - at[i] < 0.002 and (i == 0 or at[i] - at[i - 1] > 0.01) for i in range(len(at) - 3))
        app.log.info("%s bursts=%d of %d", self.label, bursts, len(at))


class Blocking(app.MediaStream):
    """When its stream's SID ends in 0, stops the whole process at `start` (an overload)."""

    def on_start(self, data):
        super().on_start(data)
        if self.stream_sid.endswith("0"):
            time.sleep(0.2)


class WaitingLogHandler(logging.Handler):
    """A logging handler that waits on gevent, as one that sends over the network does in a
    monkey-patched process (gunicorn): it must never run in the event loop's callback."""

    def emit(self, record):
        gevent.sleep(0.001)


def waiting_log_handler():
    app.log.addHandler(WaitingLogHandler())


# --- Talking back (test_talk_back.py) ----------------------------------------------------------

class OneSecond(app.MediaStream):
    def on_start(self, data):
        super().on_start(data)
        self.play(bytes(16000))  # 1 s of silence, at once
        self.mark("one-second")


class Late(app.MediaStream):
    def on_start(self, data):
        super().on_start(data)
        self.clear()  # nothing queued: Twilio has nothing to clear, no harm

    def on_stop(self, data):
        super().on_stop(data)
        gevent.spawn_later(0.2, self.play, bytes(3200))  # the call is over by then


class TwoVoices(app.MediaStream):
    def on_start(self, data):
        super().on_start(data)
        self.ws.handler.socket.setsockopt(app.socket.SOL_SOCKET, app.socket.SO_SNDBUF, 4096)  # a slow network
        self.voices = [gevent.spawn(self.speak, voice) for voice in (1, 2)]

    def speak(self, voice):
        for n in range(1500):  # 30 s of audio each, sent as fast as the socket takes it
            self.play_ulaw(bytes([voice]) + n.to_bytes(2, "big") + bytes(157))
            if n % 100 == 0:
                gevent.sleep(0)
            if n == 100:
                app.log.info("%s voice %d has queued 100 chunks", self.label, voice)

    def on_stop(self, data):
        gevent.joinall(self.voices)
        super().on_stop(data)


class Chatty(app.MediaStream):
    def on_start(self, data):
        super().on_start(data)
        self.send({"event": "media", "streamSid": self.stream_sid, "media": {"payload": "/w==", "track": "x"}})


# --- Shutting down (test_gunicorn.py, as STREAM_CLASS=tests.servers:SlowFinish) ---------------

class OwnInit(app.MediaStream):
    """A mistake the start-up refuses: per-call state set up in __init__, not setup()."""

    def __init__(self):  # noqa: no runtime, remote, ws
        super().__init__(None, "")

class SlowFinish(app.MediaStream):
    def finish(self):
        gevent.sleep(30)  # a finish() of your own that never ends in time
        super().finish()


# --- Transcripts (test_transcribe.py) ----------------------------------------------------------

def stalled_recognizer():
    """One utterance may wait for recognition, and each takes 1.5 s: recognition falls behind."""
    recognize = app.WhisperRecognizer.batch

    def stalled(self, pcms, partial=False):
        if len(pcms[0]) > 8000:  # not the start-up check
            time.sleep(1.5 * len(pcms))
        return recognize(self, pcms, partial)

    app.WhisperRecognizer.batch = stalled


# --- Alerts to people (test_alert_webhook.py) --------------------------------------------------

def says_refunds():
    """Each utterance heard as "Line N: I want my money back." (N counts this process's lines):
    an alert a sentence, in an order a test can check, without Whisper's time."""
    lines = itertools.count(1)

    class SaysRefunds:
        def __init__(self, *args):
            pass

        def batch(self, pcms, partial=False):  # the words so far of a long utterance: none, not a line
            return [f"Line {next(lines)}: I want my money back." if len(pcm) > 8000 and not partial else ""
                    for pcm in pcms]

    app.WhisperRecognizer = SaysRefunds


ALERTS_FAST = app.Limits(alert_webhook_seconds=4, alert_webhook_timeout=5, alert_lease_seconds=2)  # dropped in 4 s
ALERTS_PATIENT = app.Limits(alert_webhook_seconds=60, alert_webhook_timeout=5, alert_lease_seconds=2)


# --- The tutorial's failure (test_setup.py) ----------------------------------------------------

def without_the_rule_fix():
    """flask-sockets' own add_url_rule, as on today's Werkzeug without our fix."""
    import flask_sockets
    app.Sockets.add_url_rule = flask_sockets.Sockets.add_url_rule
    app.sockets.url_map = flask_sockets.Map()
    app.sockets.route("/media")(app.media)


# --- Reference cycles (test_read_path.py): not a server, a program ------------------------------

def wait_until(condition, timeout=10.0):
    """Let the event loop run until `condition()` holds (a millisecond a look)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        gevent.sleep(0.001)


def check_sequence_with_a_bug(self, data):
    if data["event"] == "media":
        raise ValueError("a bug in the event loop's handling")
    return True


def no_cycles():
    """Six calls served in this process, none closed with a close frame: two hang up, two
    fail in on_audio(), two in the event loop's handling (a bug put in app.py's check_sequence());
    then what of them the garbage collector found in cycles."""
    import base64
    import gc

    import gevent.socket
    from gevent import pywsgi

    from tests.twilio_sim import Call, frame
    os.environ["CRASH_AT"] = "2"
    runtime = app.configure(["--quiet-levels", "--log-level", "ERROR"])
    server = pywsgi.WSGIServer(("127.0.0.1", 0), app.app, handler_class=app.MediaStreamHandler.serving(runtime),
                               log=None)
    server.start()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    check_sequence = app.MediaStream.check_sequence
    for n in range(6):
        runtime.stream_class = Crashing if n % 3 == 1 else app.MediaStream
        app.MediaStream.check_sequence = check_sequence_with_a_bug if n % 3 == 2 else check_sequence
        call = Call()
        client = gevent.socket.create_connection(("127.0.0.1", server.server_port))
        key = base64.b64encode(os.urandom(16)).decode()
        client.sendall(("GET /media HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        while b"\r\n\r\n" not in client.recv(4096):
            pass
        client.sendall(b"".join(frame(0x1, m.encode()) for m in call.session()))
        ws, = runtime.open_websockets
        wait_until(lambda: ws.readable.active)  # its greenlet waits: what follows is read by the event loop
        stream = ws.handle_as_it_lands.__self__
        client.sendall(b"".join(frame(0x1, call.media("inbound", b"\xff" * 160, 20 * n).encode()) for n in (1, 2, 3)))
        wait_until(lambda: stream.tracks["inbound"].messages == 3 or stream.ended == "error")
        client.close()  # no stop, no close frame: the call ends when the server reads the end
        wait_until(lambda: not runtime.open_websockets)
        ws = stream = None  # nothing here keeps the call alive
    gc.collect()
    kept = sorted({type(o).__name__ for o in gc.garbage
                   if isinstance(o, (app.MediaStream, app.MediaWebSocket, app.Track, BaseException))})
    print("kept:", kept)


def stalled_limits():
    return app.Limits(transcript_queue=1, transcript_wait_seconds=float(os.environ.get("TRANSCRIPT_WAIT_SECONDS", "10")))


SERVERS = {  # name: (what to change first, the stream class, the limits)
    "patient": (None, None, PATIENT), "stalls-in-4-s": (None, None, STALLS_IN_4_S), "many-marks": (None, ManyMarks, None),
    "watched": (None, Watched, None), "watched-own-media": (None, WatchedWithItsOwnMedia, None),
    "waits": (None, Waits, None), "slow": (None, Slow, app.Limits(audio_drain_seconds=1)),  # what is left: a second
    "crashing": (None, Crashing, None), "our-bug": (our_bug, None, None), "bursts": (None, Bursts, None), "blocking": (None, Blocking, None),
    "one-second": (None, OneSecond, None), "late": (None, Late, None), "two-voices": (None, TwoVoices, None),
    "chatty": (None, Chatty, None), "stalled-recognizer": (stalled_recognizer, None, None),
    "waiting-log-handler": (waiting_log_handler, None, None), "without-the-rule-fix": (without_the_rule_fix, None, None),
    "says-refunds": (says_refunds, None, ALERTS_FAST), "says-refunds-patient": (says_refunds, None, ALERTS_PATIENT),
    "silent-after-2-s": (None, None, SILENT_AFTER_2_S), "hinted": (None, None, HINTED), "hangs-up": (None, HangsUp, None),
}

if __name__ == "__main__" and sys.argv[1] == "no-cycles":
    no_cycles()
elif __name__ == "__main__":
    change, stream_class, limits = SERVERS[sys.argv[1]]
    if change:
        change()
    if sys.argv[1] == "stalled-recognizer":
        limits = stalled_limits()
    app.main(sys.argv[2:], stream_class=stream_class, limits=limits or app.Limits())
