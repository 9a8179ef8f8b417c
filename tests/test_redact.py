"""Card numbers are never kept: what callers say and key in is redacted before anything keeps
it. The rules on what Whisper makes of numbers said aloud, lines judged across a pause, the
recording silenced, keys masked, a secure section; then a spoken card through the real
recognizer, leaving no trace in the console, files, WAV, floor, feed or Redis."""
import json
import re
import time
import wave
from array import array

import gevent
import pytest

import app
from tests.conftest import (REDIS_SERVER, ROOT, Feed, Redis, call_on, free_port, http_request, run_app, runtime,
                            whisper_model)
from tests.twilio_sim import Call, encode_ulaw, read_wav

CARD, CODE, EXPIRY, SSN = "[card number]", "[security code]", "[expiry date]", "[social security number]"
SPOKEN = ROOT / "tests" / "speech" / "card_call.wav"  # flite's slt voice, 8 kHz; its lines, in order:
SEGMENTS = [3.01, 4.445, 3.595, 3.365, 3.61, 3.925, 2.835]  # seconds of each line, its silence included
SAID = ["I would like to pay my bill.", "My card number is four one one one, one one one one.",
        "one one one one, one one one one.", "The expiry date is oh nine twenty eight.",
        "The security code is seven three seven.", "My order number is four five one two three.",
        "Thank you, that is all."]


@pytest.mark.parametrize("heard, kept", [
    # cards, however Whisper writes what was said
    ("my card number is 4 111 111 111 111 111", f"my card number is {CARD}"),
    ("my card number is for 111, 111, 111, 111, 111, 111", f"my card number is {CARD}"),
    ("My card number is 4111 1111 1111 1111.", f"My card number is {CARD}."),
    ("four one one one one one one one one one one one one one one one", CARD),
    ("It's 5555-5555-5555-4444, thanks.", f"It's {CARD}, thanks."),
    ("Can I pay with my Visa? 4111 1111", f"Can I pay with my Visa? {CARD}"),
    ("4111111111111111", CARD),
    ("4 5 5 6 7 3 7 5 H 6 8 9 9 8 5 5", CARD),  # "eight" heard as a letter
    # codes, expiry dates, social security numbers
    ("the security code is 737", f"the security code is {CODE}"),
    ("The CVV is 1234.", f"The CVV is {CODE}."),
    ("The three digits on the back are 4 5 6.", f"The three digits on the back are {CODE}."),
    ("My card number is 4111 1111 1111 1111 and the code is 737", f"My card number is {CARD} and the code is {CODE}"),
    ("the expiry is 0928", f"the expiry is {EXPIRY}"),
    ("the expiry is on 928", f"the expiry is on {EXPIRY}"),
    ("The expiry is 09/28.", f"The expiry is {EXPIRY}."),
    ("It expires September 2028.", f"It expires {EXPIRY}."),
    ("My card numbers 4111 1111 1111 1111. The X 30 is 928.", f"My card numbers {CARD}. The X 30 is {EXPIRY}."),
    ("The next primary date is 928.", f"The next primary date is {EXPIRY}."),  # "expiry date", misheard
    ("My card is valid 305 29.", f"My card is valid {EXPIRY}."),  # "valid through oh five twenty nine"
    ("My social security number is 123-45-6789.", f"My social security number is {SSN}."),
    ("my social is 123 45 6789", f"my social is {SSN}"),
    # what stays
    ("My order number is 45123.", None), ("I have been waiting 45 minutes.", None),
    ("It cost $1,250.00.", None), ("That's 1,250 dollars.", None), ("Call me at 555 123 4567.", None),
    ("my phone number is 1 555 123 4567", None), ("My number is 415-555-0132.", None),
    ("It was 2019 when I bought it.", None), ("I have had this card since 2019.", None),
    ("my card ends in 1234", None), ("My zip code is 94103.", None), ("I want my money back.", None),
    ("the code is 737", None),  # a code, but of what: no card was spoken of
    ("My card is valid for 30 days", None), ("I waited for 5 minutes", None), ("My card dimps in 1234", None),
    ("It is room 12 a 4", None),
])
def test_what_is_redacted_and_what_stays(heard, kept):
    assert app.redacted(heard, app.redactions(heard)) == (kept or heard)


def test_the_moods_lines_lose_nothing():
    """The labelled lines of tests/speech/moods.tsv (numbers of minutes, amounts, orders) as said."""
    lines = [line.split("\t")[2] for line in (ROOT / "tests" / "speech" / "moods.tsv").read_text().splitlines()
             if line and not line.startswith("#")]
    assert [line for line in lines if app.redactions(line)] == []


def test_partial_lines_never_show_more_than_four_digits_of_a_number():
    said = "My card number is 4111 1111 1111 1111 and the security code is 737"
    for end in range(len(said) + 1):
        shown = app.partial_redacted(said[:end])
        assert not re.search(r"\d{5}|\d+[ ,]\d+", shown.replace(" and", "")), shown
        assert "737" not in shown


@pytest.mark.parametrize("redact, shown", [(True, f"my card number is {CARD}"),
                                           (False, "my card number is 4111 1111 11")])
def test_a_partial_line_is_redacted_before_its_event_is_made(redact, shown):
    serving = runtime(transcribe=True, transcript_partials=True, redact=redact, recognize=lambda pcm: "")
    events = []
    serving.sinks.append(events.append)
    stream = app.MediaStream(serving, remote="test")
    transcript = app.TrackTranscript(stream, "inbound")
    transcript.speech = bytearray(320)  # still speaking
    transcript.heard(app.Utterance(transcript, 1.0, bytes(320), partial=True, index=0), "my card number is 4111 1111 11")
    line, = [e for e in events if isinstance(e, app.Transcribed)]
    assert (line.text, line.partial) == (shown, True)


def transcribed(texts, *messages, tracks=("inbound",), **settings):
    """A call of the two sentences of tests/speech/two_sentences.wav (per track), heard as `texts`
    in turn; its events, its stream and its recordings' folder."""
    said = iter(texts)
    serving = runtime(transcribe=True, recognize=lambda pcm: next(said, ""), **settings)
    events = []
    serving.sinks.append(events.append)
    call = Call(tracks=tracks)
    audio = encode_ulaw(read_wav(ROOT / "tests" / "speech" / "two_sentences.wav"))
    stream = call_on(serving, [*call.session(audio={track: audio for track in tracks}), *messages, call.stop()])
    return [e for e in events if isinstance(e, app.Transcribed)], stream, call


def media(call, ulaw, at):
    """Media messages for `ulaw`, the call's audio from sample `at` on (timestamps go on)."""
    return [call.media("inbound", ulaw[offset:offset + 160], 20 + (at + offset) // 8) for offset in range(0, len(ulaw), 160)]


def samples_of(path):
    with wave.open(str(path), "rb") as recording:
        return array("h", recording.readframes(recording.getnframes()))


def test_a_number_read_across_a_pause_is_redacted_in_both_lines_and_both_utterances_silenced(tmp_path):
    lines, stream, call = transcribed(["My card number is 4111 1111", "1111 1111."], record=str(tmp_path))
    assert [line.text for line in lines] == [f"My card number is {CARD}", f"{CARD}."]
    assert [line.redacted for line in lines] == [("card number",), ("card number",)]
    pcm = samples_of(tmp_path / f"{call.stream_sid}_inbound.wav")
    assert len(pcm) == len(read_wav(ROOT / "tests" / "speech" / "two_sentences.wav")), "the tracks stay aligned"
    for line in lines:
        start = round(line.at * 8000)
        assert not any(pcm[start:start + 8000]), "the utterance's audio is silence"
    assert stream.summary().fields()["redacted"] == "2"


def test_a_card_read_in_two_halves_with_nothing_said_around_it_is_redacted_in_both(tmp_path):
    """Eight digits alone are an ordinary number; the first line waits for the second, and the
    sixteen together are a card."""
    lines, stream, _ = transcribed(["4111 1111", "1111 1111."], record=str(tmp_path))
    assert [line.text for line in lines] == [CARD, f"{CARD}."]


def test_ordinary_lines_are_kept_whole_and_their_audio_too(tmp_path):
    lines, stream, call = transcribed(["My order number is 45123", "it took 45 minutes."], record=str(tmp_path))
    assert [line.text for line in lines] == ["My order number is 45123", "it took 45 minutes."]
    pcm = samples_of(tmp_path / f"{call.stream_sid}_inbound.wav")
    assert all(any(pcm[round(line.at * 8000):round(line.at * 8000) + 8000]) for line in lines)
    assert stream.summary().fields()["redacted"] == "0"


def test_a_line_that_may_go_on_waits_no_longer_than_the_hold(tmp_path):
    said = iter(["the reference is 84123456", "ok"])
    serving = runtime(transcribe=True, record=str(tmp_path), limits=app.Limits(redact_hold_seconds=0.2),
                      recognize=lambda pcm: next(said, ""))
    events = []
    serving.sinks.append(events.append)
    call = Call()
    stream = app.MediaStream(serving, remote="test")
    speech = encode_ulaw(read_wav(ROOT / "tests" / "speech" / "two_sentences.wav"))
    first = speech[:len(speech) // 2]  # the first sentence and its silence: one utterance
    for message in [*call.session(audio={"inbound": first})]:
        stream.handle(message)
    deadline = time.monotonic() + 10
    while not [e for e in events if isinstance(e, app.Transcribed)] and time.monotonic() < deadline:
        gevent.sleep(0.05)
    line, = [e for e in events if isinstance(e, app.Transcribed)]
    assert line.text == "the reference is 84123456", "8 digits, nothing before them: an ordinary number"
    stream.handle(call.stop())
    stream.finish()


def test_with_no_redact_lines_are_kept_as_heard(tmp_path):
    lines, stream, _ = transcribed(["My card number is 4111 1111", "1111 1111."], record=str(tmp_path), redact=False)
    assert [line.text for line in lines] == ["My card number is 4111 1111", "1111 1111."]
    assert "redacted" not in stream.summary().fields()


def test_of_a_run_of_keys_only_the_first_is_shown_and_your_on_dtmf_gets_them_all():
    got = []

    class Yours(app.MediaStream):
        def on_dtmf(self, data):
            super().on_dtmf(data)
            got.append(data["dtmf"]["digit"])

    serving = runtime(limits=app.Limits(key_run_seconds=0.3))
    shown = []
    serving.sinks.append(lambda event: shown.append(event.digit) if isinstance(event, app.Dtmf) else None)
    call = Call()
    stream = Yours(serving, remote="test")
    for message in [*call.session(), *(call.dtmf(digit) for digit in "4111")]:
        stream.handle(message)
    time.sleep(0.4)  # a menu's next choice, after the run
    for message in [call.dtmf("2"), call.dtmf("9")]:
        stream.handle(message)
    stream.handle(call.stop())
    stream.finish()
    assert (got, shown) == (list("411129"), ["4", "*", "*", "*", "2", "*"])
    assert stream.summary().fields()["redacted"] == "4"


class Secure(app.MediaStream):
    """An IVR's secure section: `*` opens it, `#` closes it."""

    def on_dtmf(self, data):
        if data["dtmf"]["digit"] == "*":
            self.pause_recording()
        super().on_dtmf(data)
        if data["dtmf"]["digit"] == "#":
            self.resume_recording()


def test_a_secure_section_records_silence_transcribes_nothing_and_hides_every_key(tmp_path, caplog):
    serving = runtime(Secure, transcribe=True, record=str(tmp_path), limits=app.Limits(key_run_seconds=0),
                      recognize=lambda pcm: "something said")
    events = []
    serving.sinks.append(events.append)
    call = Call()
    speech = encode_ulaw(read_wav(ROOT / "tests" / "speech" / "two_sentences.wav"))
    half = len(speech) // 2
    messages = [call.connected(), call.start(), *media(call, speech[:half], 0), call.dtmf("*"), call.dtmf("4"),
                *media(call, speech[half:], half), call.dtmf("#"), call.dtmf("1"), *media(call, speech, 2 * half),
                call.stop()]
    call_on(serving, messages)
    pcm = samples_of(tmp_path / f"{call.stream_sid}_inbound.wav")
    assert any(pcm[:half]) and not any(pcm[half:2 * half]) and any(pcm[2 * half:]), "silence in the section only"
    lines = [e for e in events if isinstance(e, app.Transcribed)]
    assert len(lines) == 3 and all(not half / 8000 <= line.at < 2 * half / 8000 for line in lines)
    assert [e.digit for e in events if isinstance(e, app.Dtmf)] == ["*", "*", "*", "1"]
    assert [e.paused for e in events if isinstance(e, app.SecureSection)] == [True, False]


def test_no_redact_is_a_flag_and_a_variable():
    status, help_text, _ = run_app("--help")
    assert status == 0 and "--no-redact" in help_text and "(REDACT=0)" in help_text
    assert not app.read_settings(["--no-redact"], {}).redact and not app.read_settings([], {"REDACT": "0"}).redact
    assert app.read_settings([], {}).redact, "on by default"


# --- A card said aloud, through the real recognizer, end to end -----------------------------

def say_the_card_call(server, call, lines=range(len(SEGMENTS))):
    """The card call (or some of its `lines`, in one piece), a line at a time, each sent once the
    line two before it is a transcript: as fast as the recognizer goes, with no more than two of
    its utterances waiting for it (one more may be held back, waiting for its next line)."""
    client = server.connect()
    client.send_all([call.connected(), call.start()])
    audio, starts, at = encode_ulaw(read_wav(SPOKEN)), [0], 0
    for seconds in SEGMENTS:
        starts.append(starts[-1] + round(seconds * 8000))
    for n, line in enumerate(lines):
        if n >= 2:
            server.wait_for(rf"stream={call.stream_sid} transcript track", count=n - 1, timeout=30)
        segment = audio[starts[line]:starts[line + 1]]
        client.send_all(media(call, segment, at))
        at += len(segment)
    return client


def no_card_in(texts, where: str) -> None:
    """No more than four of the card's digits in any of `texts` (what was said, as written
    anywhere), and nothing of its code and expiry date."""
    for text in texts:
        for number in re.findall(r"\d[\d ,.-]*\d|\d", text.replace("45123", "")):  # the order number stays
            assert sum(c.isdigit() for c in number) <= 4 and number not in ("737", "928", "0928"), (where, text)


@pytest.mark.skipif(not REDIS_SERVER, reason="needs Debian's redis-server (apt-get install redis-server)")
def test_a_card_said_and_keyed_leaves_no_trace_anywhere_and_the_rest_is_there(start_server, tmp_path):
    redis = Redis(tmp_path)
    try:
        floor_port = free_port()
        server = start_server("--transcribe", "--transcribe-model", whisper_model(), "--transcript-partials",
                              "--record", str(tmp_path / "rec"), "--floor-port", str(floor_port), "--redis-url",
                              redis.url, start_timeout=60)
        feed = Feed(floor_port)
        call = Call(params={"From": "+15550123"})
        client = say_the_card_call(server, call)
        client.send_all([*(call.dtmf(d) for d in "4111"), call.stop()])
        assert client.wait_closed(60) == 1000
        summary = server.summary(call.stream_sid, timeout=60)
        assert summary["transcript"] == "7" and int(summary["redacted"]) >= 6, summary
        log = server.log()
        lines = re.findall(rf"stream={call.stream_sid} transcript track=inbound at=([\d.]+)s text=\"(.*)\"", log)
        texts = [text for _, text in lines]
        assert CARD in texts[1] and texts[2].startswith(CARD) and CODE in texts[4], texts
        assert "45123" in texts[5] and "that is all" in texts[6], "the rest of the conversation is there"
        said = re.findall(rf"stream={call.stream_sid} transcript[-a-z]* track=inbound at=[\d.]+s text=\"(.*)\"", log)
        no_card_in(said, "the console")
        assert re.findall(rf"stream={call.stream_sid} dtmf digit=(\S)", log) == ["4", "*", "*", "*"]
        written = (tmp_path / "rec" / f"{call.stream_sid}_inbound.txt").read_text()
        no_card_in(written.splitlines(), "the transcript file")
        assert written.count(CARD) == 2
        pcm = samples_of(tmp_path / "rec" / f"{call.stream_sid}_inbound.wav")
        for (at, text) in lines:
            start = round(float(at) * 8000)
            assert any(pcm[start:start + 8000]) != ("[" in text), f"{text!r}: silenced if and only if redacted"
        feed.wait_for(lambda kind, event_id, record: record.get("type") == "end")
        no_card_in([r.get("text", "") for _, _, r in feed.events], "the feed")
        assert "1111" not in json.dumps([record for _, _, record in feed.events])
        marked = [r for _, _, r in feed.events if r.get("type") == "transcript" and r.get("redacted")]
        assert {kind for r in marked for kind in r["redacted"]} >= {"card number", "security code"}
        floor = json.loads(http_request(floor_port, "/calls")[2])
        no_card_in([line.get("text", "") for call_shown in floor["ended"] for line in call_shown["lines"]], "the floor")
        entries = redis.cli("XRANGE", app.REDIS_STREAM, "-", "+")
        assert call.stream_sid in entries and CARD in entries
        no_card_in([json.loads(line).get("text", "") for line in entries.splitlines() if line.startswith("{")], "Redis")
        feed.close()
    finally:
        redis.kill()


def test_with_no_redact_the_card_is_kept_and_a_warning_says_so(start_server, tmp_path):
    server = start_server("--transcribe", "--transcribe-model", whisper_model(), "--no-redact", start_timeout=60)
    server.wait_for(r"WARNING Redaction is off \(--no-redact\): card numbers")
    call = Call()
    client = say_the_card_call(server, call, lines=(1, 2, 4))  # the card, in two lines; the code
    client.send_all([*(call.dtmf(d) for d in "41"), call.stop()])
    assert client.wait_closed(60) == 1000
    summary = server.summary(call.stream_sid, timeout=60)
    assert "redacted" not in summary and summary["transcript"] == "3"
    log = server.log()
    assert "111 111" in log and "737" in log, "as Whisper heard them"
    assert re.findall(rf"stream={call.stream_sid} dtmf digit=(\S)", log) == ["4", "1"]


def test_the_floors_page_shows_the_markers_never_the_card(start_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    floor_port = free_port()
    server = start_server("--transcribe", "--transcribe-model", whisper_model(), "--floor-port", str(floor_port),
                          start_timeout=60)
    browser.get(f"http://127.0.0.1:{floor_port}/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: b.find_element(By.ID, "count").text == "0 live")
    call = Call(params={"From": "+15550199"})
    client = say_the_card_call(server, call, lines=(1, 2, 5, 6))  # the card, in two lines; the order, goodbye
    client.send_all([call.stop()])
    assert client.wait_closed(60) == 1000
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#calls tr.ended"))
    browser.find_element(By.CSS_SELECTOR, "#calls tr.ended").click()
    lines = wait.until(lambda b: (said := [li.find_element(By.CSS_SELECTOR, "span").text for li in b.find_elements(
        By.CSS_SELECTOR, "#detail .conversation li.transcript")]) and " ".join(said).count(CARD) == 2 and said)
    assert "that is all" in lines[-1] and "45123" in lines[-2], "the rest of the conversation is there"
    no_card_in(lines, "the floor's page")
