"""Where messages are handled: media in the event loop as it lands (MediaWebSocket.on_readable),
every other message in the stream's greenlet by the tutorial's loop; both in the order sent."""
import json
import re
import socket
import subprocess
import sys
import threading
import time
from array import array

import pytest

import app
from tests.conftest import ROOT, clean_environment, gunicorn_command, simulator
from tests.twilio_sim import CHUNK, Call, encode_ulaw, frame, tone

SILENCE = b"\xff" * CHUNK

WHERE_EACH_EVENT_RAN = """
import sys
import gevent
import app

class Watched(app.MediaStream):
    {flag}
    EVENTS = {{**app.MediaStream.EVENTS, "custom": "on_custom"}}
    seen = None

    def note(self, what):
        where = "loop" if gevent.getcurrent() is gevent.get_hub() else "greenlet"
        self.seen = (self.seen or []) + [f"{{what}}@{{where}}"]

    def on_media(self, data):
        super().on_media(data)
        self.note("media" + data["media"]["chunk"])

    def on_dtmf(self, data):
        super().on_dtmf(data)
        self.note("dtmf" + data["dtmf"]["digit"])

    def on_custom(self, data):
        self.note("custom")
        app.log.info("%s custom", self.label)  # then its greenlet waits for bytes, with no switch between

    def on_stop(self, data):
        super().on_stop(data)
        app.log.info("%s handled %s", self.label, " ".join(self.seen))

app.main(sys.argv[1:], stream_class=Watched)
"""


@pytest.mark.parametrize("flag, media_at", [("media_in_event_loop = True", "loop"), ("", "greenlet")],
                         ids=["says-its-media-code-never-waits", "own-media-code-by-default"])
def test_every_message_is_handled_in_the_order_sent_in_the_event_loop_or_the_greenlet(start_server, flag, media_at):
    server = start_server("--quiet-levels", script=WHERE_EACH_EVENT_RAN.format(flag=flag))
    call = Call()
    client = server.connect()
    client.send_all(call.session())
    server.wait_for(rf"stream={call.stream_sid} start")  # what comes with the handshake is read by the greenlet
    sent = []
    for burst in range(3):  # each burst in one TCP write: the event loop reads them in one go
        data = b""
        for n in range(4):
            data += frame(0x1, call.media("inbound", SILENCE, 20 * (call.chunks + 1)).encode())
            sent.append(f"media{call.chunks}@{media_at}")
        data += frame(0x1, call.dtmf(str(burst)).encode())
        sent.append(f"dtmf{burst}@greenlet")
        data += frame(0x1, b"not json")  # bad input on the way changes nothing
        data += frame(0x1, json.dumps({"event": "custom", "streamSid": call.stream_sid}).encode())
        sent.append("custom@greenlet")
        client.send_raw(data)
        server.wait_for(rf"stream={call.stream_sid} custom", count=burst + 1)  # not read along with the next
    client.send_all([call.media("inbound", SILENCE, 20 * (call.chunks + 1)), call.stop()])
    sent.append(f"media{call.chunks}@{media_at}")
    assert client.wait_closed() == 1000
    assert server.wait_for(rf"stream={call.stream_sid} handled (.*)").group(1).split() == sent
    summary = server.summary(call.stream_sid)
    assert (summary["media"], summary["bad"], summary["ended"]) == ("13", "3", "stop")


WAITS_IN_ON_AUDIO = """
import sys
import gevent
import app

class Waiting(app.MediaStream):
    {flag}
    wants_pcm = True

    def on_audio(self, track, timestamp, pcm):
        if timestamp == 200:
            gevent.sleep(0.01)  # a gevent wait: fine in a greenlet, impossible in the event loop

app.main(sys.argv[1:], stream_class=Waiting)
"""


@pytest.mark.parametrize("flag", ["media_in_event_loop = True", ""], ids=["says-it-never-waits", "by-default"])
def test_a_media_handler_that_waits_ends_only_one_call_if_it_claimed_it_never_does(start_server, flag):
    server = start_server("--quiet-levels", script=WAITS_IN_ON_AUDIO.format(flag=flag))
    call, other, later = Call(), Call(), Call()
    other_client = server.connect()
    other_client.send_all(other.session(media=5))
    client = server.connect()
    client.send_all(call.session())
    server.wait_for(rf"stream={call.stream_sid} start")  # its greenlet waits: what follows is media only
    client.send_all([*(call.media("inbound", SILENCE, 20 * (n + 1)) for n in range(20)), call.stop()])
    code = client.wait_closed()
    other_client.send_all([*(other.media("inbound", SILENCE, 20 * (6 + n)) for n in range(4)), other.stop()])
    assert other_client.wait_closed() == 1000
    assert server.summary(other.stream_sid)["media"] == "9", "the other call goes on"
    summary = server.summary(call.stream_sid)
    if flag:
        assert (code, summary["ended"], summary["media"]) == (1011, "error", "10")
        assert (f"stream={call.stream_sid} handler error: RuntimeError: Waiting waited on gevent in the event loop "
                "(a sleep, lock, full queue, network I/O, a network log handler): set media_in_event_loop = False on "
                "it; its next calls are read by their greenlets (traceback") in server.log()
    else:
        assert (code, summary["ended"], summary["media"]) == (1000, "stop", "20")
    assert server.stream(later.session(media=20, stop=True)) == 1000, "a later call of the class waits in its greenlet"
    assert server.summary(later.stream_sid)["media"] == "20"
    assert "Traceback" not in server.log()


def test_a_subclass_with_media_code_of_its_own_is_handled_in_its_greenlet_unless_it_says_otherwise():
    class Meter(app.MediaStream):  # its own media code only in what on_media calls: still the loop's
        def meter(self, track, ulaw):
            pass

    class Hearing(app.MediaStream):
        wants_pcm = True

        def on_audio(self, track, timestamp, pcm):
            pass

    class Quick(Hearing):
        media_in_event_loop = True

    class QuickChild(Quick):
        def on_dtmf(self, data):
            pass

    class ChildWithItsOwn(Quick):
        def on_media(self, data):
            super().on_media(data)

    class Remapped(app.MediaStream):  # the event table names a method of its own for media
        EVENTS = {**app.MediaStream.EVENTS, "media": "on_media_message"}

        def on_media_message(self, data):
            pass

    class AudioMixin:
        def on_audio(self, track, timestamp, pcm):
            pass

    class Mixed(AudioMixin, app.MediaStream):
        wants_pcm = True

    class Logged(app.MediaStream):  # handle() of its own, perhaps written before `only` existed
        def handle(self, message):
            return super().handle(message)

    class Echoing(app.EchoStream):
        pass

    assert app.MediaStream.media_in_event_loop and Meter.media_in_event_loop
    assert not Hearing.media_in_event_loop
    assert Quick.media_in_event_loop and QuickChild.media_in_event_loop
    assert not ChildWithItsOwn.media_in_event_loop
    assert not Remapped.media_in_event_loop and not Mixed.media_in_event_loop and not Logged.media_in_event_loop
    assert app.EchoStream.media_in_event_loop and app.GreetStream.media_in_event_loop and Echoing.media_in_event_loop


def test_pcm_reaches_on_audio_in_the_event_loop_exactly(start_server, tmp_path):
    """The benchmark's stream class: every chunk's arrival, in order, from the event loop."""
    server = start_server("--quiet-levels", script="import sys, app\nfrom tests.bench_stream import ArrivalTimes\n"
                                                   "app.main(sys.argv[1:], stream_class=ArrivalTimes)\n",
                          env={"ARRIVALS_DIR": str(tmp_path)})
    call = Call()
    audio = encode_ulaw(tone(1.0))
    assert server.stream([call.connected(), call.start(), *call.play({"inbound": audio}), call.stop()]) == 1000
    pairs = array("d", (tmp_path / f"{call.stream_sid}.bin").read_bytes())
    assert list(pairs[0::2]) == [20.0 * (n + 1) for n in range(50)]
    assert list(pairs[1::2]) == sorted(pairs[1::2])


def test_a_ping_between_media_messages_is_answered_at_once(server):
    client, call = server.open_call(media=1)
    server.wait_for(rf"stream={call.stream_sid} first media")  # its greenlet waits: the event loop reads
    client.send_raw(frame(0x1, call.media("inbound", SILENCE, 40).encode()) + frame(0x9, b"are you there"))
    assert client.recv_frame() == (0xA, b"are you there")
    client.send(call.stop())
    assert server.ending(client, call) == (1000, "stop", "2")


BURSTS_WHILE_BEHIND = """
import sys
import time
import app

class Bursts(app.MediaStream):
    media_in_event_loop = True

    def on_start(self, data):
        super().on_start(data)
        self.behind_at = []
        if self.stream_sid.endswith("0"):
            time.sleep(0.2)  # the whole process stops: its event loop runs late, as in an overload

    def on_media(self, data):
        super().on_media(data)
        if app.loop_behind:
            self.behind_at.append(time.monotonic())

    def on_stop(self, data):
        super().on_stop(data)
        at = self.behind_at  # a burst: 4 or more handled within 2 ms, after a pause
        bursts = sum(at[i + 3] - at[i] < 0.002 and (i == 0 or at[i] - at[i - 1] > 0.01) for i in range(len(at) - 3))
        app.log.info("%s bursts=%d of %d", self.label, bursts, len(at))

app.main(sys.argv[1:], stream_class=Bursts)
"""


def test_a_stream_read_by_the_event_loop_is_read_in_batches_once_the_process_falls_behind(start_server):
    server = start_server("--quiet-levels", "--read-interval-ms", "200", script=BURSTS_WHILE_BEHIND)
    call, stalling = Call(stream_sid="MZ" + "1" * 32), Call(stream_sid="MZ" + "0" * 32)
    client, _ = server.open_call(call)
    server.wait_for(rf"stream={call.stream_sid} start")
    server.open_call(stalling)
    for n in range(75):  # 1.5 s at Twilio's pace
        client.send(call.media("inbound", SILENCE, 20 * (n + 1)))
        time.sleep(0.02)
    client.send(call.stop())
    assert client.wait_closed() == 1000
    server.wait_for(r"this process cannot keep up; reading listen-only streams every 200 ms")
    bursts, handled = server.wait_for(rf"stream={call.stream_sid} bursts=(\d+) of (\d+)").groups()
    assert int(bursts) >= 3, f"read as each message landed while behind: {bursts} bursts in {handled} messages"
    assert server.summary(call.stream_sid)["media"] == "75"


def trickle(to_port: int) -> int:
    """A TCP relay to `to_port` that passes on what the client sends 50 bytes at a time, 1 ms
    apart, so TLS records reach the server in pieces: the port it listens on."""
    listener = socket.create_server(("127.0.0.1", 0))

    def pass_on(source, sink, piece=65536, pause=0.0):
        try:
            while data := source.recv(65536):
                for start in range(0, len(data), piece):
                    sink.sendall(data[start:start + piece])
                    time.sleep(pause)
        except OSError:
            pass
        finally:
            sink.close()

    def serve():
        client, _ = listener.accept()
        upstream = socket.create_connection(("127.0.0.1", to_port))
        threading.Thread(target=pass_on, args=(client, upstream, 50, 0.001), daemon=True).start()
        pass_on(upstream, client)  # the server's answers as they come

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def test_calls_over_gunicorns_own_tls_are_read_whole_by_their_greenlets(start_server, certificate):
    """A TLS socket may have to wait for the rest of a record, and holds decrypted bytes the
    socket does not show: the event loop leaves its reads to the call's greenlet."""
    cert, key = certificate
    server = start_server(command=gunicorn_command("-w", "1", "--certfile", str(cert), "--keyfile", str(key)),
                          ready=r"Listening at: https://127.0.0.1:(\d+)")
    done = simulator(f"wss://localhost:{trickle(server.port)}/media", "--seconds", "2", "--tracks", "both",
                     "--cafile", str(cert))
    assert done.returncode == 0, done.stderr
    stream_sid = re.search(r"stream=(\S+)", done.stdout).group(1)
    summary = server.summary(stream_sid)
    assert (summary["media"], summary["ended"], summary["bad"]) == ("200", "stop", "0")
    assert "Traceback" not in server.log()


NO_CYCLES = """
import base64, gc, os, sys
import gevent, gevent.socket
from gevent import pywsgi
import app
from tests.twilio_sim import Call, frame

class Crashing(app.MediaStream):
    media_in_event_loop = True

    def on_media(self, data):
        super().on_media(data)
        if self.tracks["inbound"].messages == 2 and self.call_sid.endswith("crash"):
            raise ValueError("a bug in the event loop")

app.configure(["--quiet-levels", "--log-level", "ERROR"], stream_class=Crashing)
server = pywsgi.WSGIServer(("127.0.0.1", 0), app.app, handler_class=app.MediaStreamHandler, log=None)
server.start()
gc.collect()
gc.disable()
gc.set_debug(gc.DEBUG_SAVEALL)
for n in range(4):
    call = Call()
    call.call_sid += "crash" if n % 2 else ""
    client = gevent.socket.create_connection(("127.0.0.1", server.server_port))
    key = base64.b64encode(os.urandom(16)).decode()
    client.sendall(("GET /media HTTP/1.1\\r\\nHost: x\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n"
                    f"Sec-WebSocket-Key: {key}\\r\\nSec-WebSocket-Version: 13\\r\\n\\r\\n").encode())
    while b"\\r\\n\\r\\n" not in client.recv(4096):
        pass
    client.sendall(b"".join(frame(0x1, m.encode()) for m in call.session()))
    gevent.sleep(0.1)  # its greenlet waits: the media that follows is handled by the event loop
    client.sendall(b"".join(frame(0x1, call.media("inbound", b"\\xff" * 160, 20 * n).encode()) for n in (1, 2, 3)))
    gevent.sleep(0.2)
    client.close()  # no stop, no close frame: the call ends when the server reads the end
    gevent.sleep(0.2)
gc.collect()
kept = sorted({type(o).__name__ for o in gc.garbage
               if isinstance(o, (app.MediaStream, app.MediaWebSocket, app.Track, BaseException))})
print("kept:", kept)
"""


def test_calls_that_hang_up_or_fail_in_the_event_loop_leave_no_reference_cycles(tmp_path):
    """A call's objects must go when it ends, not at the oldest collection: no cycle through
    the connection (fill, handle_as_it_lands) or an exception raised from the event loop."""
    script = tmp_path / "no_cycles.py"
    script.write_text(NO_CYCLES)
    done = subprocess.run([sys.executable, str(script)], env=clean_environment({"PYTHONPATH": str(ROOT)}),
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "kept: []", done.stdout + done.stderr[-3000:]
