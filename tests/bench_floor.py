"""The floor at scale: N calls over P processes (`python app.py --redis-url`), one Redis
(Debian's redis-server, started here), one floor-only process; a feed client on the
floor's /events notes when each event arrives. Reports, per kind of event, the time from
it happening (its `time`, stamped by the process that held the call) to the feed client
reading it: p50, p99, max; and the CPU each part used. Run by hand, never collected:

    python -m tests.bench_floor --calls 1000 --processes 4 --seconds 20
"""
import argparse
import datetime
import http.client
import json
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.bench_load import cpu_seconds, free_port, one_round, percentile, start_server


def clients(port: int, pid: int, calls: int, seconds: float, results) -> None:
    r = one_round(port, pid, calls, seconds)
    results.put({k: r[k] for k in ("messages", "us_per_message", "cut", "failures")})


def follow(port: int, arrivals: list, stop: threading.Event) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", "/events")
    response = connection.getresponse()
    for raw in response:
        if stop.is_set():
            return
        if raw.startswith(b"data: "):
            record = json.loads(raw[6:])
            if "type" in record:  # an event, not the snapshot
                arrivals.append((record["type"], time.time(), record["time"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    redis_port = free_port()
    redis = subprocess.Popen([shutil.which("redis-server"), "--port", str(redis_port), "--save", "", "--appendonly",
                              "no", "--dir", str(folder)], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    url = f"redis://127.0.0.1:{redis_port}/0"
    servers = [start_server("ours", folder / f"server{n}.log", ["--redis-url", url, "--max-streams", "5000"])
               for n in range(args.processes)]
    floor_port = free_port()
    floor = subprocess.Popen([sys.executable, "app.py", "--floor-only", "--floor-port",
                              str(floor_port), "--redis-url", url], stdout=open(folder / "floor.log", "w"),
                             stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent)
    time.sleep(2)
    arrivals: list = []
    stop = threading.Event()
    threading.Thread(target=follow, args=(floor_port, arrivals, stop), daemon=True).start()
    time.sleep(0.5)
    floor_cpu, redis_cpu = cpu_seconds(floor.pid), cpu_seconds(redis.pid)
    results = multiprocessing.Queue()
    per = args.calls // args.processes
    players = [multiprocessing.Process(target=clients, args=(port, process.pid, per, args.seconds, results))
               for process, port in servers]
    for player in players:
        player.start()
    figures = [results.get(timeout=args.seconds + 120) for _ in players]
    time.sleep(2)
    stop.set()
    floor_cpu, redis_cpu = cpu_seconds(floor.pid) - floor_cpu, cpu_seconds(redis.pid) - redis_cpu
    delays: dict[str, list[float]] = {}
    for kind, arrived, happened in arrivals:
        at = datetime.datetime.fromisoformat(happened.replace("Z", "+00:00")).timestamp()
        delays.setdefault(kind, []).append((arrived - at) * 1000)
    print(f"{args.calls} calls over {args.processes} processes, {args.seconds:.0f} s, one floor, one Redis")
    for r in figures:
        print(f"  a process: {r['messages']} messages, {r['us_per_message']:.1f} µs CPU a message, cut {r['cut']}, "
              f"handshakes failed {r['failures']}")
    print(f"  floor CPU {floor_cpu:.2f} s ({floor_cpu / args.seconds * 100:.0f}% of a core), "
          f"redis-server {redis_cpu:.2f} s")
    every = sorted(d for values in delays.values() for d in values)
    for kind, values in sorted(delays.items()) + [("all", every)]:
        values.sort()
        print(f"  {kind:10} {len(values):7} events  happened -> read from the floor's feed: "
              f"p50 {percentile(values, 0.5):7.1f} ms  p99 {percentile(values, 0.99):7.1f} ms  max {values[-1]:7.1f} ms")
    for process, _ in servers:
        process.terminate()
    floor.terminate()
    redis.terminate()


if __name__ == "__main__":
    main()
