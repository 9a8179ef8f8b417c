"""The call history (--history): every call a floor sees, kept in SQLite, found by what was
said, reviewed with its recording beside its words, and forgotten on purpose. In process on
real SQLite files; then real servers, Debian's redis-server and Chromium."""
import csv
import io
import json
import os
import sqlite3
import time
import wave

import gevent
import pytest

import app
from tests.conftest import (REDIS_SERVER, ROOT, Redis, free_port, http_request, whisper_model)
from tests.twilio_sim import Call, encode_ulaw, read_wav

LISTENING_FLOOR = r"The floor at http://127.0.0.1:(\d+)/"
XSS = '<img src=x onerror="document.title=1">'


def record(kind, sid, n, when="2026-12-06T09:00:00.000Z", **fields):
    return {"type": kind, "stream": sid, "call": "CA" + sid[2:], "server": "elsewhere:1", "time": when,
            "uid": f"elsewhere:1/{sid}/{n}", **fields}


def a_call(sid, caller, said, when="2026-12-06T09:00:00.000Z", alert=None, moods=(), ended="stop"):
    records = [record("start", sid, 0, when, tracks=["inbound"], parameters={"From": caller}, format="audio/x-mulaw/8000/1")]
    for n, text in enumerate(said, 1):
        records.append(record("transcript", sid, n, when, track="inbound", offset=2.0 * n, text=text, partial=False,
                              seconds=1.5, **({"mood": moods[n - 1]} if moods else {})))
    if alert:
        records.append(record("alert", sid, 50, when, track="inbound", category=alert, phrase="money back",
                              text=said[-1]))
    records.append(record("dtmf", sid, 60, when, digit="5"))
    records.append(record("end", sid, 99, when, ended=ended, duration=f"{2.0 * len(said) + 2:.2f}s", media="100"))
    return records


def kept(history):
    deadline = time.monotonic() + 10
    while not history.written.is_set() or history.queue:
        assert time.monotonic() < deadline, "not written in time"
        gevent.sleep(0.05)


@pytest.fixture
def history(tmp_path):
    kept_here = app.History(str(tmp_path / "history.sqlite3"), days=90)
    kept_here.open()
    kept_here.start()
    yield kept_here
    for greenlet in kept_here.greenlets:
        greenlet.kill()


def test_each_event_is_kept_once_however_often_it_is_read_and_what_was_said_is_found(history):
    first = a_call("MZ1", "+15550001", ["The birch canoe slid on the smooth planks.", "Glue the sheet."],
                   when="2026-12-06T08:00:00.000Z", moods=(0.2, 0.1))
    second = a_call("MZ2", "+15550002", ["I want my money back.", "This is the third time I call."],
                    when="2026-12-06T09:00:00.000Z", alert="refund", moods=(-0.6, -0.4))
    for each in [*first, *second, *first, *second]:  # read twice: a Redis outage, a floor restarted
        history.add(dict(each))
    kept(history)
    assert [len(history.call(sid)["lines"]) for sid in ("MZ1", "MZ2")] == [3, 4], "each line once"

    def found(**query):
        return [call["stream"] for call in history.search(app.history_query(query))["calls"]]

    assert found() == ["MZ2", "MZ1"], "newest first"
    assert found(q="canoe") == ["MZ1"] and found(q='"money back"') == ["MZ2"] and found(q="bir*") == ["MZ1"]
    assert found(q='"back money"') == [], "a phrase is its words in their order"
    hit = history.search(app.history_query({"q": "canoe"}))["calls"][0]["hit"]
    assert hit == "The birch \x02canoe\x03 slid on the smooth planks."
    assert found(category="refund") == ["MZ2"] and found(mood_below="-0.5") == ["MZ2"]
    assert found(mood_above="0.15") == ["MZ1"] and found(caller="+15550001") == ["MZ1"]
    assert found(since="2026-12-06T08:30") == ["MZ2"] and found(until="2026-12-06T08:30") == ["MZ1"]
    assert found(ended="stop") == ["MZ2", "MZ1"] and found(min_seconds="100") == []
    call = history.call("MZ2")
    assert (call["caller"], call["ended"], call["duration"], call["alerts"], call["categories"]) == \
        ("+15550002", "stop", 6.0, 1, ["refund"])
    assert call["summary"]["media"] == "100" and [line["kind"] for line in call["lines"]] == [
        "transcript", "transcript", "alert", "dtmf"]
    with pytest.raises(app.HistoryError, match="q: words"):
        history.search(app.history_query({"q": '"unclosed'}))
    with pytest.raises(app.HistoryError, match="mood_below"):
        app.history_query({"mood_below": "a lot"})


def test_calls_older_than_the_history_days_are_forgotten_with_their_files(tmp_path):
    folder = tmp_path / "rec"
    folder.mkdir()
    wav, text = folder / "MZ0_inbound.wav", folder / "MZ0_inbound.txt"
    wav.write_bytes(b"RIFF"), text.write_text("old words\n")
    history = app.History(str(tmp_path / "history.sqlite3"), days=30)
    history.open()
    history.start()
    for each in [*a_call("MZ0", "+1", ["long ago"], when="2020-01-01T00:00:00.000Z"),
                 record("end", "MZ0", 100, "2020-01-01T00:01:00.000Z", ended="stop", recordings=f"{wav}:1.00s"),
                 *a_call("MZ9", "+9", ["just now"])]:
        history.add(each)
    kept(history)
    history.days = 30
    history.greenlets[1].kill()
    history.greenlets[1] = gevent.spawn(history.sweep_forever)  # the sweep at start, again, with the old call in
    deadline = time.monotonic() + 10
    while history.call("MZ0") is not None and time.monotonic() < deadline:
        gevent.sleep(0.05)
    assert history.call("MZ0") is None and history.call("MZ9") is not None
    assert not wav.exists() and not text.exists(), "its recording and transcript file too"


def test_a_locked_database_costs_no_call_and_says_so_once(tmp_path, caplog):
    path = str(tmp_path / "history.sqlite3")
    history = app.History(path, days=90, limits=app.Limits(history_busy_seconds=0.3))
    history.open()
    history.start()
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # another program holds it
    for each in a_call("MZ5", "+5", ["words"]):
        history.add(each)
    deadline = time.monotonic() + 15
    while not history.dropped and time.monotonic() < deadline:
        gevent.sleep(0.1)
    assert history.dropped == 4 and history.failing
    warnings = [r.getMessage() for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(warnings) == 1 and "database is locked" in warnings[0] and "calls go on" in warnings[0]
    locker.execute("ROLLBACK")
    for each in a_call("MZ6", "+6", ["more words"]):
        history.add(each)
    kept(history)
    assert history.call("MZ6") is not None and history.failing is None, "written again once it can be"


def test_the_stereo_recording_is_the_two_tracks_side_by_side_in_any_range(tmp_path):
    paths = []
    for track, value in (("inbound", 1000), ("outbound", -2000)):
        path = tmp_path / f"MZ7_{track}.wav"
        with wave.open(str(path), "wb") as wav:
            wav.setnchannels(1), wav.setsampwidth(2), wav.setframerate(8000)
            wav.writeframes(value.to_bytes(2, "little", signed=True) * (8000 if track == "inbound" else 4000))
        paths.append(str(path))
    frames = 8000
    whole = app.stereo_wav_bytes(paths, frames, 0, 44 + 4 * frames)
    with wave.open(io.BytesIO(whole)) as stereo:
        assert (stereo.getnchannels(), stereo.getframerate(), stereo.getnframes()) == (2, 8000, frames)
        samples = stereo.readframes(frames)
    assert samples[:4] == (1000).to_bytes(2, "little", signed=True) + (-2000).to_bytes(2, "little", signed=True)
    assert samples[-4:] == (1000).to_bytes(2, "little", signed=True) + b"\0\0", "the shorter track: silence after"
    for start, end in ((0, 10), (40, 47), (43, 1000), (101, 103), (44 + 4 * frames - 3, 44 + 4 * frames)):
        assert app.stereo_wav_bytes(paths, frames, start, end) == whole[start:end], (start, end)


# --- Real servers --------------------------------------------------------------------------

def floor_only(start_server, url, history, *args):
    floor = start_server("--floor-only", "--floor-port", str(free_port()), "--redis-url", url, *args,
                         ready=LISTENING_FLOOR, env={"HISTORY": str(history)})
    floor.floor_port = floor.port
    floor.wait_for("The call history in")
    return floor


def history_of(port, **query):
    status, _, body = http_request(port, "/history.json?" + "&".join(f"{k}={v}" for k, v in query.items()))
    assert status == 200, body
    return json.loads(body)["calls"]


def eventually(check, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.1)
    return value


def said(server, call, wav, tracks=("inbound",)):
    audio = encode_ulaw(read_wav(ROOT / "tests" / "speech" / wav))
    assert server.stream([*call.session(audio={track: audio for track in tracks}), call.stop()]) == 1000


@pytest.mark.skipif(not REDIS_SERVER, reason="needs Debian's redis-server (apt-get install redis-server)")
def test_calls_of_two_servers_are_kept_by_every_floor_found_by_their_words_exported_and_deleted_everywhere(
        start_server, tmp_path):
    redis = Redis(tmp_path)
    try:
        record = tmp_path / "shared"  # a folder every server writes to (a shared volume)
        floor = floor_only(start_server, redis.url, tmp_path / "one.sqlite3", "--record", str(record))
        other = floor_only(start_server, redis.url, tmp_path / "two.sqlite3")
        talking = start_server("--redis-url", redis.url, "--transcribe", "--transcribe-model", whisper_model(),
                               "--record", str(record), start_timeout=60)
        listening = start_server("--redis-url", redis.url)  # another process: its calls are kept too
        canoe, money, quiet = Call(params={"From": "=HYPERLINK(\"http://x\")"}), Call(params={"From": XSS}), Call()
        said(talking, canoe, "two_sentences.wav", ("inbound", "outbound"))
        said(talking, money, "money_back.wav")
        assert listening.stream(quiet.session(media=5, stop=True)) == 1000
        for port in (floor.floor_port, other.floor_port):
            eventually(lambda: len(history_of(port)) == 3 and all(c["ended"] for c in history_of(port)))
            assert len({c["server"] for c in history_of(port)}) == 2, "two servers' calls"
            assert [c["stream"] for c in history_of(port, q="canoe")] == [canoe.stream_sid]
            assert [c["stream"] for c in history_of(port, q='"money%20back"')] == [money.stream_sid]
        status, headers, body = http_request(floor.floor_port, "/history.csv?q=canoe")
        rows = list(csv.reader(io.StringIO(body.decode())))
        assert status == 200 and headers["Content-Type"].startswith("text/csv") and len(rows) == 2
        assert rows[1][rows[0].index("caller")] == "'=HYPERLINK(\"http://x\")", "a formula, quoted"
        assert "canoe" in rows[1][rows[0].index("hit")] and "\x02" not in body.decode()
        page = json.loads(http_request(floor.floor_port, f"/history/{canoe.stream_sid}.json")[2])
        assert page["recordings_here"] and len(page["recordings"]) == 2
        assert json.loads(http_request(other.floor_port, f"/history/{money.stream_sid}.json")[2])["caller"] == XSS
        wavs = [path for path in page["recordings"]]
        assert all(os.path.exists(path) for path in wavs)
        status, _, _ = http_request(floor.floor_port, f"/history/{canoe.stream_sid}/delete", "POST")
        assert status == 200
        assert not any(os.path.exists(path) for path in wavs), "its recordings gone"
        for port in (floor.floor_port, other.floor_port):
            eventually(lambda: canoe.stream_sid not in [c["stream"] for c in history_of(port)])
            assert {c["stream"] for c in history_of(port)} == {money.stream_sid, quiet.stream_sid}
            assert history_of(port, q="canoe") == []
            eventually(lambda: canoe.stream_sid not in http_request(port, "/calls")[2].decode())
        entries = redis.cli("XRANGE", app.REDIS_STREAM, "-", "+")
        assert canoe.stream_sid in entries and "canoe" not in entries.lower() and '"delete"' in entries, \
            "the stream's copies of its events gone, the deletion there for floors to come"
    finally:
        redis.kill()


@pytest.mark.skipif(not REDIS_SERVER, reason="needs Debian's redis-server (apt-get install redis-server)")
def test_a_floor_restarted_keeps_everything_and_misses_no_call_that_ended_while_it_was_down(start_server, tmp_path):
    redis = Redis(tmp_path)
    try:
        kept_in = tmp_path / "history.sqlite3"
        floor = floor_only(start_server, redis.url, kept_in)
        server = start_server("--redis-url", redis.url)
        before, during = Call(), Call()
        assert server.stream(before.session(media=10, stop=True)) == 1000
        eventually(lambda: history_of(floor.floor_port))
        floor.stop()
        assert server.stream(during.session(media=12, stop=True)) == 1000  # while no floor reads
        again = floor_only(start_server, redis.url, kept_in)
        calls = eventually(lambda: found if len(found := history_of(again.floor_port)) == 2 else None)
        assert {c["stream"] for c in calls} == {before.stream_sid, during.stream_sid}
        with sqlite3.connect(kept_in) as db:
            assert db.execute("SELECT count(*) FROM lines WHERE kind = 'stop'").fetchone()[0] == 2, "each once"
    finally:
        redis.kill()


def test_a_history_deleted_mid_call_costs_no_call(start_server, tmp_path):
    kept_in = tmp_path / "history.sqlite3"
    floor_port = free_port()
    server = start_server("--floor-port", str(floor_port), env={"HISTORY": str(kept_in)})
    call = Call()
    client = server.connect()
    client.send_all(call.session(media=20))
    server.wait_for(rf"stream={call.stream_sid} first media")
    for path in tmp_path.glob("history.sqlite3*"):
        path.unlink()
    client.send_all([*(call.media("inbound", b"\xff" * 160, 20 * (21 + n)) for n in range(20)), call.stop()])
    assert client.wait_closed() == 1000
    assert server.summary(call.stream_sid)["media"] == "40"
    assert "Traceback" not in server.log()


def test_the_pages_play_a_call_from_a_clicked_line_and_show_what_clients_sent_as_text(start_server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    floor_port = free_port()
    server = start_server("--floor-port", str(floor_port), "--transcribe", "--transcribe-model", whisper_model(),
                          "--record", str(tmp_path / "rec"), env={"HISTORY": str(tmp_path / "history.sqlite3")},
                          start_timeout=60)
    call = Call(params={"From": XSS})
    said(server, call, "two_sentences.wav", ("inbound", "outbound"))
    wait = WebDriverWait(browser, 20)
    eventually(lambda: (found := history_of(floor_port, q="planks")) and found[0]["ended"])
    browser.get(f"http://127.0.0.1:{floor_port}/history?q=planks")
    link = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#calls a"))[0]
    assert link.text == XSS and browser.find_elements(By.CSS_SELECTOR, "img") == [], "text, never markup"
    assert wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#calls mark")).text.lower() == "planks"
    link.click()
    lines = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#conversation li.transcript.inbound"))
    assert len(lines) == 2 and browser.find_elements(By.CSS_SELECTOR, "#plot svg polyline, #plot svg rect")
    audio = browser.find_element(By.ID, "audio")
    wait.until(lambda b: b.execute_script("return arguments[0].readyState >= 1", audio))
    offset = json.loads(http_request(floor_port, f"/history/{call.stream_sid}.json")[2])["lines"]
    second = [line["offset"] for line in offset if line["kind"] == "transcript" and line["track"] == "inbound"][1]
    browser.execute_script("arguments[0].muted = true", audio)
    started = time.monotonic()
    lines[1].click()
    wait.until(lambda b: b.execute_script("return arguments[0].currentTime", audio) >= second)
    seeked = time.monotonic() - started
    assert wait.until(lambda b: "playing" in lines[1].get_attribute("class")), "the line heard is marked"
    assert browser.execute_script("return arguments[0].duration", audio) == pytest.approx(
        len(read_wav(ROOT / "tests" / "speech" / "two_sentences.wav")) / 8000, abs=0.05)
    assert browser.get_log("browser") == []
    print(f"seek to play: {seeked * 1000:.0f} ms")


def test_the_history_is_as_private_as_the_floor(start_server, tmp_path):
    """The floor's token rules on every page, search, export and recording of the history."""
    token = "history-token-0123456789abcdef"
    floor_port = free_port()
    start_server("--floor-port", str(floor_port), "--floor-host", "0.0.0.0",
                 env={"FLOOR_TOKEN": token, "HISTORY": str(tmp_path / "history.sqlite3")})
    for path in ("/history", "/history.json", "/history.csv?q=x", "/history/MZ1", "/history/MZ1.json",
                 "/history/MZ1.wav"):
        assert http_request(floor_port, path)[0] == 401, path
        assert http_request(floor_port, path, Authorization=f"Bearer {token}")[0] in (200, 404), path
    assert http_request(floor_port, "/history/MZ1/delete", "POST")[0] == 401
    assert http_request(floor_port, "/history/MZ1/delete", "POST", Authorization=f"Bearer {token}")[0] == 404
    assert http_request(floor_port, "/history.json", "POST", Authorization=f"Bearer {token}")[0] == 405
    status, headers, _ = http_request(floor_port, "/history", Authorization=f"Bearer {token}")
    assert status == 200 and "script-src 'sha256-" in headers["Content-Security-Policy"]
    status, headers, _ = http_request(floor_port, f"/history?q=card&token={token}&caller=%2B1555")
    assert (status, headers["Location"]) == (303, "/history?q=card&caller=%2B1555") and "HttpOnly" in headers["Set-Cookie"]
    assert http_request(floor_port, f"/history.json?token={token}")[0] == 200, "only a page is opened again"


def test_words_a_caller_said_reach_the_export_as_values_never_formulas(history):
    """A line whose words start as a spreadsheet formula, and markup, exported as what they are."""
    for each in a_call("MZ8", "+8", ["=cmd|' /C calc'!A0 please", f"{XSS} and @SUM(1)"]):
        history.add(each)
    kept(history)
    floor = app.Floor("test", history=history)
    client = app.floor_app(floor, None).test_client()
    for q, cell in (("calc", "'=cmd|' /C calc'!A0 please"), ("SUM", f"{XSS} and @SUM(1)")):
        answer = client.get(f"/history.csv?q={q}")
        rows = list(csv.reader(io.StringIO(answer.get_data(as_text=True))))
        assert answer.status_code == 200 and rows[1][rows[0].index("hit")] == cell
    page = client.get("/history")
    assert "script-src 'sha256-" in page.headers["Content-Security-Policy"] and XSS not in page.get_data(as_text=True)
