"""Where messages are handled: media in the event loop as it lands (MediaWebSocket.on_readable),
every other message in the stream's greenlet by the tutorial's loop; both in the order sent."""
import json
import re
import socket
import subprocess
import sys
import threading
import time
import types
from array import array

import gevent

import pytest

import app
from tests.conftest import ROOT, InProcessServer, clean_environment, gunicorn_command, runtime, simulator
from tests.twilio_sim import CHUNK, Call, WSClient, encode_ulaw, frame, tone, write_wav

SILENCE = b"\xff" * CHUNK

def sent_in_bursts(server, call, client, media_at, audio_at):
    """Three bursts, each in one TCP write: media, a dtmf, bad input and an event of the
    class's own. What each message should have been handled by, in order."""
    sent = []
    for burst in range(3):  # each burst in one TCP write: the event loop reads them in one go
        data = b""
        for n in range(4):
            data += frame(0x1, call.media("inbound", SILENCE, 20 * (call.chunks + 1)).encode())
            sent.append(f"media{call.chunks}@{media_at}" if media_at else f"audio{20 * call.chunks}@{audio_at}")
        data += frame(0x1, call.dtmf(str(burst)).encode())
        sent.append(f"dtmf{burst}@greenlet")
        data += frame(0x1, b"not json")  # bad input on the way changes nothing
        data += frame(0x1, json.dumps({"event": "custom", "streamSid": call.stream_sid}).encode())
        sent.append("custom@greenlet")
        client.send_raw(data)
        server.wait_for(rf"stream={call.stream_sid} custom", count=burst + 1)  # not read along with the next
    return sent


def test_a_class_with_media_code_of_its_own_has_every_message_handled_in_its_greenlet_in_order(start_server):
    server = start_server("--quiet-levels", server="watched-own-media")
    call, client = Call(), server.connect()
    client.send_all(call.session())
    server.wait_for(rf"stream={call.stream_sid} start")
    sent = sent_in_bursts(server, call, client, media_at="greenlet", audio_at=None)
    client.send(call.stop())
    assert client.wait_closed() == 1000
    handled = server.wait_for(rf"stream={call.stream_sid} handled (.*)").group(1).split()
    assert [what for what in handled if not what.startswith("audio")] == sent
    summary = server.summary(call.stream_sid)
    assert (summary["media"], summary["bad"], summary["ended"]) == ("12", "3", "stop")


def test_your_on_audio_runs_in_the_calls_audio_greenlet_never_the_event_loop_each_chunk_in_order(start_server):
    """Media messages are handled by the event loop as they land (the server's own code);
    each chunk then reaches your on_audio() in a greenlet of the call's, where it may wait."""
    server = start_server("--quiet-levels", server="watched")
    call, client = Call(), server.connect()
    client.send_all(call.session())
    server.wait_for(rf"stream={call.stream_sid} start")
    sent = sent_in_bursts(server, call, client, media_at=None, audio_at="audio")
    client.send(call.stop())
    assert client.wait_closed() == 1000
    handled = server.wait_for(rf"stream={call.stream_sid} handled (.*)").group(1).split()
    assert [what for what in handled if what.startswith("audio")] == [what for what in sent if what.startswith("audio")]
    assert [what for what in handled if not what.startswith("audio")] == [w for w in sent if not w.startswith("audio")]
    summary = server.summary(call.stream_sid)
    assert (summary["media"], summary["bad"], summary["audio_dropped"]) == ("12", "3", "0")


@pytest.mark.parametrize("name", ["waits", "watched-own-media"])
def test_a_class_that_waits_on_gevent_in_its_audio_or_its_media_code_loses_no_call(start_server, name):
    """The ways a class lost calls while the event loop ran its code: a wait in on_audio(),
    in a helper it overrides (meter()), in a bounded queue's put()."""
    server = start_server("--quiet-levels", server=name)
    calls = [Call() for _ in range(3)]
    for call in calls:
        assert server.stream(call.session(media=50, stop=True)) == 1000
        summary = server.summary(call.stream_sid)
        assert (summary["ended"], summary["media"], summary["audio_dropped"]) == ("stop", "50", "0")
    assert "Traceback" not in server.log() and "handler error" not in server.log()


def test_a_logging_handler_that_waits_never_runs_in_the_event_loop(start_server):
    """What the event loop's callback makes (a first chunk, a warning) reaches the sinks, the
    console's logging handlers among them, from a greenlet, where a handler of yours may wait."""
    server = start_server(server="waiting-log-handler")
    call, client = Call(), server.connect()
    client.send_all(call.session())
    server.wait_for(rf"stream={call.stream_sid} start")  # its greenlet waits: the event loop reads what follows
    client.send_all([*(call.media("inbound", SILENCE, 20 * (n + 1)) for n in range(60)), "not json", call.stop()])
    assert client.wait_closed() == 1000
    summary = server.summary(call.stream_sid)
    assert (summary["ended"], summary["media"], summary["bad"]) == ("stop", "60", "1")
    assert f"stream={call.stream_sid} first media" in server.log() and "handler error" not in server.log()


def test_an_on_audio_that_falls_behind_drops_chunks_counted_and_the_call_goes_on(start_server):
    server = start_server("--quiet-levels", "--idle-timeout", "0", server="slow")  # 50 ms a chunk of 20 ms
    call, other = Call(), Call()
    assert server.stream(call.session(media=400, stop=True)) == 1000  # 8 s of audio, sent at once
    summary = server.summary(call.stream_sid, timeout=20)
    dropped = int(summary["audio_dropped"])
    assert summary["ended"] == "stop" and summary["media"] == "400"
    assert 400 - app.AUDIO_QUEUE_CHUNKS - 150 <= dropped < 400, "what waited beyond the queue, and what the end left"
    assert server.log().count(f"stream={call.stream_sid} Slow.on_audio() is 250 chunks behind") == 1
    assert server.stream(other.session(media=5, stop=True)) == 1000, "the server goes on"


def test_media_in_the_event_loop_for_this_modules_own_code_only():
    """Decided when a class is made: the event loop handles its media messages when what it
    runs for them is app.py's own code. A class's own on_audio() never runs there at all."""
    class Hooks(app.MediaStream):  # hooks only: its media still the loop's, its on_audio() in a greenlet
        def setup(self):
            pass

        def on_audio(self, track, timestamp, pcm):
            pass

        def on_dtmf(self, data):
            pass

    class Meter(app.MediaStream):  # a helper of the media code, its own
        def meter(self, track, ulaw):
            pass

    class Claims(app.MediaStream):  # the flag of old: ignored, and harmless
        _media_in_event_loop = True

        def on_media(self, data):
            super().on_media(data)

    class Remapped(app.MediaStream):  # the event table names a method of its own for media
        EVENTS = {**app.MediaStream.EVENTS, "media": "on_media_message"}

        def on_media_message(self, data):
            pass

    class MediaMixin:
        def on_media(self, data):
            pass

    class Mixed(MediaMixin, app.MediaStream):
        pass

    class Logged(app.MediaStream):
        def handle(self, message):
            return super().handle(message)

    class Echoing(app.EchoStream):
        pass

    assert Hooks._media_in_event_loop and Hooks._audio_in_greenlet and Hooks.wants_pcm
    assert not any(cls._media_in_event_loop for cls in (Meter, Claims, Remapped, Mixed, Logged))
    assert app.MediaStream._media_in_event_loop and not app.MediaStream._audio_in_greenlet
    assert app.EchoStream._media_in_event_loop and app.GreetStream._media_in_event_loop and Echoing._media_in_event_loop
    assert not app.GreetStream._audio_in_greenlet, "the server's own on_audio() runs as each chunk lands"


def waiting(function):
    """`function`, after a wait: in the event loop's callback, BlockingSwitchOutError."""
    def waits(self, *args, **kwargs):
        gevent.sleep(0)
        return function(self, *args, **kwargs)
    return waits


def every_method(stream_class):
    """Every method and property stream_class and its bases define, found by looking, with one that waits first."""
    methods = {}
    for klass in reversed(stream_class.__mro__[:-1]):
        for name, attribute in vars(klass).items():
            if isinstance(attribute, types.FunctionType):
                methods[name] = waiting(attribute)
            elif isinstance(attribute, property):
                methods[name] = property(*(f and waiting(f) for f in (attribute.fget, attribute.fset, attribute.fdel)))
    return methods


def your_on_audio(self, track, timestamp, pcm):
    pass


@pytest.mark.parametrize("base, expected", [
    (app.MediaStream, {"media": "50", "audio_dropped": "0", "recordings": None}),
    (app.EchoStream, {"media": "50", "sent": "50/1.00s", "marks": "1/0/0"}),
    (app.GreetStream, {"media": "50", "sent": "10/0.20s", "marks": "1/0/0", "barge_ins": "0"})], ids=lambda b: getattr(b, "__name__", ""))
def test_whatever_a_class_overrides_with_code_that_waits_never_runs_in_the_event_loop(tmp_path, base, expected):
    """One rule, from the class itself: the event loop's callback runs only this module's own
    code. Each method of the class, private ones too, is overridden by one that waits, and a
    call is played through a real server: every count exact, never a BlockingSwitchOutError."""
    greeting = tmp_path / "greeting.wav"
    write_wav(greeting, [0] * 1600)  # 0.2 s: ten messages, all of them taken by the socket at once
    serving = runtime(record=str(tmp_path), greet=str(greeting) if base is app.GreetStream else None)
    ended, started = [], threading.Event()
    serving.sinks.append(lambda event: ended.append(event) if isinstance(event, app.Ended) else
                         started.set() if isinstance(event, app.Started) else None)
    server = InProcessServer(serving)
    try:
        for name, override in every_method(base).items():
            extra = {"on_audio": your_on_audio} if base is app.MediaStream and name != "on_audio" else {}
            serving.stream_class = type(f"Waits{name}", (base,), {name: override, **extra})
            started.clear()
            code = server.run(play_a_call, server.url, started)
            summary = ended.pop().summary.fields()
            assert code == 1000 and summary["ended"] == "stop" and summary["bad"] == "0", (name, summary)
            for field_name, value in expected.items():
                assert summary.get(field_name, None) == value or value is None and field_name in summary, (name, summary)
    finally:
        server.stop()


def play_a_call(url, started):
    """A call whose media come after its start: for a stream of the event loop's, the loop handles them."""
    call, client = Call(), WSClient(url)
    client.send_all([call.connected(), call.start()])
    assert started.wait(5)
    for burst in range(5):
        client.send_raw(b"".join(frame(0x1, call.media("inbound", SILENCE, 20 * (10 * burst + n + 1)).encode())
                                 for n in range(10)))
    client.send_all([call.dtmf("1"), call.stop()])
    return client.wait_closed()


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


def test_a_stream_read_by_the_event_loop_is_read_in_batches_once_the_process_falls_behind(start_server):
    server = start_server("--quiet-levels", "--read-interval-ms", "200", server="bursts")
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


def test_calls_that_hang_up_or_fail_leave_no_reference_cycles():
    """A call's objects must go when it ends, not at the oldest collection: no cycle through
    the connection (fill, handle_as_it_lands), its audio greenlet, or the exception a bug in
    on_audio() raised into the call (tests/servers.py's no_cycles())."""
    done = subprocess.run([sys.executable, "-m", "tests.servers", "no-cycles"], cwd=ROOT, env=clean_environment(),
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "kept: []", done.stdout + done.stderr[-3000:]
