"""Alerts that reach people (--alert-webhook): each alert POSTed as JSON, signed, in order,
once, to a real HTTP receiver of the test's that is up, down then up, slow, or failing; with
Redis, across two processes, one of which is killed. The servers hear "Line N: I want my
money back." for each sentence (tests/servers.py's says-refunds): an alert a sentence."""
import hashlib
import hmac
import json
import re
import signal
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import REDIS_SERVER, ROOT, free_port, http_request
from tests.twilio_sim import Call, encode_ulaw, read_wav

SECRET = "alert-secret-0123456789"
SENTENCES = encode_ulaw(read_wav(ROOT / "tests" / "speech" / "two_sentences.wav"))  # two sentences: two alerts


class Receiver:
    """A webhook's receiving end on 127.0.0.1: every POST it got (headers, body), answered with
    the next of `answers` (then 200) after `delay` seconds; listening only once start()ed."""

    def __init__(self, port=None, answers=(), delay=0.0):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks/T000/B000/XXXX"
        self.answers, self.delay, self.got, self.server = deque(answers), delay, [], None
        self.changed = threading.Condition()

    def start(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(receiver.delay)
                status = receiver.answers.popleft() if receiver.answers else 200
                with receiver.changed:
                    receiver.got.append((self.path, dict(self.headers), body, status))
                    receiver.changed.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def taken(self, count, timeout=20.0):
        """The bodies of the first `count` POSTs answered 2xx, parsed, waiting up to `timeout` s."""
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.ok()) >= count, timeout), \
                f"{len(self.ok())} of {count} alerts taken; got {[(g[3], g[2][:80]) for g in self.got]}"
            return [json.loads(body) for body in self.ok()]

    def ok(self):
        return [body for _, _, body, status in self.got if 200 <= status < 300]

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def receivers():
    made = []

    def make(*args, **kwargs):
        made.append(Receiver(*args, **kwargs))
        return made[-1]

    yield make
    for receiver in made:
        receiver.stop()


@pytest.fixture
def alerting(start_server, tmp_path):
    """A server with --transcribe --alerts and --alert-webhook URL (and `flags`)."""
    alerts = tmp_path / "alerts.txt"
    alerts.write_text("refund: refund, money back\n")

    def start(url, *flags, env=None, patient=False):  # patient: an alert is dropped after 60 s, not 4
        return start_server("--transcribe", "--quiet-levels", "--alerts", str(alerts), "--alert-webhook", url,
                            *flags, server="says-refunds-patient" if patient else "says-refunds", env=env)
    return start


def play(server, caller="+15550001001", audio=SENTENCES):
    """A call whose caller says two sentences, sent at once, then `stop`: its Call."""
    call = Call(params={"From": caller})
    client = server.connect()
    client.send_all([*call.session(audio={"inbound": audio}), call.stop()])
    assert client.wait_closed(20) == 1000
    return call


def test_each_alert_reaches_the_webhook_once_signed_in_order_with_its_caller_and_a_link(alerting, receivers):
    receiver = receivers().start()
    server = alerting(receiver.url, "--floor-url", "https://floor.example.com", env={"ALERT_WEBHOOK_SECRET": SECRET})
    server.wait_for(r"Alerts POSTed to http://127\.0\.0\.1:\d+/…, signed \(ALERT_WEBHOOK_SECRET\)")
    assert "/hooks/T000" not in server.log(), "a webhook's path is its secret: never on the console"
    call = play(server)
    first, second = receiver.taken(2)
    time.sleep(0.5)
    assert len(receiver.got) == 2, "each alert once"
    link = f"https://floor.example.com/history/{call.stream_sid}"
    assert first == {
        "text": f'Alert refund: "money back" from +15550001001: "Line 1: I want my money back." {link}',
        "category": "refund", "phrase": "money back", "line": "Line 1: I want my money back.", "track": "inbound",
        "caller": "+15550001001", "call": call.call_sid, "stream": call.stream_sid, "server": first["server"],
        "time": first["time"], "link": link, "id": first["id"]}
    assert second["line"] == "Line 2: I want my money back." and second["id"] != first["id"], "in the order said"
    for path, headers, body, _ in receiver.got:
        assert path == "/hooks/T000/B000/XXXX" and headers["Content-Type"] == "application/json"
        wanted = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Mediastreams-Signature"], wanted)
    assert server.summary(call.stream_sid)["alerts"] == "2"


def test_a_receiver_down_then_up_gets_every_alert_once_in_order(alerting, receivers):
    receiver = receivers()  # not listening yet: connection refused
    server = alerting(receiver.url, patient=True)
    call = play(server, audio=SENTENCES * 2)  # four sentences: three wait while the first is tried again
    server.wait_for(r"alert webhook http://127\.0\.0\.1:\d+/… failed \(URLError: .*refused.*\): trying again for up "
                    r"to 60 s after each alert")
    server.wait_for(r"alerts=4")
    receiver.start()
    taken = receiver.taken(4)
    assert [alert["line"] for alert in taken] == [f"Line {n}: I want my money back." for n in (1, 2, 3, 4)]
    assert {alert["stream"] for alert in taken} == {call.stream_sid}
    server.wait_for(r"alert webhook http://127\.0\.0\.1:\d+/… takes alerts again, after \d+ s")
    assert "alert dropped" not in server.log()


def test_a_slow_receiver_costs_no_call_anything_and_still_gets_them_in_order(alerting, receivers):
    receiver = receivers(delay=2.0).start()
    server = alerting(receiver.url, patient=True)
    call = play(server)
    summary = server.summary(call.stream_sid)
    assert len(receiver.got) < 2, "the call ended while its alerts were still being sent"
    assert (summary["ended"], summary["alerts"]) == ("stop", "2")
    assert [alert["line"] for alert in receiver.taken(2)] == ["Line 1: I want my money back.",
                                                              "Line 2: I want my money back."]


def test_a_receiver_answering_500_gets_retries_then_each_alert_is_dropped_with_one_warning_and_counted(
        alerting, receivers):
    receiver = receivers(answers=[500] * 1000).start()
    metrics_port = free_port()
    server = alerting(receiver.url, "--metrics-port", str(metrics_port))
    play(server)
    server.wait_for(r"alert webhook http://127\.0\.0\.1:\d+/…: alert dropped \(HTTP 500\): category=refund", count=2,
                    timeout=20)
    attempts = len(receiver.got)
    assert attempts >= 4, "retried with back-off before giving up"
    assert len(re.findall(r"alert dropped", server.log())) == 2 and "failed (HTTP 500)" in server.log()
    _, _, scraped = http_request(metrics_port, "/metrics")
    assert 'mediastreams_alert_webhooks_total{result="dropped"} 2.0' in scraped.decode()
    time.sleep(1)
    assert len(receiver.got) == attempts, "a dropped alert is not tried again"


def test_a_receiver_that_refuses_with_4xx_is_not_asked_again_and_one_500_is_retried(alerting, receivers):
    receiver = receivers(answers=[400, 500]).start()
    floor_port = free_port()
    server = alerting(receiver.url, "--floor-port", str(floor_port))  # a floor of its own, keeping no history
    play(server)
    taken = receiver.taken(1)
    server.wait_for(r"alert dropped \(HTTP 400, refused\)")
    assert [status for *_, status in receiver.got] == [400, 500, 200]
    assert taken[0]["line"] == "Line 2: I want my money back."
    assert taken[0]["link"] == f"http://127.0.0.1:{floor_port}/", "a floor with no history: a link to its page"


def test_without_alerts_or_redis_there_is_nothing_to_send():
    from tests.conftest import run_app
    status, _, stderr = run_app("--port", "0", "--alert-webhook", "https://hooks.example.com/x")
    assert (status, stderr) == (2, "app.py: error: --alert-webhook (ALERT_WEBHOOK) sends alerts: it needs --alerts "
                                   "(ALERTS) here, or --redis-url (REDIS_URL) to send every process's\n")
    status, _, stderr = run_app("--port", "0", "--alert-webhook", "ftp://hooks.example.com/x")
    assert status == 2 and "is not an http:// or https:// URL with a host" in stderr


@pytest.mark.skipif(not REDIS_SERVER, reason="needs Debian's redis-server (apt-get install redis-server; .ci/run "
                                             "installs it)")
def test_with_redis_two_processes_send_each_alert_once_and_one_takes_over_when_the_other_dies(
        alerting, receivers, redis):
    receiver = receivers().start()
    servers = [alerting(receiver.url, "--redis-url", redis.url) for _ in range(2)]
    deadline = time.monotonic() + 10
    while "alert-webhook" not in redis.cli("XINFO", "GROUPS", "mediastreams:events"):
        assert time.monotonic() < deadline, "no sender made the consumer group"
        time.sleep(0.05)
    calls = [play(server, caller=f"+1555000200{n}") for n, server in enumerate(servers)]
    taken = receiver.taken(4)
    time.sleep(1)
    assert len(receiver.got) == 4, "each alert once, however many processes run"
    for call in calls:  # each call's alerts in the order said, each with its own caller
        lines = [(alert["line"], alert["caller"]) for alert in taken if alert["stream"] == call.stream_sid]
        assert [line for line, _ in lines] == ["Line 1: I want my money back.", "Line 2: I want my money back."]
        assert {caller for _, caller in lines} == {call.params["From"]}
    sender, = [server for server in servers if "This process sends the alerts of every process" in server.log()]
    survivor, = [server for server in servers if server is not sender]
    sender.process.send_signal(signal.SIGKILL)
    sender.process.wait()
    call = play(survivor, caller="+15550002009")
    later = receiver.taken(6)[4:]
    assert [(alert["stream"], alert["line"]) for alert in later] == [
        (call.stream_sid, "Line 3: I want my money back."), (call.stream_sid, "Line 4: I want my money back.")]
    survivor.wait_for("This process sends the alerts of every process")


def test_alerts_still_waiting_when_the_server_stops_are_said_not_lost_in_silence(alerting, receivers):
    receiver = receivers()  # never listening
    server = alerting(receiver.url, patient=True)
    play(server)
    server.wait_for(r"alerts=2")
    server.wait_for(r"alert webhook http://127\.0\.0\.1:\d+/… failed")
    server.stop()
    assert re.search(r"alert webhook http://127\.0\.0\.1:\d+/…: 2 alert\(s\) not sent: this process is stopping",
                     server.log())
