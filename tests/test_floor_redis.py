"""--redis-url: every process's calls on one floor, through a real Redis (Debian's
redis-server, started here on a free port). Calls never wait for it: Redis killed mid-call
costs a call nothing, and the floor catches up when it is back."""
import json
import re
import socket
import subprocess
import sys
import time
import wave

import gevent
import pytest

import app
from tests.conftest import (REDIS_SERVER, Feed, GUNICORN_READY, HTML_FROM, ROOT, Redis, call_on, clean_environment,
                            free_port, gunicorn_command, http_request, make_certificate, run_app, whisper_model)
from tests.twilio_sim import Call

LISTENING_FLOOR = r"The floor at http://127.0.0.1:(\d+)/"
WHEN = "2026-12-06T10:00:00.000Z"  # an event's time, as the floor's records carry it
pytestmark = pytest.mark.skipif(not REDIS_SERVER, reason="needs Debian's redis-server (apt-get install "
                                "redis-server; .ci/run installs it)")


def floor_only(start_server, url, *args, **options):
    floor = start_server("--floor-only", "--floor-port", str(free_port()), "--redis-url", url, *args,
                         ready=LISTENING_FLOOR, **options)
    floor.floor_port = floor.port
    return floor


def calls_of(floor_port):
    return json.loads(http_request(floor_port, "/calls")[2])


def wait_until(predicate, timeout=10):
    """predicate()'s first true value, looked at every 50 ms; a floor of this process runs meanwhile."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "not in time"
        gevent.sleep(0.05)
    return value


def refused(redis) -> int:
    """The commands Redis has refused for want of memory."""
    stats = redis.cli("INFO", "errorstats")
    return int(stats.split("errorstat_OOM:count=")[1].split()[0]) if "errorstat_OOM:" in stats else 0


def speech():
    with wave.open(str(ROOT / "tests" / "speech" / "two_sentences.wav"), "rb") as recording:
        return app.pcm16_to_ulaw(recording.readframes(recording.getnframes()))


def test_calls_into_two_servers_appear_on_one_floor_with_their_words_and_end_there(start_server, redis, browser):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    floor = floor_only(start_server, redis.url)
    talking = start_server("--redis-url", redis.url, "--transcribe", "--transcribe-model", whisper_model())
    listening = start_server(env={"REDIS_URL": redis.url})
    browser.get(f"http://127.0.0.1:{floor.floor_port}/")
    wait = WebDriverWait(browser, 20, ignored_exceptions=(StaleElementReferenceException,))
    wait.until(lambda b: b.find_element(By.ID, "count").text == "0 live")

    said, other = Call(params={"From": HTML_FROM}), Call(params={"From": "+15550001"})
    talker, other_client = talking.connect(), listening.connect()
    talker.send_all(said.session(audio={"inbound": speech()}))
    other_client.send_all(other.session(media=5))
    wait.until(lambda b: b.find_element(By.ID, "count").text == "2 live")
    callers = sorted(cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#calls .who"))
    assert callers == sorted([HTML_FROM, "+15550001"]) and browser.find_elements(By.CSS_SELECTOR, "img") == []
    wait.until(lambda b: any("background" in cell.text.lower()  # the latest words: the second sentence
                             for cell in b.find_elements(By.CSS_SELECTOR, "#calls .words")))
    servers = {call["server"] for call in calls_of(floor.floor_port)["open"]}
    assert len(servers) == 2 and floor.log().count("Only the floor") == 1, "two processes, one floor"

    talker.send_all([said.stop()])
    assert talker.wait_closed() == 1000
    wait.until(lambda b: b.find_element(By.ID, "count").text == "1 live")
    ended = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#calls tr.ended").text)
    assert ended.startswith(HTML_FROM) and "ended stop" in ended
    assert browser.get_log("browser") == []
    other_client.send_all([other.stop()])
    assert other_client.wait_closed() == 1000


def test_the_feed_through_redis_has_every_field_and_resumes_from_its_last_event_id(start_server, redis):
    floor = floor_only(start_server, redis.url)
    server = start_server("--redis-url", redis.url)
    feed = Feed(floor.floor_port)
    feed.wait_for(lambda kind, *_: kind == "snapshot")
    call = Call(params={"From": "+15550002"})
    assert server.stream([*call.session(media=60), call.dtmf("5"), call.stop()]) == 1000
    summary = server.summary(call.stream_sid)
    _, end_id, end = feed.wait_for(lambda kind, _, r: r.get("type") == "end")
    records = [r for kind, _, r in feed.events if kind == "message"]
    assert [r["type"] for r in records][0] == "start" and [r["type"] for r in records][-3:] == ["dtmf", "stop", "end"]
    assert all({"type", "stream", "call", "server", "time", "id"} <= set(r) for r in records)
    assert {r["server"] for r in records} == {records[0]["server"]} != {calls_of(floor.floor_port)["server"]}, \
        "server: the process that held the call, not the floor's"
    assert records[0]["parameters"] == {"From": "+15550002"}
    assert {k: end[k] for k in summary} == summary, "the end event carries the summary's fields"
    feed.close()
    resumed = Feed(floor.floor_port, **{"Last-Event-ID": str(records[0]["id"])})
    resumed.wait_for(lambda kind, event_id, r: event_id == end_id)
    assert [r["type"] for _, _, r in resumed.events][-3:] == ["dtmf", "stop", "end"]
    resumed.close()
    assert int(redis.cli("XLEN", app.REDIS_STREAM)) == len(records)


def test_redis_killed_mid_call_costs_the_call_nothing_and_the_floor_catches_up(start_server, redis, tmp_path):
    floor = floor_only(start_server, redis.url)
    server = start_server("--redis-url", redis.url, "--record", str(tmp_path / "rec"))
    call = Call(params={"From": "+15550003"})
    client = server.connect()
    client.send_all(call.session(media=50))
    wait_until(lambda: calls_of(floor.floor_port)["open"])
    redis.kill()
    floor.wait_for(r"WARNING Redis at .* down .*the floor shows nothing new until it is back")
    for n, timestamp in enumerate(range(1000, 3000, 20)):  # 2 s of audio, as it plays: levels on the way
        client.send(call.media("inbound", bytes([n % 256]) * 160, timestamp))
        time.sleep(0.01)
    server.wait_for(r"WARNING Redis at redis://127.0.0.1:\d+/0 down .*the floor's events wait for it")
    client.send_all([call.dtmf("8"), call.stop()])
    assert client.wait_closed() == 1000
    summary = server.summary(call.stream_sid)
    assert (summary["ended"], summary["media"], summary["gaps"], summary["bad"]) == ("stop", "150", "0", "0")
    with wave.open(str(tmp_path / "rec" / f"{call.stream_sid}_inbound.wav"), "rb") as recording:
        assert recording.getnframes() == 150 * 160, "the recording is whole"
    assert calls_of(floor.floor_port)["ended"] == [], "nothing new on the floor while Redis is down"

    redis.start()
    server.wait_for(r"INFO    Redis at .* is back after \d+ s; 0 event\(s\) dropped while it was down")
    ended = wait_until(lambda: calls_of(floor.floor_port)["ended"])
    assert [(c["from"], c["ended"]["how"], c["ended"]["summary"]["media"]) for c in ended] == \
        [("+15550003", "stop", "150")]
    assert [line["digit"] for line in ended[0]["lines"] if line["type"] == "dtmf"] == ["8"]
    assert server.log().count("WARNING Redis") == 1, "one warning, not one per event or per try"


def test_a_redis_that_refuses_writes_loses_no_event_and_is_said_down_once(start_server, redis):
    floor = floor_only(start_server, redis.url)
    server = start_server("--redis-url", redis.url)
    call = Call(params={"From": "+15550007"})
    client = server.connect()
    client.send_all(call.session(media=5))
    wait_until(lambda: calls_of(floor.floor_port)["open"])
    redis.cli("CONFIG", "SET", "maxmemory", "1")  # out of memory: every write refused, reads still answered
    client.send_all([call.dtmf("5"), call.stop()])
    assert client.wait_closed() == 1000
    server.wait_for(r"WARNING Redis at .* down \(OutOfMemoryError: .*maxmemory.*\): the floor.s events wait for it")
    wait_until(lambda: refused(redis) >= 3)  # several tries, each refused
    assert calls_of(floor.floor_port)["ended"] == []
    redis.cli("CONFIG", "SET", "maxmemory", "0")
    ended = wait_until(lambda: calls_of(floor.floor_port)["ended"])
    assert [line["digit"] for line in ended[0]["lines"] if line["type"] == "dtmf"] == ["5"], "the refused batch, sent again"
    assert ended[0]["ended"]["how"] == "stop"
    server.wait_for(r"INFO    Redis at .* is back after \d+ s; 0 event\(s\) dropped while it was down")
    assert server.log().count("WARNING Redis") == 1, "one warning for the outage, not one per try"


def test_while_redis_is_down_events_beyond_the_queue_are_dropped_counted_and_said_once(caplog):
    serving = app.create_runtime(app.Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", metrics_port=1),
                                 limits=app.Limits(redis_queue=20))
    publisher = serving.publisher
    calls = [Call() for _ in range(30)]
    for call in calls:
        call_on(serving, call.session(media=1, stop=True))  # start, stop, end: 90 events
    wait_until(lambda: any(r.levelname == "WARNING" for r in caplog.records))  # the publisher has tried Redis
    assert len(publisher.queue) == 20 and publisher.dropped == 70
    assert [r["stream"] for r in publisher.queue][-1] == calls[-1].stream_sid, "the newest wait, the oldest go"
    counted = serving.metrics.registry.get_sample_value("mediastreams_floor_events_dropped_total")
    assert counted == 70
    for _ in range(12):  # a level waits only while the queue is less than half full
        publisher(app.Level(1, "test", calls[0].stream_sid, calls[0].call_sid, 90 + _, track="inbound", mean_square=1))
    assert publisher.dropped == 82 and len(publisher.queue) == 20
    assert not any(r["type"] == "level" for r in publisher.queue), "levels go first, before any other event"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "down" in warnings[0] and "trying again" in warnings[0], warnings
    publisher.greenlet.kill()


def test_an_unreachable_redis_is_a_warning_and_calls_are_taken(start_server):
    server = start_server("--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    server.wait_for(r"WARNING Redis at .* down \(ConnectionError: .*\): the floor's events wait for it")
    call = Call()
    assert server.stream(call.session(media=10, stop=True)) == 1000
    assert server.summary(call.stream_sid)["media"] == "10"


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "redis://127.0.0.1:port/0", "redis://[::1/0", "redis://",
                                 "unix://", "127.0.0.1:6379"])
def test_a_bad_redis_url_is_one_line_and_exit_2(url):
    code, _, err = run_app("--port", "0", "--redis-url", url)
    assert code == 2 and err.startswith("app.py: error: --redis-url (REDIS_URL): ") and len(err.splitlines()) == 1


@pytest.mark.parametrize("args, says", [
    (["--floor-only"], "needs --floor-port (FLOOR_PORT) and --redis-url (REDIS_URL)"),
    (["--floor-only", "--floor-port", "5999"], "needs --floor-port (FLOOR_PORT) and --redis-url"),
])
def test_a_floor_only_process_needs_a_floor_and_redis(args, says):
    code, _, err = run_app("--port", "0", *args)
    assert code == 2 and says in err and len(err.splitlines()) == 1


def test_a_floor_only_process_takes_no_calls(start_server, redis):
    port = free_port()
    floor = floor_only(start_server, redis.url, "--port", str(port))
    assert "Listening on" not in floor.log()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


def tls_redis(folder, password):
    """A redis-server with a password, on TLS (its certificate made here) and on plain TCP (for
    redis-cli); and the rediss:// URL of it."""
    cert, key = make_certificate(folder, "redis", "IP:127.0.0.1")
    tls = Redis(folder, "--tls-port", str(tls_port := free_port()), "--tls-cert-file", str(cert),
                "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
                password=password)
    return tls, f"rediss://:{password}@127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"


def test_tls_and_a_password_work_and_the_password_is_never_shown(start_server, tmp_path):
    password = "pa55-word-0123456789"
    tls, url = tls_redis(tmp_path, password)
    try:
        floor = floor_only(start_server, url)
        server = start_server(env={"REDIS_URL": url})
        call = Call(params={"From": "+15550004"})
        assert server.stream(call.session(media=5, stop=True)) == 1000
        ended = wait_until(lambda: calls_of(floor.floor_port)["ended"])
        assert ended[0]["from"] == "+15550004"
        assert password not in server.log() + floor.log() and ":***@127.0.0.1" in server.log()
    finally:
        tls.kill()


def test_several_gunicorn_workers_with_redis_show_every_call_on_one_floor(start_server, redis):
    floor_port = free_port()
    env = {"FLOOR_PORT": str(floor_port), "REDIS_URL": redis.url}
    server = start_server(command=gunicorn_command("-w", "2"), ready=GUNICORN_READY, env=env)
    server.wait_for(r"Booting worker", count=2)
    server.wait_for(r"The floor at http://127.0.0.1:\d+/ \(its feed at /events\), every process's calls from Redis")
    server.wait_for(r"another worker \(or another program\) holds it; this worker tries again every 5 s")
    calls = [Call(params={"From": f"+1555000{n}"}) for n in range(6)]
    clients = [server.connect() for _ in calls]
    for client, call in zip(clients, calls):
        client.send_all(call.session(media=3))
    for client, call in zip(clients, calls):
        client.send_all([call.stop()])
        assert client.wait_closed() == 1000
    ended = wait_until(lambda: len(calls_of(floor_port)["ended"]) == 6 and calls_of(floor_port)["ended"])
    assert sorted(c["from"] for c in ended) == sorted(c.params["From"] for c in calls)


def test_several_gunicorn_workers_without_redis_refuse_the_floor_naming_redis_url():
    env = clean_environment({"FLOOR_PORT": str(free_port())})
    out = subprocess.run(gunicorn_command("-w", "2", "-b", f"127.0.0.1:{free_port()}"), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "REDIS_URL" in out.stderr


def follow(script, redis, until):
    """Run the README's follower until it prints a line with `until`: the lines it printed."""
    follower = subprocess.Popen([sys.executable, str(script)], env=clean_environment({"REDIS_URL": redis.url}),
                                stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or until not in lines[-1]:
            lines.append(follower.stdout.readline())
            assert lines[-1], "it stopped"
        return lines
    finally:
        follower.kill()
        follower.wait()


def test_the_readmes_xreadgroup_example_follows_the_stream_at_least_once(start_server, redis, tmp_path):
    example = re.search(r"```python\n(# follow_calls\.py.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert example, "the README's follow_calls.py"
    script = tmp_path / "follow_calls.py"
    script.write_text(example.group(1))
    server = start_server("--redis-url", redis.url)
    first = Call()
    assert server.stream(first.session(media=3, stop=True)) == 1000
    lines = follow(script, redis, f"{first.stream_sid} end")
    assert lines[0].startswith(f"{first.stream_sid} start"), "from the oldest event kept"
    second = Call()
    assert server.stream(second.session(media=3, stop=True)) == 1000
    lines = follow(script, redis, f"{second.stream_sid} end")
    again = [line for line in lines if first.stream_sid in line]
    assert [line.split() for line in again] in ([], [[first.stream_sid, "end"]]), "the group goes on where it was: at most the last " \
        "one again, if it was not acknowledged when the follower was killed"
    assert lines[len(again)].startswith(f"{second.stream_sid} start")


def test_a_floor_waiting_on_redis_holds_up_nothing_else_in_its_process(redis):
    floor = floor_of(redis.url)
    redis.cli("XADD", app.REDIS_STREAM, "*", "event", json.dumps(  # before the floor starts: it reads it too
        {"type": "dtmf", "stream": "MZ1", "call": "CA1", "server": "other", "time": WHEN, "digit": "3"}))
    follower = gevent.spawn(app.follow_redis, redis.url, floor)  # in XREAD, a second at a time, on gevent's sockets
    ticks = []
    ticker = gevent.spawn(lambda: [(ticks.append(1), gevent.sleep(0.01)) for _ in iter(int, 1)])
    gevent.sleep(2.5)
    assert len(ticks) > 50, "the event loop was held up while the floor waited for Redis"
    redis.cli("XADD", app.REDIS_STREAM, "*", "event", "not json")
    redis.cli("XADD", app.REDIS_STREAM, "*", "event", json.dumps(
        {"type": "dtmf", "stream": "MZ1", "call": "CA1", "server": "other", "time": WHEN, "digit": "4"}))
    wait_until(lambda: len(floor.events) >= 2)
    assert [r["digit"] for r in floor.events] == ["3", "4"], "from the oldest kept; another program's entry skipped"
    gevent.killall([follower, ticker])


def test_the_calls_of_a_killed_process_are_ended_lost_on_the_floor(start_server, redis):
    floor = floor_only(start_server, redis.url, server="silent-after-2-s")
    server = start_server("--redis-url", redis.url)
    call, other = Call(params={"From": "+15550021"}), Call(params={"From": "+15550022"})
    client, other_client = server.connect(), server.connect()
    client.send_all(call.session(media=5))
    other_client.send_all([*other.session(media=5), other.stop()])
    assert other_client.wait_closed() == 1000
    wait_until(lambda: len(calls_of(floor.floor_port)["ended"]) == 1)
    server.process.kill()  # SIGKILL: no summary, no `end`
    ended = wait_until(lambda: len(calls_of(floor.floor_port)["ended"]) == 2 and calls_of(floor.floor_port)["ended"])
    assert [(c["from"], c["ended"]["how"]) for c in ended] == [("+15550021", "lost"), ("+15550022", "stop")]
    assert calls_of(floor.floor_port)["open"] == []


def floor_of(url, limits=app.Limits()):
    """The floor that start-up makes for --floor-only (redis-py on gevent's sockets among it)."""
    return app.create_runtime(app.Settings(redis_url=url, floor_port=1, floor_only=True, history=None),
                              limits=limits).floor


def test_a_lost_call_that_is_heard_again_is_open_again_and_an_outage_loses_no_call(redis):
    floor = floor_of(redis.url, app.Limits(floor_silent_seconds=1))
    start = {"type": "start", "stream": "MZ1", "call": "CA1", "server": "other", "time": WHEN, "tracks": ["inbound"],
             "parameters": {}}
    floor.publish(dict(start))
    floor.heard["MZ1"] -= floor.limits.floor_silent_seconds + 1
    floor.end_silent_calls()
    lost = floor.snapshot()["ended"]
    assert [(c["stream"], c["ended"]["how"]) for c in lost] == [("MZ1", "lost")] and floor.events[-1]["ended"] == "lost"
    floor.publish({"type": "level", "stream": "MZ1", "call": "CA1", "server": "other", "time": WHEN, "track": "inbound",
                   "dbfs": -20.0})
    assert [c["stream"] for c in floor.snapshot()["open"]] == ["MZ1"] and floor.snapshot()["ended"] == []

    follower = gevent.spawn(app.follow_redis, redis.url, floor)
    wait_until(lambda: "cmd=xread" in redis.cli("CLIENT", "LIST"))  # the floor reads, waiting for events
    redis.kill()
    gevent.sleep(2)  # longer than a call may stay silent: but nothing could be heard from anyone
    redis.start()
    wait_until(lambda: floor.heard["MZ1"] > time.monotonic() - 0.5)
    assert floor.calls["MZ1"]["ended"] is None, "Redis was down: its calls are given their time again"
    assert wait_until(lambda: floor.calls["MZ1"]["ended"], timeout=5)["how"] == "lost", "then, still silent, it is lost"
    follower.kill()


def test_a_floor_waiting_on_redis_over_tls_holds_up_nothing_else_in_its_process(tmp_path):
    tls, url = tls_redis(tmp_path, "pa55-word-0123456789")
    floor = floor_of(url)
    follower = gevent.spawn(app.follow_redis, url, floor)  # in XREAD over TLS, on gevent's ssl
    ticks = []
    ticker = gevent.spawn(lambda: [(ticks.append(1), gevent.sleep(0.01)) for _ in iter(int, 1)])
    try:
        gevent.sleep(2.5)
        assert len(ticks) > 50, "the event loop was held up while the floor waited for Redis over TLS"
        tls.cli("XADD", app.REDIS_STREAM, "*", "event", json.dumps(
            {"type": "dtmf", "stream": "MZ1", "call": "CA1", "server": "other", "time": WHEN, "digit": "6"}))
        wait_until(lambda: list(floor.events))
        assert [r["digit"] for r in floor.events] == ["6"]
    finally:
        gevent.killall([follower, ticker])
        tls.kill()


def test_entries_another_program_wrote_wrong_are_skipped_counted_and_the_floor_stays_up(start_server, redis):
    """Every field the floor sorts, shows or keeps is checked: one entry whose `time` was null
    took every /calls and every new page down (a 500 with a traceback) for as long as Redis kept it."""
    good = {"type": "start", "stream": "MZ1", "call": "CA1", "server": "other", "time": WHEN, "tracks": ["inbound"],
            "parameters": {"From": "+15550003001"}}
    bad = [{**good, "stream": "MZ2", "time": None}, {**good, "stream": "MZ3", "time": 5}, {**good, "stream": "MZ4",
           "time": ["x"]}, {**good, "stream": "MZ5", "parameters": ["From"]}, {**good, "stream": 7},
           {"type": "level", "stream": "MZ1", "call": "CA1", "server": "other", "time": WHEN, "track": "inbound",
            "dbfs": "loud"}, {**good, "type": "transcript"}, {**good, "type": "no-such-kind"},
           {**good, "stream": "MZ6", "parameters": {"From": "x" * 70_000}}]
    for record in [good, *bad]:
        redis.cli("XADD", app.REDIS_STREAM, "*", "event", json.dumps(record))
    floor = floor_only(start_server, redis.url)
    floor.wait_for(r"Redis stream mediastreams:events: entry \S+ is not a call event \(or one over 65536 bytes\): "
                   r"skipped, 1 so far")
    status, _, body = http_request(floor.floor_port, "/calls")
    assert status == 200 and [call["stream"] for call in json.loads(body)["open"]] == ["MZ1"]
    assert http_request(floor.floor_port, "/")[0] == 200
    floor.wait_for(r"\d+ more Redis entries that are not call events not shown")
    assert "Traceback" not in floor.log()

