"""The call history at scale: a history of --calls calls and --lines lines a call (1,000,000 and
10 by default: 10,000,000 lines), written through History.write() as the floor's writer does,
then searched and read as the pages do. Reports the time to build it and its size per call;
p50/p95 of a word search (a rare word, a common one, a phrase, a prefix), of the calls list
(first page, a deep page, with filters) and of a call's page; and the CPU the writer spends on
the records of 1,000 live calls (what they say, their keys and ends; levels are never written).
Run by hand, never collected; it needs about 3 GB of disk for the default size:

    python -m tests.bench_history [--calls 1000000] [--lines 10] [--file /tmp/history-bench.sqlite3]

An existing --file of the right size is searched again without being built.
"""
import argparse
import datetime
import os
import random
import resource
import statistics
import time
from pathlib import Path

import gevent

import app

ROOT = Path(__file__).resolve().parent.parent
WORDS = [line.split("\t")[-1] for line in (ROOT / "tests" / "speech" / "moods.tsv").read_text().splitlines()
         if line and not line.startswith("#")] + [
    "The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
    "My order number is 45123.", "I would like to pay my bill.", "Thank you, that is all."]


def records(first: int, count: int, lines: int, rng: random.Random) -> list[dict]:
    """The floor's records of `count` calls, from call number `first`: a start, `lines` lines
    said (a mood each, an alert in 1 call of 100), a key press, an end."""
    out = []
    start = datetime.datetime(2026, 9, 1, tzinfo=datetime.timezone.utc)
    for n in range(first, first + count):
        sid, when = f"MZ{n:032x}", (start + datetime.timedelta(seconds=n * 7.7)).isoformat(timespec="milliseconds")
        base = {"stream": sid, "call": f"CA{n:032x}", "server": f"host{n % 4}:1", "time": when.replace("+00:00", "Z")}
        out.append({**base, "type": "start", "uid": f"{sid}/0", "tracks": ["inbound", "outbound"],
                    "parameters": {"From": f"+1555{n % 10_000_000:07d}", "To": "+15550000000"}})
        for k in range(lines):
            out.append({**base, "type": "transcript", "uid": f"{sid}/{k + 1}", "track": ("inbound", "outbound")[k % 2],
                        "offset": 4.0 * k, "seconds": 3.0, "text": rng.choice(WORDS), "partial": False,
                        "mood": round(rng.uniform(-1, 1), 2)})
        if n % 100 == 0:
            out.append({**base, "type": "alert", "uid": f"{sid}/a", "track": "inbound", "category": "refund",
                        "phrase": "money back", "text": "I want my money back."})
        out.append({**base, "type": "dtmf", "uid": f"{sid}/d", "digit": "1"})
        out.append({**base, "type": "end", "uid": f"{sid}/e", "ended": "stop", "duration": f"{4.0 * lines:.2f}s",
                    "media": str(200 * lines)})
    return out


def timed(function, *args, repeat: int = 30) -> tuple[float, float]:
    """p50 and p95, in ms, of `repeat` calls."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function(*args)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--lines", type=int, default=10)
    parser.add_argument("--file", default="/tmp/history-bench.sqlite3")
    args = parser.parse_args()
    history = app.History(args.file, days=0)
    rng = random.Random(1)
    built = os.path.exists(args.file)
    history.open()
    if built and history.call(f"MZ{args.calls - 1:032x}") is None:
        raise SystemExit(f"{args.file} exists and is not a history of {args.calls} calls: remove it")
    if not built:
        started = time.monotonic()
        for first in range(0, args.calls, 1000):
            history.write(records(first, min(1000, args.calls - first), args.lines, rng))
            if first % 100_000 == 0:
                print(f"  {first} calls written, {time.monotonic() - started:.0f} s", flush=True)
        print(f"built {args.calls} calls, {args.calls * args.lines} lines in {time.monotonic() - started:.0f} s")
    size = sum(os.path.getsize(args.file + suffix) for suffix in ("", "-wal") if os.path.exists(args.file + suffix))
    print(f"file: {size / 2**20:.0f} MiB, {size / args.calls:.0f} bytes a call")

    def search(**query):
        return history.search_here(app.history_query(query), app.HISTORY_PAGE_CALLS)

    last = f"MZ{args.calls // 2:032x}"
    for name, function, call_args in [
            ("word search, a rare word ('supervisor')", search, {"q": "supervisor"}),
            ("word search, a common word ('the')", search, {"q": "the"}),
            ("phrase search ('\"money back\"')", search, {"q": '"money back"'}),
            ("prefix search ('cancel*')", search, {"q": "cancel*"}),
            ("word and filter ('refund', mood below -0.5)", search, {"q": "refund", "mood_below": "-0.5"}),
            ("calls list, first page", search, {}),
            ("calls list, page 100", search, {"page": "100"}),
            ("calls list, a caller", search, {"caller": "+15550012345"}),
            ("calls list, since a day", search, {"since": "2026-11-01", "until": "2026-11-02"}),
            ("a call's page", None, None)]:
        if function is None:
            p50, p95 = timed(history.call_here, last)
        else:
            p50, p95 = timed(lambda: function(**call_args))
        print(f"{name:48} p50 {p50:7.1f} ms   p95 {p95:7.1f} ms")

    # The writer at 1,000 live calls: each says a line every 3 s or so on one of its tracks
    # (0.33 records a second a call), its level lines (2 a second) never reach the file.
    writer = app.History(args.file + ".writer", days=0)
    writer.open()
    writer.start()
    batch = records(10**9, 1000, 10, rng)
    levels = [{"type": "level", "stream": "MZ", "track": "inbound", "dbfs": -20.0}] * (len(batch) * 6)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    for each in levels:
        writer.add(each)
    for each in batch:
        writer.add(dict(each))
    while not writer.written.is_set() or writer.queue:
        gevent.sleep(0.05)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    per_record = cpu / len(batch)
    rate = 1000 / 3  # records a second of 1,000 calls
    print(f"writer: {len(batch)} records (and {len(levels)} levels left out) in {cpu * 1000:.0f} ms of CPU, "
          f"{per_record * 1e6:.0f} µs a record; 1,000 live calls ({rate:.0f} records and 2,000 levels a second): "
          f"{per_record * rate * 100:.1f}% of a core")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(args.file + ".writer" + suffix):
            os.unlink(args.file + ".writer" + suffix)


if __name__ == "__main__":
    main()
