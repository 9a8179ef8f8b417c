"""Words that matter. --alerts FILE: categories of phrases; a transcript line that says one
raises an alert (a console line, an `alert` event on the floor, a metric, `alerts=` in the
summary). --mood: each line scored from -1 (fed up) to +1 (pleased). In process, and end
to end from speech made with Debian's flite (tests/speech/), heard by the real Whisper model."""
import json
import re

import pytest

import app
from tests.conftest import ROOT, free_port, http_request, run_app, whisper_model
from tests.twilio_sim import Call, encode_ulaw, read_wav

ALERTS = """# what a call center wants to know about, as it happens
refund: refund, money back, charged twice, chargeback
cancel: cancel, cancel my account, close my account
supervisor: speak to a manager, supervisor
waiting: on hold for 40 minutes, forty-five minutes
"""


@pytest.fixture
def alerts(tmp_path):
    path = tmp_path / "alerts.txt"
    path.write_text(ALERTS)
    return app.Alerts.read(str(path))


@pytest.mark.parametrize("text, said", [
    ("I want my money back.", [("refund", "money back")]),
    ("I WANT MY MONEY-BACK!!!", [("refund", "money back")]),           # case, hyphens, punctuation
    ("money, back", [("refund", "money back")]),                      # punctuation is a space
    ("I was refunded already", []),                                   # whole words: not "refund"
    ("moneyback", []),
    ("I've been on hold for forty minutes", [("waiting", "on hold for 40 minutes")]),  # spelled, or ...
    ("on hold for 40 minutes", [("waiting", "on hold for 40 minutes")]),               # ... in digits
    ("it's been 45 minutes", [("waiting", "forty-five minutes")]),
    ("Cancel my account, and I want a refund.", [("refund", "refund"), ("cancel", "cancel my account")]),
    ("Let me speak to a manager, or a supervisor", [("supervisor", "speak to a manager")]),  # one per category
    ("please don't cancel", [("cancel", "cancel")]),
    ("I'll ask for a charge-back", [("refund", "chargeback")]),          # a compound heard as two words
    ("I'll ask for a charge back", [("refund", "chargeback")]),
    ("", []),
])
def test_a_phrase_is_found_whatever_the_case_punctuation_and_way_of_writing_numbers(alerts, text, said):
    assert alerts.said(text) == said


def test_numbers_said_in_words_are_matched_as_digits():
    assert app.matchable("forty two, one two three, two hundred and one, $1,000") == " 42 1 2 3 200 and 1 1000 "
    assert app.matchable("Twenty-one; ninety nine; a hundred") == " 21 99 a hundred "


@pytest.mark.parametrize("text, says", [
    ("refund money back\n", "line 1, 'refund money back': no `:` after a category"),
    ("# fine\n\nrefund: refund\ncancel: cancel, , close\n", "line 4, 'cancel: cancel, , close': a phrase with no word"),
    ("refund: refund\nrefund: money back\n", "line 2, 'refund: money back': `refund` is on an earlier line too"),
    ("money back please: refund\n", "line 1, 'money back please: refund': the category is not one word"),
    (b"refund: \xff\n", "is not a file it can read"),
])
def test_a_file_that_cannot_work_is_one_line_naming_the_file_and_its_line_and_exit_2(tmp_path, text, says):
    path = tmp_path / "alerts.txt"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, _, err = run_app("--transcribe", "--transcribe-model", whisper_model(), "--alerts", str(path))
    assert code == 2 and says in err and f"--alerts (ALERTS): '{path}' is not" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_alerts_without_transcripts_or_a_file_are_refused_in_one_line(tmp_path):
    code, _, err = run_app("--alerts", str(tmp_path / "missing.txt"), "--transcribe")
    assert code == 2 and "is not a file it can read (No such file or directory)" in err
    (tmp_path / "alerts.txt").write_text(ALERTS)
    code, _, err = run_app("--alerts", str(tmp_path / "alerts.txt"))
    assert code == 2 and "--alerts (ALERTS) reads what is said: it needs --transcribe (TRANSCRIBE=1)" in err


def test_a_caller_asking_for_their_money_back_raises_a_refund_alert_everywhere(start_server, tmp_path):
    (tmp_path / "alerts.txt").write_text(ALERTS)
    metrics_port, floor_port = free_port(), free_port()
    server = start_server("--transcribe", "--transcribe-model", whisper_model(), "--alerts", str(tmp_path / "alerts.txt"),
                          "--metrics-port", str(metrics_port), "--floor-port", str(floor_port), start_timeout=60)
    call, quiet = Call(params={"From": "+15550031"}), Call(params={"From": "+15550032"})
    speech = encode_ulaw(read_wav(ROOT / "tests" / "speech" / "money_back.wav"))  # flite: "I want my money back."
    quiet_client = server.connect()
    quiet_client.send_all(quiet.session(media=5))
    assert server.stream([*call.session(audio={"inbound": speech}), call.stop()]) == 1000
    line = server.wait_for(rf'stream={call.stream_sid} alert track=inbound category=refund phrase="money back" '
                           r'text="(.*)"')
    assert "money back" in line.group(1).lower()
    summary = server.summary(call.stream_sid)
    assert (summary["transcript"], summary["alerts"]) == ("1", "1")
    scraped = http_request(metrics_port, "/metrics")[2].decode()
    assert re.search(r'^mediastreams_alerts_total\{category="refund"\} 1\.0$', scraped, re.MULTILINE), scraped
    ended = json.loads(http_request(floor_port, "/calls")[2])["ended"]
    alert, = [r for r in ended[0]["lines"] if r["type"] == "alert"]
    assert (alert["track"], alert["category"], alert["phrase"]) == ("inbound", "refund", "money back")
    assert ended[0]["alerts"] == 1
    quiet_client.send_all([quiet.stop()])
    assert quiet_client.wait_closed() == 1000
    assert server.summary(quiet.stream_sid)["alerts"] == "0"


def test_on_the_floor_calls_with_alerts_come_first():
    floor = app.Floor("test")
    for n in (1, 2, 3):
        floor.publish({"type": "start", "stream": f"MZ{n}", "call": f"CA{n}", "server": "test",
                       "time": f"2026-12-03T07:00:0{n}.000Z", "tracks": ["inbound"], "parameters": {}})
    floor.publish({"type": "alert", "stream": "MZ1", "call": "CA1", "server": "test", "time": "", "track": "inbound",
                   "category": "refund", "phrase": "money back", "text": "I want my money back"})
    assert [c["stream"] for c in floor.snapshot()["open"]] == ["MZ1", "MZ3", "MZ2"]


pytest.importorskip("vaderSentiment", reason="pip install -r tests/requirements.txt")


@pytest.mark.parametrize("text, low, high", [
    # what VADER alone gets wrong on calls (0.0, +0.42, -0.13), and what it gets right
    ("I have been on hold for 40 minutes and nobody can tell me anything", -1, -0.3),
    ("I would like to cancel my account, please", -1, -0.2),
    ("I was charged twice and I want a refund", -1, -0.3),
    ("This is the third time I am calling, still not fixed", -1, -0.2),
    ("Let me speak to a manager", -1, -0.2),
    ("My account number is 45678.", -0.05, 0.05),                     # answers and requests weigh nothing
    ("Yes, can you help me with my bill please?", -0.05, 0.05),
    ("Thank you so much, that fixed it", 0.3, 1),
    ("Great, it works now", 0.3, 1),
])
def test_a_lines_mood_counts_what_calls_say(text, low, high):
    assert low <= app.Mood()(text) <= high


def test_the_rules_are_a_table_a_reader_extends(monkeypatch):
    line = "my parcel went back to the depot"
    assert app.Mood()(line) == 0
    monkeypatch.setitem(app.MOOD_RULES, "back to the depot", -3.0)
    assert app.Mood()(line) < -0.5


def test_mood_without_vader_installed_is_one_line_naming_the_pip_command():
    status, _, err = run_app(code="import runpy, sys; sys.modules['vaderSentiment'] = None; sys.argv = ['app.py', "
                                  f"'--transcribe', '--transcribe-model', {whisper_model()!r}, '--mood']; "
                                  "runpy.run_path('app.py', run_name='__main__')")
    assert (status, err) == (2, "app.py: error: --mood (MOOD) needs VADER's lexicon: pip install vaderSentiment==3.3.2\n")
    status, _, err = run_app("--mood")
    assert status == 2 and "--mood (MOOD) reads what is said: it needs --transcribe (TRANSCRIBE=1)" in err


def test_an_angry_and_a_pleased_caller_have_their_mood_on_each_line_in_the_summary_and_on_the_floor(start_server):
    floor_port = free_port()
    server = start_server("--transcribe", "--transcribe-model", whisper_model(), "--mood", "--floor-port", str(floor_port),
                          start_timeout=60)
    moods = {}
    for name in ("angry", "pleased"):  # flite: "I have been on hold for forty minutes and nobody can tell me
        call = Call()                  # anything." / "Thank you so much, that fixed it. You have been really helpful."
        speech = encode_ulaw(read_wav(ROOT / "tests" / "speech" / f"{name}.wav"))
        assert server.stream([*call.session(audio={"inbound": speech}), call.stop()]) == 1000
        summary = server.summary(call.stream_sid)
        lines = re.findall(rf'stream={call.stream_sid} transcript track=inbound at=[\d.]+s text="[^"]*" '
                           r"mood=(-?\d\.\d\d)$", server.log(), re.MULTILINE)
        assert lines and float(summary["mood_inbound"]) == pytest.approx(sum(map(float, lines)) / len(lines), abs=0.01)
        moods[name] = float(summary["mood_inbound"])
        shown = [c for c in json.loads(http_request(floor_port, "/calls")[2])["ended"] if c["stream"] == call.stream_sid][0]
        assert shown["moods"]["inbound"] == [float(m) for m in lines]
        assert [r["mood"] for r in shown["lines"] if r["type"] == "transcript"] == [float(m) for m in lines]
    assert moods["angry"] < -0.3 and moods["pleased"] > 0.3, moods
