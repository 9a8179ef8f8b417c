"""Scaling out: the same app under gunicorn with our worker, two processes."""
import re
import signal
import sys
import time
import wave

import pytest
from twilio.request_validator import RequestValidator

from tests.conftest import ROOT, Server, run_at_once
from tests.twilio_sim import CHUNK, Call, HandshakeRefused, WSClient

TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def gunicorn(tmp_path):
    command = [sys.executable, "-m", "gunicorn", "-k", "app.GunicornWorker", "-w", "2",
               "-b", "127.0.0.1:0", "--no-control-socket", "--graceful-timeout", "3", "app:app"]
    server = Server(tmp_path, command=command, ready=r"Listening at: http://127.0.0.1:(\d+)",
                    env={"TWILIO_AUTH_TOKEN": TOKEN, "MAX_MESSAGE_BYTES": "2000",
                         "RECORD_DIR": str(tmp_path / "recordings")})
    server.wait_for(r"Booting worker", count=2)
    yield server
    server.stop()


def signed(server):
    url = f"wss://127.0.0.1:{server.port}/media"
    return {"X-Twilio-Signature": RequestValidator(TOKEN).compute_signature(url, {})}


def test_concurrent_calls_through_two_gunicorn_workers(gunicorn):
    calls = [Call() for _ in range(12)]

    def play(i, call):
        client = WSClient(gunicorn.url, headers=signed(gunicorn))
        client.send(call.connected())
        client.send(call.start())
        for n in range(30 + i):
            client.send(call.media("inbound", b"\xff" * CHUNK, 20 * (n + 1)))
        client.send(call.stop())
        client.wait_closed()

    assert not run_at_once(play, calls)
    for i, call in enumerate(calls):
        summary = gunicorn.summary(call.stream_sid)
        assert summary["ended"] == "stop" and summary["media"] == str(30 + i)
        with wave.open(summary["recordings"].rsplit(":", 1)[0], "rb") as recording:
            assert recording.getnframes() == (30 + i) * CHUNK
    workers = set(re.findall(r"\[(\d+)\] \[INFO\] Booting worker", gunicorn.log()))
    assert len(workers) == 2


def test_signatures_and_limits_apply_under_gunicorn(gunicorn):
    with pytest.raises(HandshakeRefused) as refused:
        WSClient(gunicorn.url)
    assert refused.value.status == 403
    assert "refused WebSocket remote=127.0.0.1 path=/media status=403 reason=missing X-Twilio-Signature" in gunicorn.log()
    call = Call()
    client = WSClient(gunicorn.url, headers=signed(gunicorn))
    client.send(call.connected())
    client.send(call.start())
    client.send("x" * 3000)  # over MAX_MESSAGE_BYTES=2000 from the environment
    assert client.wait_closed()
    assert gunicorn.summary(call.stream_sid)["ended"] == "error"
    assert "TWILIO_AUTH_TOKEN is not set" not in gunicorn.log()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_stopping_gunicorn_summarizes_open_calls_and_keeps_their_recordings(gunicorn, stop_signal):
    call = Call()
    client = WSClient(gunicorn.url, headers=signed(gunicorn))
    client.send(call.connected())
    client.send(call.start())
    for n in range(25):
        client.send(call.media("inbound", b"\x00" * CHUNK, 20 * (n + 1)))
    gunicorn.wait_for(rf"stream={call.stream_sid} first media")
    time.sleep(0.2)
    gunicorn.process.send_signal(stop_signal)  # SIGINT is Ctrl-C: gunicorn's quick stop
    gunicorn.process.wait(15)  # on SIGTERM calls end 4 s before --graceful-timeout: here at once
    summary = gunicorn.summary(call.stream_sid, timeout=0)
    assert (summary["ended"], summary["media"]) == ("shutdown", "25")
    with wave.open(summary["recordings"].rsplit(":", 1)[0], "rb") as recording:
        assert recording.getnframes() == 25 * CHUNK


SLOW_FINISH = """
import gevent

import app


class SlowStream(app.MediaStream):
    def finish(self):
        gevent.sleep(30)  # a finish() of your own that never ends in time
        super().finish()


app.MediaStream = SlowStream
from app import app  # noqa: E402  (what gunicorn serves)
"""


def test_a_stream_that_will_not_end_does_not_hold_up_ctrl_c(tmp_path):
    (tmp_path / "slow_app.py").write_text(SLOW_FINISH)
    command = [sys.executable, "-m", "gunicorn", "-k", "app.GunicornWorker", "-w", "1", "-b", "127.0.0.1:0",
               "--no-control-socket", "--graceful-timeout", "20", "slow_app:app"]
    server = Server(tmp_path, command=command, ready=r"Listening at: http://127.0.0.1:(\d+)",
                    env={"PYTHONPATH": f"{tmp_path}:{ROOT}"})
    server.wait_for(r"Booting worker")
    call = Call()
    client = WSClient(server.url)
    client.send(call.connected())
    client.send(call.start())
    server.wait_for(rf"stream={call.stream_sid} start")
    server.process.send_signal(signal.SIGINT)
    server.process.wait(15)  # gunicorn's own kill would come at --graceful-timeout 20
    server.stop()
    assert "1 stream(s) still ending after 3 s: stopping without waiting for them" in server.log()
    assert "SIGKILL" not in server.log()
