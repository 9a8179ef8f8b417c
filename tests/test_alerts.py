"""--alerts FILE: categories of phrases that matter; a transcript line that says one raises
an alert (a console line, an `alert` event on the floor, a metric, `alerts=` in the
summary). Matching in process; end to end from speech made with Debian's flite
(tests/speech/money_back.wav), heard by the real Whisper model."""
import json
import re

import pytest

import app
from tests.conftest import ROOT, free_port
from tests.test_floor import get
from tests.test_settings import run_app
from tests.test_transcribe import MODEL
from tests.twilio_sim import Call, encode_ulaw, read_wav

ALERTS = """# what a call center wants to know about, as it happens
refund: refund, money back, charged twice
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
    code, _, err = run_app("--transcribe", "--transcribe-model", MODEL, "--alerts", str(path))
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
    server = start_server("--transcribe", "--transcribe-model", MODEL, "--alerts", str(tmp_path / "alerts.txt"),
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
    scraped = get(metrics_port, "/metrics")[2].decode()
    assert re.search(r'^mediastreams_alerts_total\{category="refund"\} 1\.0$', scraped, re.MULTILINE), scraped
    ended = json.loads(get(floor_port, "/calls")[2])["ended"]
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
