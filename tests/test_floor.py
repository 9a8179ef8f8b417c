"""The floor (--floor-port): every live call on one page, one feed (/events, Server-Sent
Events) and one JSON document (/calls), on a listener of its own; private by default."""
import datetime
import json
import re
import subprocess
import wave

import gevent
import pytest

import app
from tests.conftest import (GUNICORN_READY, HTML_FROM, ROOT, Feed, call_on, clean_environment, free_port,
                            gunicorn_command, http_request, run_app)
from tests.twilio_sim import Call

TOKEN = "s3cret-floor-token-0123456789"
FIELDS = {"type", "stream", "call", "server", "time", "id"}


def parsed_time(text):
    assert text.endswith("Z"), text
    return datetime.datetime.fromisoformat(text[:-1] + "+00:00")


# --- In process: the floor as a sink of call events ------------------------------------------

def floor_runtime(limits=app.Limits(), **settings):
    return app.create_runtime(app.Settings(floor_port=1, **{"history": None, **settings}), limits=limits,
                              recognize=lambda pcm: "I want my money back")


def test_a_call_becomes_the_floors_events_and_its_page_state(tmp_path):
    serving = floor_runtime(transcribe=True)
    floor = serving.floor
    call = Call(params={"From": HTML_FROM})
    with wave.open(str(ROOT / "tests" / "speech" / "two_sentences.wav"), "rb") as speech:
        audio = app.pcm16_to_ulaw(speech.readframes(speech.getnframes()))
    call_on(serving, [*call.session(audio={"inbound": audio}), call.dtmf("4"), call.stop()])
    records = list(floor.events)
    assert [r["id"] for r in records] == list(range(1, len(records) + 1))
    assert all(FIELDS <= set(r) for r in records) and all(r["stream"] == call.stream_sid for r in records)
    assert all(r["call"] == call.call_sid and r["server"] == floor.server for r in records)
    times = [parsed_time(r["time"]) for r in records]
    assert times == sorted(times)
    kinds = [r["type"] for r in records]
    assert kinds[0] == "start" and kinds[-1] == "end" and {"dtmf", "stop"} <= set(kinds)  # the last words may follow stop
    start = records[0]
    assert start["parameters"] == {"From": HTML_FROM} and start["tracks"] == ["inbound"]
    transcripts = [r for r in records if r["type"] == "transcript"]
    assert len(transcripts) == 2 and all(r["track"] == "inbound" and r["text"] == "I want my money back"
                                         for r in transcripts)
    assert 0 < transcripts[0]["offset"] < transcripts[1]["offset"]
    end = records[-1]
    assert (end["ended"], end["media"], end["transcript"]) == ("stop", str(-(-len(audio) // 160)), "2")
    snapshot = floor.snapshot()
    assert snapshot["open"] == [] and len(snapshot["ended"]) == 1
    shown = snapshot["ended"][0]
    assert (shown["from"], shown["words"], shown["ended"]["how"]) == (HTML_FROM, "I want my money back", "stop")
    assert sorted(line["type"] for line in shown["lines"]) == ["dtmf", "stop", "transcript", "transcript"]
    json.dumps(snapshot)  # one JSON document, as /calls serves it


def test_levels_show_while_a_call_is_open_and_it_is_listed_from_its_start():
    serving = floor_runtime()
    call = Call()
    stream = app.MediaStream(serving, remote="test")
    for message in call.session(media=3):
        stream.handle(message)
    assert serving.floor.snapshot()["open"][0]["stream"] == call.stream_sid
    stream.emit(app.Level, track="inbound", mean_square=32768 ** 2 / 2)
    assert serving.floor.calls[call.stream_sid]["levels"] == {"inbound": -3.0}
    stream.handle(call.stop())
    stream.finish()
    assert serving.floor.snapshot()["open"] == [] and serving.floor.calls[call.stream_sid]["levels"] == {}


def test_a_client_resumes_from_its_last_event_id_while_the_floor_still_holds_what_followed():
    floor = app.Floor("test", app.Limits(floor_events_kept=5))
    for n in range(8):
        floor.publish({"type": "dtmf", "stream": "MZ1", "call": "CA1", "server": "test", "time": app.utc_now(),
                       "digit": str(n)})
    assert [r["id"] for r in floor.since(5)] == [6, 7, 8] and floor.since(8) == []
    assert floor.since(2) is None, "3 is no longer held: start again from a snapshot"
    assert floor.since(9) is None, "an id from another run"


def test_the_events_kept_for_feeds_that_resume_are_bounded_in_size_whatever_they_hold():
    """The feed kept its latest 10,000 events whatever their size: short calls whose starts carry
    100 long parameters each held about 75 MB after 3,000 calls. Now also at most
    Limits.floor_events_bytes of their JSON, the oldest going first."""
    floor = app.Floor("test", app.Limits(floor_events_bytes=100_000))
    parameters = {f"name{n:03d}" + "x" * 96: "v" * 40 for n in range(app.START_PARAMETERS)}
    for n in range(50):
        for kind, fields in (("start", {"tracks": ["inbound"], "parameters": parameters, "format": "x"}),
                             ("end", {"ended": "stop"})):
            floor.publish({"type": kind, "stream": f"MZ{n}", "call": "CA1", "server": "test", "time": app.utc_now(),
                           **fields})
    kept = list(floor.events)
    assert sum(len(app.json_dumps(record)) for record in kept) <= 100_000 < 50 * len(app.json_dumps(kept[-2]))
    assert [record["id"] for record in kept] == list(range(101 - len(kept), 101)) and len(kept) >= 6
    assert floor.since(98) == kept[-2:] and floor.since(1) is None, "what is no longer kept: a snapshot again"

def test_ended_calls_are_listed_for_a_while_then_forgotten():
    serving = floor_runtime(limits=app.Limits(floor_ended_kept=2))
    calls = [Call() for _ in range(3)]
    for call in calls:
        call_on(serving, call.session(media=1, stop=True))
    assert [c["stream"] for c in serving.floor.snapshot()["ended"]] == [calls[2].stream_sid, calls[1].stream_sid]


def test_what_a_client_sends_is_kept_within_bounds_and_what_was_said_outlives_its_key_presses():
    """A start with 4,000 parameters and a call of 500 key presses held the floor's memory
    and each snapshot at the client's will (issue 37: 250 such calls, /calls 28 MB)."""
    serving = floor_runtime()
    call = Call(params={f"p{n}": "v" * 30 for n in range(4000)})
    stream = call_on(serving, [*call.session(media=1), *(call.dtmf(str(n % 10)) for n in range(500)), call.stop()])
    assert len(stream.parameters) == app.START_PARAMETERS == 100 and list(stream.parameters)[-1] == "p99"
    kept = serving.floor.calls[call.stream_sid]
    assert len(kept["parameters"]) == 100
    floor = serving.floor
    for n in range(3):
        floor.publish({"type": "transcript", "stream": call.stream_sid, "call": "CA1", "server": "test", "time": "",
                       "track": "inbound", "offset": n, "text": f"line {n}", "partial": False})
        for _ in range(200):
            floor.publish({"type": "dtmf", "stream": call.stream_sid, "call": "CA1", "server": "test", "time": "",
                           "digit": "1"})
    lines = kept["lines"]
    assert [line["text"] for line in lines if line["type"] == "transcript"] == ["line 0", "line 1", "line 2"]
    assert sum(line["type"] != "transcript" for line in lines) == app.FLOOR_CALL_OTHER_LINES


def test_a_snapshot_of_many_calls_is_serialized_a_few_calls_at_a_time_letting_the_calls_go_on():
    floor = app.Floor("test")
    for n in range(120):
        floor.publish({"type": "start", "stream": f"MZ{n}", "call": f"CA{n}", "server": "test", "time": f"{n:05}",
                       "tracks": ["inbound"], "parameters": {"From": f"+1555{n:07}"}})
    ticks = []
    ticker = gevent.spawn(lambda: [(ticks.append(1), gevent.sleep(0)) for _ in iter(int, 1)])
    gevent.sleep(0)
    ticks.clear()
    snapshot = floor.snapshot()
    body = b"".join(app.snapshot_pieces(snapshot))  # read without a pause of the test's own
    ticker.kill()
    assert json.loads(body) == json.loads(app.json_dumps(snapshot))
    assert len(ticks) >= 120 // app.SNAPSHOT_CALLS_AT_ONCE, "the event loop ran between the pieces"
    assert json.loads(b"".join(app.snapshot_pieces({"open": [], "ended": []}))) == {"open": [], "ended": []}


def test_a_feed_client_that_does_not_read_is_dropped_and_the_others_are_untouched():
    floor = app.Floor("test", app.Limits(floor_client_queue=10))
    slow, fast = gevent.queue.Queue(), gevent.queue.Queue()
    floor.clients |= {slow, fast}
    for n in range(30):
        floor.publish({"type": "dtmf", "stream": "MZ1", "call": "CA1", "server": "test", "time": "", "digit": "1"})
        while fast.qsize():
            fast.get()
    assert slow not in floor.clients and fast in floor.clients
    assert [slow.get() for _ in range(slow.qsize())][-1] is None, "told to go: it reconnects and resumes"


# --- A real server, a real HTTP client -----------------------------------------------------


@pytest.fixture
def floor_server(start_server):
    port = free_port()
    server = start_server("--floor-port", str(port))
    server.floor_port = port
    return server


def test_a_call_reaches_the_feed_as_it_happens_and_calls_lists_it(floor_server):
    server, port = floor_server, floor_server.floor_port
    feed = Feed(port)
    kind, _, snapshot = feed.wait_for(lambda kind, *_: kind == "snapshot")
    assert snapshot["open"] == [] and snapshot["server"]
    call = Call(params={"From": HTML_FROM, "CallerName": "Ada"})
    client = server.connect()
    client.send_all(call.session(media=60))
    _, _, start = feed.wait_for(lambda kind, _, r: r.get("type") == "start")
    assert start["parameters"] == {"From": HTML_FROM, "CallerName": "Ada"}, "values reach the private floor"
    assert "params=From,CallerName" in server.wait_for(rf"stream={call.stream_sid} start .*").group(0), \
        "the console keeps logging names only"
    assert HTML_FROM not in server.log()
    status, headers, body = http_request(port, "/calls")
    listed = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert [c["from"] for c in listed["open"]] == [HTML_FROM]
    client.send_all([call.dtmf("9"), call.stop()])
    assert client.wait_closed() == 1000
    _, end_id, end = feed.wait_for(lambda kind, _, r: r.get("type") == "end")
    assert (end["ended"], end["media"]) == ("stop", "60")
    kinds = [r["type"] for kind, _, r in feed.events if kind == "message"]
    assert kinds[0] == "start" and kinds[-3:] == ["dtmf", "stop", "end"]
    ids = [event_id for kind, event_id, _ in feed.events if kind == "message"]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    feed.close()

    resumed = Feed(port, **{"Last-Event-ID": str(start["id"])})
    resumed.wait_for(lambda kind, event_id, r: event_id == end_id)
    assert [event_id for _, event_id, _ in resumed.events] == [i for i in ids if i > start["id"]], \
        "what followed its last event, with no snapshot"
    resumed.close()
    again = Feed(port, **{"Last-Event-ID": "999999"})
    _, _, snapshot = again.wait_for(lambda kind, *_: kind == "snapshot")
    assert [c["ended"]["how"] for c in snapshot["ended"]] == ["stop"], "an unknown id: the snapshot again"
    again.close()
    for bad in ("9" * 5000, "\u00b2", "12abc", "-1"):  # Python's int() refuses 4,301 digits
        status, _, body = http_request(port, "/events", **{"Last-Event-ID": bad})
        assert (status, body) == (400, b"Last-Event-ID: the id of an event this feed sent, a number\n"), bad
    server.wait_for(r"bad floor request remote=127\.0\.0\.1 path=/events status=400 reason=Last-Event-ID 9{10}.* is "
                    r"not an event's id")
    assert "Traceback" not in server.log()


def test_the_page_is_whole_offline_and_sets_what_clients_sent_as_text(floor_server):
    status, headers, body = http_request(floor_server.floor_port, "/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "'unsafe-inline'" not in \
        policy.split("script-src")[1]
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "nothing fetched from elsewhere"
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "document.write" not in page
    assert "textContent" in page and 'new EventSource("events")' in page
    assert http_request(floor_server.floor_port, "/nothing")[0] == 404


def test_with_a_token_every_request_needs_it_and_a_browser_keeps_it_in_a_cookie(start_server):
    port = free_port()
    server = start_server("--floor-port", str(port), "--floor-host", "0.0.0.0", env={"FLOOR_TOKEN": TOKEN})
    for path in ("/", "/events", "/calls"):
        assert http_request(port, path)[0] == 401
        assert http_request(port, path, Authorization="Bearer wrong-token-wrong-token")[0] == 401
    assert http_request(port, "/calls", Authorization=f"Bearer {TOKEN}")[0] == 200
    status, headers, _ = http_request(port, f"/?token={TOKEN}")
    assert status == 303 and headers["Location"] == "/" and "HttpOnly" in headers["Set-Cookie"], \
        "a page opened with ?token= is opened again without it, the cookie set"
    cookie = headers["Set-Cookie"].split(";")[0]
    assert http_request(port, "/", Cookie=cookie)[0] == 200
    assert http_request(port, "/calls", Cookie=cookie)[0] == 200
    assert http_request(port, "/calls", Cookie="floor_token=nope")[0] == 401
    assert TOKEN not in server.log()


def test_every_answer_of_the_floor_says_what_it_said_before_its_routes_were_flask(start_server):
    """The token first, then the method (GET and HEAD only: 405 with Allow: GET), then the path
    (404 with the routes it has); no-store and nosniff on every answer, a cookie only once allowed."""
    port = free_port()
    start_server("--floor-port", str(port), "--floor-host", "0.0.0.0", env={"FLOOR_TOKEN": TOKEN})
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    answers = {
        ("GET", "/calls", False): (401, "text/plain; charset=utf-8", b"the floor needs its token (FLOOR_TOKEN): "
                                   b"Authorization: Bearer <token>, or ?token=\n"),
        ("POST", "/nothing", False): (401, "text/plain; charset=utf-8", None),
        ("POST", "/calls", True): (405, None, b""), ("OPTIONS", "/", True): (405, None, b""),
        ("DELETE", "/nothing", True): (405, None, b""),
        ("GET", "/nothing", True): (404, "text/plain", b"not found: the floor serves /, /events and /calls\n"),
        ("GET", "/calls/", True): (404, "text/plain", None), ("GET", "/calls", True): (200, "application/json", None),
        ("HEAD", "/", True): (200, "text/html; charset=utf-8", b""), ("GET", "/", True): (200, "text/html; charset=utf-8", None)}
    for (method, path, with_token), (status, kind, body) in answers.items():
        got, headers, got_body = http_request(port, path, method, **(bearer if with_token else {}))
        assert got == status, (method, path)
        assert (headers["Cache-Control"], headers["X-Content-Type-Options"]) == ("no-store", "nosniff"), (method, path)
        assert kind is None or headers["Content-Type"] == kind, (method, path)
        assert body is None or got_body == body, (method, path)
        assert ("Allow" in headers) == (status == 405) and headers.get("Allow", "GET") == "GET"
        assert ("WWW-Authenticate" in headers) == (status == 401) and "Set-Cookie" not in headers
    status, headers, _ = http_request(port, f"/calls?token={TOKEN}")
    assert status == 200 and headers["Set-Cookie"] == f"floor_token={TOKEN}; HttpOnly; SameSite=Strict; Path=/"
    assert "Set-Cookie" not in http_request(port, "/calls?token=wrong-token-wrong-token")[1]


@pytest.mark.parametrize("args, env, says", [
    (["--floor-host", "0.0.0.0"], {}, "anywhere but 127.0.0.1 it needs FLOOR_TOKEN"),
    ([], {"FLOOR_TOKEN": "short"}, "FLOOR_TOKEN: at least 16"),
    ([], {"FLOOR_TOKEN": "a token; with spaces"}, "FLOOR_TOKEN: at least 16"),
])
def test_a_floor_that_would_show_calls_to_anyone_is_refused_at_start_up(args, env, says):
    code, _, err = run_app("--port", "0", "--floor-port", str(free_port()), *args, env=env)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1


def test_the_floor_port_taken_is_one_line(floor_server):
    code, _, err = run_app("--port", "0", "--floor-port", str(floor_server.floor_port))
    assert code == 2 and "--floor-port (FLOOR_PORT): cannot listen" in err


def test_several_gunicorn_workers_refuse_the_floor_in_one_line():
    env = clean_environment({"FLOOR_PORT": str(free_port())})
    out = subprocess.run(gunicorn_command("-w", "2", "-b", f"127.0.0.1:{free_port()}"), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "--floor-port (FLOOR_PORT) with 2 workers" in out.stderr


# --- The page in a real browser: Debian's Chromium, through selenium and Debian's driver -----


def test_the_page_shows_each_call_live_its_words_as_text_and_ends_it(floor_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from selenium.common.exceptions import StaleElementReferenceException
    server = floor_server
    wait = WebDriverWait(browser, 10, ignored_exceptions=(StaleElementReferenceException,))  # rows are redrawn
    browser.get(f"http://127.0.0.1:{server.floor_port}/")
    wait.until(lambda b: b.find_element(By.ID, "count").text == "0 live")
    call, other = Call(params={"From": HTML_FROM}), Call(params={"From": "+15550002"})
    client, other_client = server.connect(), server.connect()
    client.send_all(call.session(media=60))
    other_client.send_all(other.session(media=5))
    wait.until(lambda b: b.find_element(By.ID, "count").text == "2 live")
    callers = wait.until(lambda b: sorted(cell.text for cell in b.find_elements(By.CSS_SELECTOR, "#calls .who")))
    assert callers == sorted([HTML_FROM, "+15550002"]), "the caller's number as text"
    assert browser.find_elements(By.CSS_SELECTOR, "#calls img, #detail img") == [], "never markup"
    timestamps = iter(range(1220, 60_000, 20))

    def level_shown(b):  # a level line comes once a second while audio flows: keep it flowing till then
        client.send(call.media("inbound", b"\x10" * 160, next(timestamps)))
        return b.find_elements(By.CSS_SELECTOR, "#calls tr.open .level .fill")

    wait.until(level_shown)
    def clicked(b):
        row, = [row for row in b.find_elements(By.CSS_SELECTOR, "#calls tr")
                if row.find_element(By.CLASS_NAME, "who").text == HTML_FROM]
        row.click()
        return HTML_FROM in b.find_element(By.ID, "detail").text

    wait.until(clicked)
    client.send_all([call.dtmf("7"), call.stop()])
    assert client.wait_closed() == 1000
    wait.until(lambda b: b.find_element(By.ID, "count").text == "1 live")
    wait.until(lambda b: "pressed 7" in b.find_element(By.ID, "detail").text)
    detail = browser.find_element(By.ID, "detail").text
    assert HTML_FROM in detail and "ended stop" in detail and "media" in detail
    ended = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#calls tr.ended").text)
    assert ended.startswith(HTML_FROM) and "ended stop" in ended
    assert browser.get_log("browser") == [], "no script error, nothing the policy refused"
    other_client.send_all([other.stop()])


def test_a_page_opened_with_its_token_shows_calls_and_the_address_bar_no_longer_holds_it(start_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    port = free_port()
    server = start_server("--floor-port", str(port), env={"FLOOR_TOKEN": TOKEN})
    wait = WebDriverWait(browser, 10)
    browser.get(f"http://127.0.0.1:{port}/?token={TOKEN}")
    wait.until(lambda b: b.find_element(By.ID, "count").text == "0 live")
    assert browser.current_url == f"http://127.0.0.1:{port}/"
    assert TOKEN not in browser.execute_script("return location.href + document.referrer")
    client, call = server.connect(), Call(params={"From": "+15550021"})
    client.send_all(call.session(media=2))
    wait.until(lambda b: b.find_element(By.ID, "count").text == "1 live"), "the feed comes with the cookie alone"
    client.send_all([call.stop()])
    assert client.wait_closed() == 1000
    assert browser.get_log("browser") == []


def test_the_page_lists_open_calls_newest_first_then_ended_ones_the_last_to_end_first(floor_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from selenium.common.exceptions import StaleElementReferenceException
    server = floor_server
    wait = WebDriverWait(browser, 10, ignored_exceptions=(StaleElementReferenceException,))
    browser.get(f"http://127.0.0.1:{server.floor_port}/")
    wait.until(lambda b: b.find_element(By.ID, "count").text == "0 live")
    calls = {name: Call(params={"From": name}) for name in ("+15550011", "+15550012", "+15550013")}
    clients = {}
    for name, call in calls.items():  # one after another: each is the newest when it starts
        clients[name] = server.connect()
        clients[name].send_all(call.session(media=2))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#calls tr")) == len(clients))

    def rows(b):
        return [(row.find_element(By.CLASS_NAME, "who").text, row.get_attribute("class").split()[0])
                for row in b.find_elements(By.CSS_SELECTOR, "#calls tr")]

    def end(name):
        clients[name].send_all([calls[name].stop()])
        assert clients[name].wait_closed() == 1000

    assert rows(browser) == [("+15550013", "open"), ("+15550012", "open"), ("+15550011", "open")]
    end("+15550012")
    wait.until(lambda b: b.find_element(By.ID, "count").text == "2 live")
    wanted = [("+15550013", "open"), ("+15550011", "open"), ("+15550012", "ended")]
    wait.until(lambda b: rows(b) == wanted)
    end("+15550013")
    wanted = [("+15550011", "open"), ("+15550013", "ended"), ("+15550012", "ended")]
    wait.until(lambda b: rows(b) == wanted)
    browser.refresh()  # the same order from the snapshot
    wait.until(lambda b: b.find_element(By.ID, "count").text == "1 live")
    assert rows(browser) == wanted
    end("+15550011")
    wait.until(lambda b: rows(b) == [("+15550011", "ended"), ("+15550013", "ended"), ("+15550012", "ended")])
    assert browser.get_log("browser") == []


def test_one_gunicorn_worker_serves_the_floor_of_its_calls(start_server):
    port = free_port()
    server = start_server(command=gunicorn_command("-w", "1"), ready=GUNICORN_READY, env={"FLOOR_PORT": str(port)})
    server.wait_for(r"The floor at http://127.0.0.1:\d+/")
    call = Call(params={"From": "+15550003"})
    assert server.stream(call.session(media=3, stop=True)) == 1000
    server.summary(call.stream_sid)
    ended = json.loads(http_request(port, "/calls")[2])["ended"]
    assert [(c["from"], c["ended"]["how"]) for c in ended] == [("+15550003", "stop")]


def test_an_event_made_while_a_feed_sends_its_snapshot_follows_it():
    floor = app.Floor("test")
    feed = app.floor_feed(floor, None)
    pieces = [next(feed)]  # the snapshot's first piece: the rest comes a few calls at a time
    assert pieces[0].startswith(b"id: 0\nevent: snapshot\n")
    floor.publish({"type": "dtmf", "stream": "MZ1", "call": "CA1", "server": "test", "time": "", "digit": "1"})
    while not pieces[-1].endswith(b"\n\n"):
        pieces.append(next(feed))
    assert json.loads(b"".join(pieces).partition(b"data: ")[2])["open"] == [], "taken before the event, not twice"
    assert next(feed).startswith(b"id: 1\ndata: "), "not skipped as if the snapshot had it"
    feed.close()
    assert floor.clients == set()
