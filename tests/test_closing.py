"""How streams end, end to end: the exact close code the README promises for each ending,
the summary that goes with it, and a closing handshake the client can read to the end."""
import signal
import struct

import pytest

from tests.conftest import decoded, samples
from tests.twilio_sim import CHUNK, Call, HandshakeRefused, WSClient, encode_ulaw, frame, tone

SILENCE = b"\xff" * CHUNK


def test_1000_after_stop(server):
    call = Call()
    assert server.stream(call.session(media=3, stop=True)) == 1000
    assert server.summary(call.stream_sid)["ended"] == "stop"


def test_1000_after_idle(start_server):
    server = start_server("--idle-timeout", "1")
    client, call = server.open_call(media=2)
    assert server.ending(client, call) == (1000, "idle", "2")
    assert f"stream={call.stream_sid} nothing received for 1 s" in server.log()


def test_a_client_that_does_not_answer_our_close_is_not_also_idle(start_server):
    """Our closing wait (2 s) outlasts --idle-timeout 1 here: the idle sweeper must leave
    a stream that is closing alone, or its exception escapes the route as a traceback."""
    server = start_server("--idle-timeout", "1")
    client = server.connect()
    call = Call()
    client.send_all(call.session(media=1, stop=True))
    assert client.recv_frame() == (0x8, struct.pack("!H", 1000))  # read, never answered
    assert client.sock.recv(1) == b"", "the server closes after its bounded wait"
    assert server.summary(call.stream_sid)["ended"] == "stop"
    assert server.stream(Call().session(stop=True)) == 1000
    assert "Traceback" not in server.log() and "IdleTimeout" not in server.log()


def test_the_clients_close_is_answered_with_its_code_and_is_a_disconnect(server):
    client, call = server.open_call(media=2)
    client.send_raw(frame(0x8, struct.pack("!H", 1001)))
    assert client.wait_closed() == 1001
    assert server.summary(call.stream_sid)["ended"] == "disconnect"


@pytest.mark.parametrize("bad, code, reason", [
    (frame(0x1, b"{}", mask=None), 1002, "client frame not masked"),
    (frame(0x1, b"{}", rsv=0x40), 1002, "reserved bits set without an extension"),
    (frame(0x8, struct.pack("!H", 5000)), 1002, "invalid close frame (code 5000)"),
    (frame(0x1, b'{"event": "\xff\xfe"}'), 1007, "invalid UTF-8 in a text message"),
    (frame(0x1, b"x" * 1000, length=2 ** 30), 1009, f"frame of {2 ** 30} bytes over the 65536-byte limit"),
], ids=["unmasked", "reserved-bits", "close-code-5000", "invalid-utf8", "gibibyte-frame"])
def test_a_client_breaking_the_protocol_gets_its_code_and_the_call_its_summary(server, bad, code, reason):
    client, call = server.open_call(media=4)
    client.send_raw(bad)
    assert server.ending(client, call) == (code, "error", "4")
    assert client.close_reason == reason
    assert f"stream={call.stream_sid} WebSocket error, closed with {code}: {reason}" in server.log()


def test_a_client_still_sending_after_its_error_reads_the_code_not_a_reset(server):
    """We close the connection only after the client's EOF (or a bounded wait): closing with
    its data unread would reset the connection, and a reset can lose our close frame."""
    client, call = server.open_call(media=2)
    flood = b"".join(frame(0x1, call.media("inbound", SILENCE, 20 * n).encode()) for n in range(3, 3000))
    client.send_raw(frame(0x1, b"{}", mask=None) + flood)  # 1.1 MB after the bad frame: no BrokenPipe
    assert client.wait_closed() == 1002
    assert server.summary(call.stream_sid)["media"] == "2", "nothing after the bad frame is handled"


def test_a_message_over_the_limit_in_fragments_gets_1009(start_server):
    server = start_server("--max-message-bytes", "1024")
    client, call = server.open_call(media=2)
    for n in range(3):
        client.send_raw(frame(0x1 if n == 0 else 0x0, b"y" * 400, fin=False))
    assert client.wait_closed() == 1009
    assert server.summary(call.stream_sid)["ended"] == "error"
    assert "message over the 1024-byte limit" in server.log()


def test_a_bug_in_your_on_audio_is_counted_and_shown_once_and_the_call_its_recording_go_on(start_server, tmp_path):
    """A bug in your on_audio() (tests/servers.py's Crashing, at every chunk from the 10th) is
    the class's problem, not the caller's: the first traceback at the default level, the rest
    counted, and the call, its recording and its close code as if nothing had happened."""
    server = start_server("--record", str(tmp_path / "rec"), server="crashing")
    call = Call()
    audio = encode_ulaw(tone(0.4))
    assert server.stream([call.connected(), call.start(), *call.play({"inbound": audio}), call.stop()]) == 1000
    summary = server.summary(call.stream_sid)
    assert (summary["ended"], summary["media"], summary["on_audio_errors"]) == ("stop", "20", "11")
    log = server.log()
    assert log.count(f"stream={call.stream_sid} bug in on_audio(): RuntimeError: bug in on_audio") == 1
    assert log.count("Traceback") == 1 and 'raise RuntimeError("bug in on_audio")' in log
    assert samples(tmp_path / "rec" / f"{call.stream_sid}_inbound.wav") == decoded(audio)


def test_1011_when_a_bug_in_app_py_ends_the_stream_with_a_valid_wav_and_a_summary(start_server, tmp_path):
    """A bug in the server's own handling (tests/servers.py's our-bug, in the 10th media
    message's) ends that call: 1011, a summary, a valid recording of what came, no traceback
    (at --log-level debug only); the other calls go on."""
    server = start_server("--record", str(tmp_path / "rec"), server="our-bug")
    call = Call()
    audio = encode_ulaw(tone(0.4))
    assert server.stream([call.connected(), call.start(), *call.play({"inbound": audio})]) == 1011
    summary = server.summary(call.stream_sid)
    assert summary["ended"] == "error" and summary["media"] == "9"
    assert f"stream={call.stream_sid} handler error: RuntimeError: a bug in app.py's own handling" in server.log()
    assert "Traceback" not in server.log()
    assert samples(tmp_path / "rec" / f"{call.stream_sid}_inbound.wav") == decoded(audio[:9 * CHUNK])
    next_call = Call()  # the server goes on serving other calls
    assert server.stream(next_call.session(stop=True)) == 1000
    assert server.summary(next_call.stream_sid)["ended"] == "stop"


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_1001_and_a_summary_for_every_open_stream_on_shutdown(start_server, stop_signal):
    server = start_server()
    opened_calls = [server.open_call(media=5) for _ in range(3)]
    for client, call in opened_calls:
        client.send(call.dtmf("1"))  # after the media: once logged, all five are counted
        server.wait_for(rf"stream={call.stream_sid} dtmf digit=1")
    assert server.stop_with(stop_signal, *(client for client, _ in opened_calls)) == [1001] * 3
    for _, call in opened_calls:
        summary = server.summary(call.stream_sid, timeout=0)
        assert summary["ended"] == "shutdown" and summary["media"] == "5"
    assert "Traceback" not in server.log()


def test_a_new_caller_gets_503_while_open_streams_end(start_server):
    server = start_server()
    client, call = server.open_call(media=3)
    server.wait_for(rf"stream={call.stream_sid} first media")
    server.process.send_signal(signal.SIGTERM)
    assert server.summary(call.stream_sid)["ended"] == "shutdown"  # its close frame now waits for our answer
    with pytest.raises(HandshakeRefused) as refused:
        WSClient(server.url)
    assert refused.value.status == 503
    assert client.wait_closed() == 1001
    assert server.process.wait(10) == 0


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_1001_on_shutdown_under_gunicorn(gunicorn, stop_signal):
    client, call = gunicorn.open_call(media=3)
    gunicorn.wait_for(rf"stream={call.stream_sid} start")
    # SIGTERM ends calls 4 s before --graceful-timeout, here at once; SIGINT is Ctrl-C
    assert gunicorn.stop_with(stop_signal, client) == [1001]
    assert gunicorn.summary(call.stream_sid, timeout=0)["ended"] == "shutdown"
