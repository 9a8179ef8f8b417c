"""The floor at scale: N calls over P processes (`python app.py --redis-url`), one Redis
(Debian's redis-server, started here), one floor-only process; a feed client on the
floor's /events notes when each event arrives. Reports, per kind of event, the time from
it happening (its `time`, stamped by the process that held the call) to the feed client
reading it: p50, p99, max; and the CPU each part used. With Debian's chromium and
chromedriver, the floor's page is open in headless Chromium throughout, and reports its own
figures: each update's time (from the frame that draws it to the task after its paint) and,
for each event, the time from it happening to that paint. Run by hand, never collected:

    python -m tests.bench_floor --calls 1000 --processes 4 --seconds 20

--cost instead measures what the floor and Redis add to a process that takes calls, per
event, without the noise of a load run: this process emits level events at the rate N calls
make them (one a second each, in 50 ms bursts) through the runtime, once with neither and
once with `--floor-port` and `--redis-url` (publisher, follower, floor, a feed client
reading it), in a fresh process each time, and divides the CPU difference by the events.

    python -m tests.bench_floor --cost --calls 300 --seconds 20
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


# Wrapped around the page's own apply() and draw() (globals of its script): each event's
# time noted as it arrives, and, when the frame that draws it is painted (a message posted
# in the frame is handled after its paint), the update's time and each event's lag.
MEASURE_THE_PAGE = """
const bench = window.floorBench = {updates: [], scripts: [], lags: [], pending: [], started: 0, drawing: [], events: 0, reconnects: 0};
feed.addEventListener("error", () => bench.reconnects++);
const applyOriginal = window.apply, drawOriginal = window.draw;
const painted = new MessageChannel();
painted.port1.onmessage = () => {
  bench.updates.push(performance.now() - bench.started);
  const now = Date.now();
  for (const t of bench.drawing) bench.lags.push(now - t);
};
window.apply = (r) => { bench.events++; bench.pending.push(Date.parse(r.time)); return applyOriginal(r); };
window.draw = () => {
  bench.started = performance.now();
  bench.drawing = bench.pending;
  bench.pending = [];
  drawOriginal();
  bench.scripts.push(performance.now() - bench.started);
  painted.port2.postMessage(0);
};
"""


def open_the_page(floor_port: int):
    """Headless Chromium on the floor's page, through Debian's driver; None without them."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        print("  (no chromium and chromedriver: the page is not measured)")
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.get(f"http://127.0.0.1:{floor_port}/")
    time.sleep(1)
    driver.execute_script(MEASURE_THE_PAGE)
    driver.execute_cdp_cmd("Performance.enable", {})
    driver.started = {m["name"]: m["value"] for m in driver.execute_cdp_cmd("Performance.getMetrics", {})["metrics"]}
    return driver


def report_the_page(driver) -> None:
    figures = driver.execute_script("const b = window.floorBench; return {updates: b.updates, lags: b.lags,"
                                    " scripts: b.scripts, reconnects: b.reconnects, events: b.events, rows: document.querySelectorAll('#calls tr').length}")
    updates, lags, scripts = sorted(figures["updates"]), sorted(figures["lags"]), sorted(figures["scripts"])
    print(f"  the page (headless Chromium, {figures['rows']} rows at the end, {figures['events']} events, "
          f"{figures['reconnects']} reconnections): {len(updates)} updates, each "
          f"p50 {percentile(updates, 0.5):.1f} ms  p99 {percentile(updates, 0.99):.1f} ms  max {updates[-1]:.1f} ms")
    print(f"    of which its script (draw()): p50 {percentile(scripts, 0.5):.1f} ms  p99 "
          f"{percentile(scripts, 0.99):.1f} ms  max {scripts[-1]:.1f} ms")
    print(f"  {len(lags):7} events  happened -> painted on the page: p50 {percentile(lags, 0.5):7.1f} ms  "
          f"p99 {percentile(lags, 0.99):7.1f} ms  max {lags[-1]:7.1f} ms")
    metrics = {m["name"]: m["value"] for m in driver.execute_cdp_cmd("Performance.getMetrics", {})["metrics"]}
    spent = {name: metrics[name] - driver.started.get(name, 0) for name in
             ("TaskDuration", "ScriptDuration", "RecalcStyleDuration", "LayoutDuration")}
    print("  the page's main thread, all told (Chromium's own counts): " +
          ", ".join(f"{name.removesuffix('Duration').lower()} {value:.2f} s" for name, value in spent.items()))
    errors = [entry["message"] for entry in driver.get_log("browser")]
    if errors:
        print(f"  the page's console: {errors[:3]}")
    driver.quit()


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    redis = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--save", "", "--appendonly",
                              "no", "--dir", str(folder)], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    return redis, f"redis://127.0.0.1:{port}/0"


def emit_levels(flags: list[str], calls: int, seconds: float, results) -> None:
    """In a fresh process: a runtime for `flags`, and `calls` level events a second through
    it for `seconds`; puts the CPU seconds it took and the events sent."""
    import resource
    import types
    import gevent
    import app
    runtime = app.configure(flags)
    if runtime.floor:
        app.serve_floor(runtime)
        follower = subprocess.Popen(["curl", "-sN", f"http://127.0.0.1:{runtime.settings.floor_port}/events"],
                                    stdout=subprocess.DEVNULL)
    if runtime.publisher:
        runtime.publisher.start()
    streams = [types.SimpleNamespace(stream_sid=f"MZ{n:032x}", call_sid=f"CA{n:032x}") for n in range(calls)]
    gevent.sleep(1)
    burst = max(1, calls // 20)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for n in range(burst):
            stream = streams[(sent + n) % calls]
            runtime.emit(app.Level((sent + n) % calls, f"stream={stream.stream_sid}", stream.stream_sid, stream.call_sid, sent + n,
                                   "inbound", 1000.0 + n))
        sent += burst
        gevent.sleep(0.05)
    if runtime.publisher:
        runtime.publisher.flush(5)
    gevent.sleep(1)  # the floor reads the last of them back, and the feed client gets them
    after = resource.getrusage(resource.RUSAGE_SELF)
    results.put((after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime, sent))
    if runtime.floor:
        follower.terminate()


def measure_cost(url: str, calls: int, seconds: float, redis: subprocess.Popen) -> None:
    import logging
    logging.disable(logging.INFO)  # the console's level lines cost the same in every run: not measured
    results = multiprocessing.Queue()
    runs = {}
    for name, flags in (("neither", []), ("--redis-url (a floor elsewhere)", ["--redis-url", url]),
                        ("--redis-url and --floor-port", ["--floor-port", str(free_port()), "--redis-url", url])):
        child = multiprocessing.Process(target=emit_levels, args=(flags, calls, seconds, results))
        child.start()
        runs[name] = results.get(timeout=seconds + 60)
        child.join()
    off, events = runs.pop("neither")
    print(f"{events} level events at {calls} a second, {seconds:.0f} s: CPU {off:.3f} s with neither")
    for name, (cpu, _) in runs.items():
        per_event = (cpu - off) / events * 1e6
        print(f"  {name}: {cpu:.3f} s, {per_event:.1f} µs an event more: at one level event a second a track "
              f"and 50 media messages, {per_event / 50:.2f} µs more a media message")
    redis.terminate()

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--cost", action="store_true", help="CPU per event of the floor and Redis, in process")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    redis, url = start_redis(folder)
    if args.cost:
        return measure_cost(url, args.calls, args.seconds, redis)
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
    page = open_the_page(floor_port)
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
    if page is not None:
        report_the_page(page)
    for process, _ in servers:
        process.terminate()
    floor.terminate()
    redis.terminate()


if __name__ == "__main__":
    main()
