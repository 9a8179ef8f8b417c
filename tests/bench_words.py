"""Words that matter, measured: the labelled lines of tests/speech/moods.tsv, each spoken by
one of Debian's flite voices, made 8 kHz 16-bit with sox, played as a call by the simulator
into `app.py --transcribe --alerts tests/speech/alerts.txt --mood` (mu-law, voice activity,
Whisper tiny.en from the test requirements), then read back from the console. Reports, per
class of mood, how often the sign is right (negative <= -0.05 < neutral < 0.05 <= positive,
VADER's own thresholds) for VADER alone on the same words and for ours; per category of
alert, raised against expected and false alerts; and the CPU a line costs each scorer.
Run by hand, never collected (needs flite and sox):

    python -m tests.bench_words [--hint]

--hint passes the alerts' phrases to Whisper as the text before each utterance (its prompt),
to see whether rare words are recognized more often; the word error rate over all lines is
shown either way.
"""
import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import ROOT, calls_into_a_server, whisper_model, word_error_rate

SPEECH = ROOT / "tests" / "speech"
VOICES = ("slt", "rms", "awb", "kal16")


def labelled() -> list[tuple[str, set[str], str]]:
    lines = []
    for line in (SPEECH / "moods.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            mood, alerts, text = line.split("\t")
            lines.append((mood, set() if alerts == "-" else set(alerts.split(",")), text))
    return lines


def spoken(folder: Path, n: int, text: str) -> Path:
    raw, wav = folder / f"{n}-raw.wav", folder / f"{n}.wav"
    subprocess.run(["flite", "-voice", VOICES[n % len(VOICES)], "-t", text, "-o", str(raw)], check=True)
    subprocess.run(["sox", str(raw), "-r", "8000", "-c", "1", "-b", "16", str(wav), "pad", "0.3", "1.0"], check=True)
    return wav


def sign(score: float) -> str:
    return "negative" if score <= -0.05 else "positive" if score >= 0.05 else "neutral"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hint", action="store_true")
    parser.add_argument("--at-once", type=int, default=4, help="calls played at the same time")
    args = parser.parse_args()
    if not (shutil.which("flite") and shutil.which("sox")):
        raise SystemExit("needs Debian's flite and sox: apt-get install flite sox")
    folder = Path(tempfile.mkdtemp(prefix="bench-words-"))
    lines = labelled()
    wavs = [spoken(folder, n, text) for n, (_, _, text) in enumerate(lines)]
    flags = ["--transcribe", "--transcribe-model", whisper_model(), "--transcribe-threads", "2", "--alerts",
             str(SPEECH / "alerts.txt"), "--mood", "--quiet-levels"]
    command = [sys.executable, "-m", "tests.servers", "hinted"] if args.hint else None
    console, sids = calls_into_a_server(wavs, flags, args.at_once, command, settle=3)

    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    import app
    vader, ours = SentimentIntensityAnalyzer(), app.Mood()
    right = {"vader": {}, "ours": {}}
    raised: dict[str, list[int]] = {}  # category: [raised where expected, expected, raised where not expected]
    heard_all, said_all = [], []
    for (mood, expected, text), sid in zip(lines, sids):
        heard = re.findall(rf'stream={sid} transcript track=inbound at=[\d.]+s text="(.*)" mood=(-?[\d.]+)', console)
        words = " ".join(h for h, _ in heard)
        heard_all.append(words)
        said_all.append(text)
        score = sum(float(m) for _, m in heard) / len(heard) if heard else 0.0
        for name, value in (("vader", vader.polarity_scores(words)["compound"]), ("ours", score)):
            right[name].setdefault(mood, []).append(sign(value) == mood)
        alerts = set(re.findall(rf"stream={sid} alert track=inbound category=(\w+)", console))
        for category in expected | alerts:
            counts = raised.setdefault(category, [0, 0, 0])
            counts[0] += category in expected and category in alerts
            counts[1] += category in expected
            counts[2] += category in alerts and category not in expected
        if sign(score) != mood or alerts != expected:
            print(f"  {mood:8} ours {score:+.2f} vader {vader.polarity_scores(words)['compound']:+.2f} "
                  f"alerts {sorted(alerts)} (expected {sorted(expected)}): {words!r}")
    print(f"{len(lines)} lines, {len(VOICES)} flite voices, hint {'on' if args.hint else 'off'}; word error rate "
          f"{word_error_rate(' '.join(heard_all), ' '.join(said_all)):.3f}")
    print("mood's sign right  " + "  ".join(f"{mood}: VADER {sum(right['vader'][mood])}/{len(right['vader'][mood])}"
                                            f", ours {sum(right['ours'][mood])}/{len(right['ours'][mood])}"
                                            for mood in ("negative", "neutral", "positive")))
    for category, (hit, expected, false) in sorted(raised.items()):
        print(f"alert {category:10} raised {hit}/{expected} expected, {false} false")
    texts = [t for t in heard_all if t] * 20
    for name, score in (("VADER", lambda t: vader.polarity_scores(t)), ("ours", ours)):
        started = time.process_time()
        for text in texts:
            score(text)
        print(f"CPU a line, {name}: {(time.process_time() - started) / len(texts) * 1e6:.0f} µs")


if __name__ == "__main__":
    main()
