"""Scaling out: the same app under gunicorn with our worker, two processes."""
import os
import re
import signal
import subprocess
import wave

import pytest
from twilio.request_validator import RequestValidator

from tests.conftest import (GUNICORN_READY, ROOT, clean_environment, fetch_url, free_port, gunicorn_command,
                            readme_example, run_at_once)
from tests.twilio_sim import CHUNK, Call, HandshakeRefused, WSClient, encode_ulaw, play_connect_call, tone, write_wav

TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def signed_gunicorn(start_server, tmp_path):
    server = start_server(command=gunicorn_command("-w", "2", "--graceful-timeout", "3"), ready=GUNICORN_READY,
                          env={"TWILIO_AUTH_TOKEN": TOKEN, "MAX_MESSAGE_BYTES": "2000",
                               "RECORD_DIR": str(tmp_path / "recordings")})
    server.wait_for(r"Booting worker", count=2)
    return server


WORKER_READY = "def post_worker_init(worker):\n    worker.log.info('Worker ready (pid: %s)', worker.pid)\n"


def gunicorn_with_workers_ready(start_server, tmp_path, workers, *args, **options):
    """gunicorn once each worker is past its start-up: a signal before that reaches the handler
    the worker inherited from the master, and is lost (then the master waits --graceful-timeout)."""
    config = tmp_path / "worker_ready.py"
    config.write_text(WORKER_READY)
    server = start_server(command=gunicorn_command("-c", str(config), "-w", str(workers), *args),
                          ready=GUNICORN_READY, **options)
    server.wait_for(r"Worker ready", count=workers)
    return server


def signed(server):
    url = f"wss://127.0.0.1:{server.port}/media"
    return {"X-Twilio-Signature": RequestValidator(TOKEN).compute_signature(url, {})}


def test_concurrent_calls_through_two_gunicorn_workers(signed_gunicorn):
    calls = [Call() for _ in range(12)]

    def play(i, call):
        assert signed_gunicorn.stream(call.session(media=30 + i, stop=True), **signed(signed_gunicorn)) == 1000

    assert not run_at_once(play, calls)
    for i, call in enumerate(calls):
        summary = signed_gunicorn.summary(call.stream_sid)
        assert summary["ended"] == "stop" and summary["media"] == str(30 + i)
        with wave.open(summary["recordings"].rsplit(":", 1)[0], "rb") as recording:
            assert recording.getnframes() == (30 + i) * CHUNK
    workers = set(re.findall(r"\[(\d+)\] \[INFO\] Booting worker", signed_gunicorn.log()))
    assert len(workers) == 2


def test_signatures_and_limits_apply_under_gunicorn(signed_gunicorn):
    with pytest.raises(HandshakeRefused) as refused:
        WSClient(signed_gunicorn.url)
    assert refused.value.status == 403
    assert ("refused WebSocket remote=127.0.0.1 path=/media status=403 reason=missing X-Twilio-Signature"
            in signed_gunicorn.log())
    call = Call()
    assert signed_gunicorn.stream([*call.session(), "x" * 3000], **signed(signed_gunicorn)) == 1009  # over 2000
    assert signed_gunicorn.summary(call.stream_sid)["ended"] == "error"
    assert "TWILIO_AUTH_TOKEN is not set" not in signed_gunicorn.log()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_stopping_gunicorn_summarizes_open_calls_and_keeps_their_recordings(signed_gunicorn, stop_signal):
    call = Call()
    client = WSClient(signed_gunicorn.url, headers=signed(signed_gunicorn))
    client.send_all([*call.session(media=25, chunk=b"\x00" * CHUNK), call.dtmf("1")])
    signed_gunicorn.wait_for(rf"stream={call.stream_sid} dtmf digit=1")  # sent last: all media handled
    assert signed_gunicorn.stop_with(stop_signal, client) == [1001]  # SIGINT is Ctrl-C: gunicorn's quick stop
    summary = signed_gunicorn.summary(call.stream_sid, timeout=0)
    assert (summary["ended"], summary["media"]) == ("shutdown", "25")
    with wave.open(summary["recordings"].rsplit(":", 1)[0], "rb") as recording:
        assert recording.getnframes() == 25 * CHUNK


def test_ctrl_c_in_the_terminal_stops_gunicorn_quietly(start_server, tmp_path):
    """Ctrl-C signals the whole process group: SIGINT to the master and every worker at once,
    then the master's SIGQUIT to each worker. One stop per worker, each call's summary once."""
    server = gunicorn_with_workers_ready(start_server, tmp_path, 2,
                                         preexec_fn=os.setsid)  # a group of its own, as in a terminal
    opened = [server.open_call(media=3) for _ in range(2)]
    for _, call in opened:
        server.wait_for(rf"stream={call.stream_sid} first media")
    os.killpg(server.process.pid, signal.SIGINT)
    assert [client.wait_closed(10) for client, _ in opened] == [1001, 1001]
    assert server.process.wait(15) == 0
    log = server.log()
    for _, call in opened:
        assert log.count(f"summary stream={call.stream_sid} ") == 1
        assert server.summary(call.stream_sid, timeout=0)["ended"] == "shutdown"
    assert len(re.findall(r"SIG(INT|QUIT): shutting down", log)) == 2  # one per worker, whichever came first
    booted = set(re.findall(r"\[INFO\] Booting worker with pid: (\d+)", log))
    assert set(re.findall(r" worker=(\d+) SIG(?:INT|QUIT): shutting down", log)) == booted, "which worker says it"
    assert "Traceback" not in log and "SystemExit" not in log
    assert log.count("TWILIO_AUTH_TOKEN is not set") == 1  # from the master, not once per worker


def test_new_callers_get_503_while_a_worker_drains_its_calls(start_server, tmp_path):
    """SIGTERM: open calls go on for --graceful-timeout; a new caller meanwhile gets 503, not
    "connection refused", and the worker exits as soon as its last call has ended by itself."""
    server = gunicorn_with_workers_ready(start_server, tmp_path, 1, "--graceful-timeout", "30")
    client, call = server.open_call(media=3)
    server.wait_for(rf"stream={call.stream_sid} first media")
    server.process.send_signal(signal.SIGTERM)
    server.wait_for(r"SIGTERM: draining, 1 open stream\(s\)")
    with pytest.raises(HandshakeRefused) as refused:
        WSClient(server.url)
    assert refused.value.status == 503 and b"shutting down" in refused.value.body
    assert fetch_url(server.http_url + "/healthz") == (503, "shutting down\n")  # a load balancer sends no more
    client.send(call.stop())
    assert client.wait_closed() == 1000
    assert server.process.wait(10) == 0  # not 26 s later, when calls still open would be ended
    summary = server.summary(call.stream_sid, timeout=0)
    assert (summary["ended"], summary["media"]) == ("stop", "3")


def test_a_reload_leaves_new_callers_to_the_new_workers(start_server, tmp_path):
    """HUP: the old worker drains its calls while new workers take new callers: it closes its
    listener, as gunicorn does, rather than answering them 503."""
    server = gunicorn_with_workers_ready(start_server, tmp_path, 1, "--graceful-timeout", "30")
    old_worker = server.wait_for(r"Worker ready \(pid: (\d+)\)").group(1)
    client, call = server.open_call(media=3)
    server.wait_for(rf"stream={call.stream_sid} first media")
    server.process.send_signal(signal.SIGHUP)
    server.wait_for(r"Worker ready", count=2)
    server.wait_for(r"SIGTERM: draining, 1 open stream\(s\); new ones go to the other workers")
    callers = [server.connect() for _ in range(10)]  # no 503, and none of them the old worker's:
    client.send(call.stop())
    assert client.wait_closed() == 1000
    server.wait_for(rf"Worker exiting \(pid: {old_worker}\)")  # it has no call left once this one ends
    for caller in callers:
        caller.close()
    assert server.summary(call.stream_sid)["ended"] == "stop"


def test_stream_class_names_your_subclass_under_gunicorn(start_server, tmp_path):
    """The README's process_audio.py, served by gunicorn as the README says: STREAM_CLASS."""
    (tmp_path / "process_audio.py").write_text(readme_example())
    server = start_server(command=gunicorn_command("-w", "1"), ready=GUNICORN_READY,
                          env={"STREAM_CLASS": "process_audio:ProcessedStream", "PYTHONPATH": str(tmp_path)})
    call = Call()
    audio = encode_ulaw(tone(0.3))
    assert server.stream([call.connected(), call.start(), *call.play({"inbound": audio}), call.stop()]) == 1000
    server.wait_for(rf"stream={call.stream_sid} processed chunks=15 seconds=0.30 peak=\d+")


@pytest.mark.parametrize("env, error", [
    ({"MAX_STREAMS": "ten"},
     "app.py: error: --max-streams (MAX_STREAMS): 'ten' is not a whole number from 1 to 100000"),
    ({"STREAM_CLASS": "no_such_module:Stream"},
     "app.py: error: STREAM_CLASS: cannot load 'no_such_module:Stream': no module named 'no_such_module'"),
    ({"GREET": "/no/such/greeting.wav"},
     "app.py: error: --greet (GREET): cannot read '/no/such/greeting.wav': No such file or directory"),
    ({"STREAM_CLASS": "json:NoSuchClass"},  # two workers failing at once printed gunicorn's HaltServer traceback
     "app.py: error: STREAM_CLASS: cannot load 'json:NoSuchClass': module 'json' has no 'NoSuchClass'"),
    ({"STREAM_CLASS": "tests.servers:OwnInit"},
     "app.py: error: STREAM_CLASS: 'tests.servers:OwnInit': OwnInit() must take (runtime, remote=, ws=)"),
])
def test_a_setting_that_cannot_work_stops_gunicorn_with_one_line(env, error):
    out = subprocess.run(gunicorn_command("-w", "2"), cwd=ROOT, env=clean_environment(env),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.count(error) == 1 and "Traceback" not in out.stderr


def test_a_stream_that_will_not_end_does_not_hold_up_ctrl_c(start_server, tmp_path):
    server = start_server(command=gunicorn_command("-w", "1", "--graceful-timeout", "20"), ready=GUNICORN_READY,
                          env={"STREAM_CLASS": "tests.servers:SlowFinish"})
    server.wait_for(r"Booting worker")
    client, call = server.open_call()
    server.wait_for(rf"stream={call.stream_sid} start")
    server.process.send_signal(signal.SIGINT)
    server.process.wait(15)  # gunicorn's own kill would come at --graceful-timeout 20
    assert "1 stream(s) still ending after 3 s: stopping without waiting for them" in server.log()
    assert "SIGKILL" not in server.log()


def test_echo_under_gunicorn(start_server):
    server = start_server(command=gunicorn_command("-w", "2"), ready=GUNICORN_READY, env={"ECHO": "1"})
    server.wait_for(r"Booting worker", count=2)
    player, code, call = play_connect_call(server.url, tone(0.4), jitter_ms=60, out=lambda line: None)
    assert (code, player.media, player.violations) == (1000, 20, [])
    assert server.summary(call.stream_sid)["sent"] == "20/0.40s"


def test_a_greeting_file_gone_later_does_not_stop_a_restarted_worker(start_server, tmp_path):
    """The master reads --greet once; a worker restarted after the file is gone uses that copy."""
    path = tmp_path / "greeting.wav"
    write_wav(path, tone(0.2))
    server = start_server(command=gunicorn_command("-w", "1"), ready=GUNICORN_READY, env={"GREET": str(path)})
    worker = int(server.wait_for(r"Booting worker with pid: (\d+)").group(1))
    path.unlink()
    os.kill(worker, signal.SIGKILL)  # gunicorn starts another: it must boot without the file
    server.wait_for(r"Booting worker with pid: (\d+)", count=2)
    quiet_caller = [sample // 300 for sample in tone(0.2)]
    player, code, call = play_connect_call(server.url, quiet_caller, out=lambda line: None)
    assert [(name, how) for name, how, _ in player.marks] == [("greeting", "played")]
    assert "Worker failed to boot" not in server.log()


def test_the_masters_lines_are_stamped_and_each_workers_lines_name_it(start_server):
    server = start_server(command=gunicorn_command("-w", "1"), ready=GUNICORN_READY,
                          env={"METRICS_PORT": str(free_port())})
    line = server.wait_for(r".*Metrics for Prometheus at http://127.0.0.1:\d+/metrics, all workers together").group(0)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO    Metrics", line), line
    call = Call()
    assert server.stream(call.session(media=1, stop=True)) == 1000
    summary = server.wait_for(rf".* summary stream={call.stream_sid} .*").group(0)
    worker = re.search(r"INFO    worker=(\d+) summary", summary)
    assert worker and worker.group(1) in re.findall(r"Booting worker with pid: (\d+)", server.log())
