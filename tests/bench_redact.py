"""Redaction, measured: the lines of tests/speech/redact.tsv (card numbers of several networks
and lengths read in groups and as words, security codes, expiry dates, social security
numbers, and ordinary lines with numbers that must stay), each spoken by two of Debian's flite
voices, made 8 kHz 16-bit with sox, played as a call by the simulator into `app.py
--transcribe` (mu-law, voice activity, Whisper tiny.en from the test requirements), then read
back from the console; and the labelled lines of tests/speech/moods.tsv, none of which may lose
anything. Reports, per kind, the lines whose secret went (a marker, and no more than 4 digits
of a card, 2 of anything else, left in what was kept), the false redactions, the most digits of
a card left anywhere, and the CPU a line's redaction costs. Run by hand, never collected (needs
flite and sox):

    python -m tests.bench_redact [--no-moods]
"""
import argparse
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.conftest import ROOT, calls_into_a_server, whisper_model

SPEECH = ROOT / "tests" / "speech"
VOICES = ("slt", "rms", "awb", "kal16")
MARKERS = re.compile(r"\[(card number|security code|expiry date|social security number)\]")


def labelled() -> list[tuple[str, str]]:
    lines = [line.split("\t") for line in (SPEECH / "redact.tsv").read_text().splitlines()
             if line and not line.startswith("#")]
    return [(kind, text) for kind, text in lines]


def moods() -> list[tuple[str, str]]:
    return [("none", line.split("\t")[2]) for line in (SPEECH / "moods.tsv").read_text().splitlines()
            if line and not line.startswith("#")]


def spoken(folder: Path, n: int, voice: str, text: str) -> Path:
    """The line in `voice`, its parts (" | ") 1.2 s apart, 8 kHz 16-bit, with silence around."""
    parts = []
    for k, part in enumerate(text.split(" | ")):
        raw, wav = folder / f"{n}-{k}-raw.wav", folder / f"{n}-{k}.wav"
        subprocess.run(["flite", "-voice", voice, "-t", part, "-o", str(raw)], check=True)
        subprocess.run(["sox", str(raw), "-r", "8000", "-c", "1", "-b", "16", str(wav), "pad", "0.3", "1.2"], check=True)
        parts.append(str(wav))
    whole = folder / f"{n}.wav"
    subprocess.run(["sox", *parts, str(whole), "pad", "0", "1.0"] if len(parts) > 1 else
                   ["sox", parts[0], str(whole), "pad", "0", "1.0"], check=True)
    return whole


def most_digits(text: str) -> int:
    return max((sum(c.isdigit() for c in run) for run in re.findall(r"\d[\d ,.\-/]*\d|\d", text)), default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-moods", action="store_true", help="only tests/speech/redact.tsv")
    parser.add_argument("--at-once", type=int, default=4, help="calls played at the same time")
    args = parser.parse_args()
    if not (shutil.which("flite") and shutil.which("sox")):
        raise SystemExit("needs Debian's flite and sox: apt-get install flite sox")
    folder = Path(tempfile.mkdtemp(prefix="bench-redact-"))
    lines = [(kind, text, VOICES[(n + k) % len(VOICES)]) for n, (kind, text) in enumerate(labelled()) for k in (0, 1)]
    lines += [] if args.no_moods else [(kind, text, VOICES[n % len(VOICES)]) for n, (kind, text) in enumerate(moods())]
    wavs = [spoken(folder, n, voice, text) for n, (_, text, voice) in enumerate(lines)]
    flags = ["--transcribe", "--transcribe-model", whisper_model(), "--transcribe-threads", "2", "--quiet-levels"]
    console, sids = calls_into_a_server(wavs, flags, args.at_once)

    found: dict[str, list[int]] = {}  # kind: [secret gone, lines, false redactions]
    card_digits_left = 0
    kept = []
    for (kind, text, voice), sid in zip(lines, sids):
        heard = " ".join(re.findall(rf'stream={sid} transcript track=inbound at=[\d.]+s text="(.*)"', console))
        kept.append(heard)
        marked = set(MARKERS.findall(heard))
        counts = found.setdefault(kind, [0, 0, 0])
        counts[1] += 1
        if kind == "none":
            counts[2] += bool(marked)
            if marked:
                print(f"  false  {voice:5} {text!r} -> {heard!r}")
            continue
        left = most_digits(heard)
        card_digits_left = max(card_digits_left, left) if kind == "card" else card_digits_left
        gone = bool(marked) and left <= (4 if kind == "card" else 2)
        counts[0] += gone
        if not gone:
            print(f"  missed {kind:6} {voice:5} {text!r} -> {heard!r}")
    print(f"{len(lines)} calls ({len(labelled())} lines of redact.tsv x 2 voices"
          f"{'' if args.no_moods else f', {len(moods())} of moods.tsv'}), flite voices {', '.join(VOICES)}")
    for kind in ("card", "code", "expiry", "ssn"):
        gone, total, _ = found.get(kind, [0, 0, 0])
        print(f"{kind:7} redacted {gone}/{total}")
    print(f"most digits of a card left in any line kept: {card_digits_left}")
    _, total, false = found.get("none", [0, 0, 0])
    print(f"ordinary lines (numbers that must stay{'' if args.no_moods else ', and moods.tsv'}): "
          f"{false} of {total} lost words to a false redaction")
    import app
    texts = [text for text in kept if text] * 50
    started = time.process_time()
    for text in texts:
        app.redacted(text, app.redactions(text))
        app.may_go_on(text)
    print(f"CPU a line, redaction: {(time.process_time() - started) / len(texts) * 1e6:.0f} µs")


if __name__ == "__main__":
    main()
