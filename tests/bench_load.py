"""Load benchmark: N simulated calls at 50 media messages a second, against our server and its peers.

    python -m tests.bench_load --calls 50,300 --seconds 20 --repeat 2 --vs node,asyncio,tutorial
    python -m tests.bench_load --calls 600,900,1200,1500 --seconds 15 --ours="--max-streams 5000" --vs node

Run by hand (pytest does not collect it). For each server it starts the server (pinned to
one core, the client to another: --pin), and for each count of --calls opens N calls, sends
`connected`, `start`, one 160-byte media message per call every 20 ms for S seconds, then
`stop`, and reports:
  - delivery latency p50/p99/max, each chunk's send to the server handling it (our
    on_audio() through tests/bench_stream.py, the peers' handlers; both write their arrival
    times to ARRIVALS_DIR), and the chunks that never arrived;
  - server CPU microseconds per message, from /proc/PID/stat (children included), over the
    streaming phase;
  - the delay between a call's `stop` and the server closing it, p50/p99/max;
  - handshake failures and streams cut before their `stop`;
  - for our server, whether every stream's summary line shows the exact count sent;
  - resident memory: idle, with all calls open, after they end (per round, --rounds);
  - how late the client itself sent against its schedule: a round more than 10 ms late at
    p99 is flagged, its latencies being partly the client's;
  - with several counts, the largest each server carried with p99 under 200 ms and nothing
    lost, failed, cut or miscounted (its capacity).
The load client is one thread with pre-framed messages (the payload is masked with a zero
key, legal and free), so it leaves the server its core; its own CPU is shown.

    python -m tests.bench_load --echo --calls 300 --seconds 10 --vs node

--echo benchmarks a server that talks back (a <Connect><Stream>): our app.py gets --echo, the
Node peer is ws_node_echo_server.js (the other peers have no echo variant). Chunk k of every
call carries k in its first bytes, so each echo names the chunk it plays back, and it reports
besides the above:
  - the round trip of each chunk, from its send to its echo's arrival: p50, p99, max;
  - chunks lost (never echoed), reordered (echoed after a later one, or twice), corrupt (not
    a chunk of this call's);
  - how late the client itself sent against its 20 ms schedule: a client behind it adds its
    lateness to the round trips, and the round is flagged;
  - for our server, summaries must show media=<sent> and sent=<sent>/<seconds>s.

Peers come from tests/peers/ and get their dependencies in a scratch folder outside the
repository (npm's `ws`, a venv with `websockets`, a venv with the tutorial's stack), made on
first use under $BENCH_PEERS_DIR (default /tmp/mediastreams-bench-peers).
"""
import argparse
import base64
import functools
import json
import math
import os
import re
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

from tests.conftest import ZERO_MASK, free_port, rss_mib, text_frame
from tests.twilio_sim import WSClient, frame

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(os.environ.get("PEERS_SRC", ROOT / "tests" / "peers"))
PEERS_DIR = Path(os.environ.get("BENCH_PEERS_DIR", "/tmp/mediastreams-bench-peers"))
TICK = os.sysconf("SC_CLK_TCK")
PAYLOAD = base64.b64encode(bytes(range(0, 160))).decode()  # varied bytes: a level meter has work to do


CLOSE_REPLY = frame(0x8, b"\x03\xe8", mask=ZERO_MASK)  # 1000


MEDIA = ('{"event":"media","sequenceNumber":"%d","streamSid":"%s","media":{"track":"inbound",'
         '"chunk":"%d","timestamp":"%d","payload":"' + PAYLOAD + '"}}')
ECHO_MEDIA = ('{"event":"media","sequenceNumber":"%d","streamSid":"%s","media":{"track":"inbound",'
              '"chunk":"%d","timestamp":"%d","payload":"%s"}}')
ECHO_PEERS = {"node": "ws_node_echo_server.js"}  # the peers that can play the audio back
LATE_MS = 10  # a client whose p99 lateness is beyond this skews the round trips it measures


@functools.lru_cache(maxsize=None)
def echo_payloads(count: int) -> tuple[list[str], dict[bytes, int]]:
    """The base64 payload of chunk k (k in its first 4 bytes, so its echo says which chunk it
    is) and the way back from a payload to k: made once and shared by every call, so the
    client spends no CPU encoding or decoding audio."""
    payloads = [base64.b64encode(k.to_bytes(4, "big") + bytes(range(4, 160))).decode() for k in range(count)]
    return payloads, {payload.encode(): k for k, payload in enumerate(payloads)}


# --- servers --------------------------------------------------------------------------------

def run(command, **kwargs):
    print("  $", " ".join(map(str, command)), file=sys.stderr)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, **kwargs)


def peer_command(name: str, port: int, echo: bool = False) -> list[str]:
    """The command line of a peer server (its echo variant with `echo`), installing its
    dependencies on first use."""
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    if name == "node":
        folder = PEERS_DIR / "node"
        if not (folder / "node_modules" / "ws").exists():
            folder.mkdir(exist_ok=True)
            run(["npm", "install", "--silent", "--no-audit", "--no-fund", "ws@8"], cwd=folder)
        return ["node", str(PEERS / (ECHO_PEERS["node"] if echo else "ws_node_server.js")), str(port)]
    packages = {"asyncio": ["websockets"],
                "tutorial": ["flask", "flask-sockets", "gevent", "gevent-websocket"]}[name]
    venv = PEERS_DIR / f"venv-{name}"
    if not (venv / "bin" / "python").exists():
        run([sys.executable, "-m", "venv", str(venv)])
        run([str(venv / "bin" / "pip"), "install", "-q", *packages])
    script = {"asyncio": "ws_asyncio_server.py", "tutorial": "tutorial_like_server.py"}[name]
    return [str(venv / "bin" / "python"), str(PEERS / script), str(port)]


def start_server(name: str, log_path: Path, extra: list[str], echo: bool = False,
                 server_cpu: int | None = None, arrivals_dir: Path | None = None) -> tuple[subprocess.Popen, int]:
    """Start one server; with `arrivals_dir`, it writes each stream's arrival times there
    (ours through tests/bench_stream.py, the peers by themselves)."""
    port = free_port()
    if name == "ours":
        command = [sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port), *extra]
    else:
        command = peer_command(name, port, echo)
    env = {k: v for k, v in os.environ.items() if k not in ("TWILIO_AUTH_TOKEN", "STREAM_CLASS")}
    env["NODE_PATH"] = str(PEERS_DIR / "node" / "node_modules")  # the peer script lives elsewhere
    if arrivals_dir is not None:
        env["ARRIVALS_DIR"] = str(arrivals_dir)
        if name == "ours":
            env["STREAM_CLASS"] = "tests.bench_stream:ArrivalTimes"
    process = subprocess.Popen(command, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env,
                               preexec_fn=(lambda: os.sched_setaffinity(0, {server_cpu})) if server_cpu is not None else None)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            if process.poll() is not None:
                raise SystemExit(f"{name} exited at start-up:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.05)
    raise SystemExit(f"{name} did not listen on port {port} within 30 s")


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICK


# --- the load -------------------------------------------------------------------------------

class Stream:
    def __init__(self, n: int, port: int):
        self.sid = f"MZ{os.getpid():08x}{n:024x}"
        self.client = WSClient(f"ws://127.0.0.1:{port}/media", timeout=30)
        self.sock = self.client.sock
        self.sent = 0
        self.sequence = 0
        self.stopped_at = None
        self.closed_at = None
        self.cut = False
        self.sent_at = []  # monotonic time of each media sent, by chunk index
        # --echo only: what the server sent back
        self.sid_bytes = self.sid.encode()
        self.buffer = b""  # the start of a frame still arriving
        self.echoed = set()  # chunk indexes echoed
        self.next_k = 0  # one past the highest chunk echoed so far
        self.round_trips = []  # seconds
        self.reordered = self.corrupt = self.marks = 0

    def send(self, text: str) -> None:
        self.sequence += 1
        self.sock.sendall(text_frame(text))


def ready_reads(selector, timeout: float):
    """(stream, what was read) for each stream with something to read; b"" for EOF or a reset."""
    for key, _ in selector.select(timeout=timeout):
        try:
            data = key.data.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            data = b""
        yield key.data, data


def read_closes(selector, timeout: float) -> int:
    """How many streams the server closed (a close frame, or EOF) among those it has written
    to; each is answered with a close frame and closed, as Twilio closes after `stop`."""
    closed = 0
    for s, data in ready_reads(selector, timeout):
        if not data or b"\x88" in data[:2]:
            close_stream(selector, s)
            closed += 1
    return closed


def close_stream(selector, s: Stream) -> None:
    """The server closed `s`: answered with a close frame and closed, as Twilio closes after `stop`."""
    s.closed_at = time.monotonic()
    s.cut |= s.stopped_at is None
    selector.unregister(s.sock)
    try:
        s.sock.send(CLOSE_REPLY)
    except OSError:
        pass
    s.sock.close()


def read_echoes(selector, timeout: float, index_of: dict[bytes, int]) -> int:
    """read_closes() for a server that talks back, where a close frame comes after the echoes:
    each stream's bytes are split into frames (one may span reads), each text frame taken by
    take_echo(), a close frame or EOF ends the stream. The arrival time is the read's: a
    client slow to read adds to the round trips, as it adds to its own send lateness."""
    closed = 0
    for s, data in ready_reads(selector, timeout):
        arrived = time.monotonic()
        if data:
            frames, used = parse_frames(s.buffer + data if s.buffer else data)
            s.buffer = (s.buffer + data)[used:] if s.buffer else data[used:]
        else:
            frames = [(0x8, b"")]  # EOF: closed without a close frame
        for opcode, payload in frames:
            if opcode == 0x8:
                close_stream(selector, s)
                closed += 1
                break
            if opcode == 0x1:
                take_echo(s, payload, arrived, index_of)
            else:  # binary, fragments, pings: nothing a server of ours or Node's sends
                s.corrupt += 1
    return closed


def parse_frames(buffer: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """(opcode, payload) of each whole frame at the start of `buffer` (a server's: unmasked)
    and the bytes they take; the rest is a frame still arriving. twilio_sim.read_frames()
    copies the rest after each frame: quadratic on a 64 KiB read of 300-byte frames."""
    frames, position, size = [], 0, len(buffer)
    while size - position >= 2:
        length, start = buffer[position + 1] & 0x7F, position + 2
        if length >= 126:
            start += 2 if length == 126 else 8
            if size < start:
                break
            length = int.from_bytes(buffer[position + 2:start], "big")
        if size < start + length:
            break
        frames.append((buffer[position] & 0x0F, buffer[start:start + length]))
        position = start + length
    return frames, position


def take_echo(s: Stream, text: bytes, arrived: float, index_of: dict[bytes, int]) -> None:
    """One text message from the server: the echo of chunk k (its round trip, and whether it
    came in order), a mark (counted, never sent back: this client plays no audio, so it has
    no moment to echo it at), or anything else (corrupt)."""
    event, payload = event_and_payload(text)
    if event == "mark":
        s.marks += 1
        return
    k = index_of.get(payload) if event == "media" else None
    if k is None or k >= len(s.sent_at) or s.sid_bytes not in text:
        s.corrupt += 1  # not a chunk this call sent, or not for this stream
    elif k in s.echoed or k < s.next_k:
        s.reordered += 1  # a second time, or after a later chunk: too late to be played in order
        if k not in s.echoed:
            s.echoed.add(k)
            s.round_trips.append(arrived - s.sent_at[k])
    else:
        s.echoed.add(k)
        s.next_k = k + 1
        s.round_trips.append(arrived - s.sent_at[k])


def event_and_payload(text: bytes) -> tuple[str | None, bytes | None]:
    """The event of a server's message and its media payload: a substring search on the
    compact JSON both servers write (json.loads on 15,000 echoes a second would cost the
    client more than the server it measures), json.loads for anything else."""
    if text.startswith(b'{"event":"media"'):
        at = text.find(b'"payload":"')
        if at >= 0:
            return "media", text[at + 11:text.find(b'"', at + 11)]
    try:
        message = json.loads(text)
        payload = message["media"]["payload"] if message.get("event") == "media" else None
        return message.get("event"), payload.encode() if isinstance(payload, str) else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None, None


def percentile(values: list[float], q: float) -> float:
    """The q-quantile of sorted `values`, as the stop-to-close figures take it; nan if none."""
    return values[int(q * (len(values) - 1))] if values else float("nan")


def lateness_figures(streams: list[Stream], start: float, offsets: list[float]) -> dict:
    """How late the client sent against its own 20 ms schedule (ms): a client behind it
    measures its own lateness, not the server's."""
    lateness = sorted((sent_at - start - k * 0.020 - offset) * 1000
                      for s, offset in zip(streams, offsets) for k, sent_at in enumerate(s.sent_at))
    return {"late_p99": percentile(lateness, 0.99), "late_max": lateness[-1] if lateness else float("nan")}


def echo_figures(streams: list[Stream]) -> dict:
    """Round trips (ms), chunks lost, reordered, corrupt. A round trip counts from the actual
    send, but a client behind its schedule is also late reading the echoes: its lateness says
    how far to trust the figures."""
    round_trips = sorted(rt * 1000 for s in streams for rt in s.round_trips)
    return {"rtt_p50": percentile(round_trips, 0.50), "rtt_p99": percentile(round_trips, 0.99),
            "rtt_max": round_trips[-1] if round_trips else float("nan"),
            "lost": sum(s.sent - len(s.echoed) for s in streams),
            "reordered": sum(s.reordered for s in streams), "corrupt": sum(s.corrupt for s in streams),
            "marks": sum(s.marks for s in streams)}


def delivery_figures(streams: list[Stream], arrivals_dir: Path) -> dict:
    """Delivery latency (ms), from each chunk's send to the server handling it (our
    on_audio(), a peer's message handler), from the arrival times the server wrote, and the
    chunks that never arrived. Both sides read CLOCK_MONOTONIC."""
    latencies, lost = [], 0
    for s in streams:
        path = arrivals_dir / f"{s.sid}.bin"
        arrivals = array("d")
        if path.exists():
            arrivals.frombytes(path.read_bytes())
            path.unlink()
        arrived = {round(arrivals[i]) // 20 - 1: arrivals[i + 1] for i in range(0, len(arrivals), 2)}
        lost += sum(1 for k in range(s.sent) if k not in arrived)
        latencies += [(arrived[k] - sent_at) * 1000 for k, sent_at in enumerate(s.sent_at) if k in arrived]
    latencies.sort()
    return {"delivery_p50": percentile(latencies, 0.50), "delivery_p99": percentile(latencies, 0.99),
            "delivery_max": latencies[-1] if latencies else float("nan"), "lost": lost}


def one_round(port: int, pid: int, calls: int, seconds: float, echo: bool = False,
              arrivals_dir: Path | None = None) -> dict:
    streams, failures = [], 0
    for n in range(calls):
        try:
            streams.append(Stream(n, port))
        except Exception as exc:  # counted, and the first ones are shown
            failures += 1
            if failures <= 3:
                print(f"  handshake failed: {exc}", file=sys.stderr)
    for s in streams:
        s.send('{"event":"connected","protocol":"Call","version":"1.0.0"}')
        s.send(json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": s.sid, "start": {
            "streamSid": s.sid, "accountSid": "AC" + "0" * 32, "callSid": "CA" + s.sid[2:],
            "tracks": ["inbound"], "customParameters": {},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}))
        s.sequence = 1
    selector = selectors.DefaultSelector()
    for s in streams:
        s.sock.setblocking(False)
        selector.register(s.sock, selectors.EVENT_READ, s)

    per_call = int(seconds * 50)
    count = len(streams)
    payloads, index_of = echo_payloads(per_call)
    read = functools.partial(read_echoes, index_of=index_of) if echo else read_closes
    cpu_start, wall_start = cpu_seconds(pid), time.monotonic()
    client_cpu_start = time.process_time()
    start = time.monotonic() + 0.1
    # call i sends its k-th media at start + k*20ms + i*(20ms/count): spread evenly in time
    offsets = [i * 0.020 / max(count, 1) for i in range(count)]
    peak_rss, next_rss_at = 0.0, start
    open_count = count
    # Sends come due in the order (chunk k, call i), k = per_call being the stop: walk that
    # order with one position, rather than look at every call on every turn (that loop cost
    # the client 13 µs a message and held it below 1000 calls).
    position, last = 0, (per_call + 1) * count
    while position < last:
        now = time.monotonic()
        while position < last:
            k, i = divmod(position, count)
            if start + k * 0.020 + offsets[i] > now:
                break
            position += 1
            s = streams[i]
            if s.cut:
                continue
            try:
                if k < per_call:
                    sent_at = time.monotonic()
                    if echo:
                        s.send(ECHO_MEDIA % (s.sequence + 1, s.sid, k + 1, 20 * (k + 1), payloads[k]))
                    else:
                        s.send(MEDIA % (s.sequence + 1, s.sid, k + 1, 20 * (k + 1)))
                    s.sent_at.append(sent_at)
                    s.sent += 1
                else:
                    s.send(json.dumps({"event": "stop", "sequenceNumber": str(s.sequence + 1),
                                       "streamSid": s.sid, "stop": {}}))
                    s.stopped_at = time.monotonic()
            except OSError:
                s.cut = True
        if position < last:
            k, i = divmod(position, count)
            open_count -= read(selector, min(0.002, max(0.0, start + k * 0.020 + offsets[i] - time.monotonic())))
        if now >= next_rss_at:
            peak_rss, next_rss_at = max(peak_rss, rss_mib(pid)), now + 0.5
    deadline = time.monotonic() + 10
    while open_count and time.monotonic() < deadline:
        open_count -= read(selector, 0.05)
    cpu = cpu_seconds(pid) - cpu_start
    wall = time.monotonic() - wall_start
    client_cpu = time.process_time() - client_cpu_start
    for s in streams:
        s.sock.close()
    messages = sum(s.sent + 1 for s in streams)  # media + stop
    delays = sorted((s.closed_at - s.stopped_at) * 1000 for s in streams
                    if s.closed_at is not None and s.stopped_at is not None)
    never_closed = sum(1 for s in streams if s.closed_at is None)
    result = {"streams": streams, "failures": failures, "messages": messages, "cpu": cpu, "wall": wall,
              "client_cpu": client_cpu, "us_per_message": cpu / max(messages, 1) * 1e6,
              "worst_ms": delays[-1] if delays else float("nan"),
              "p99_ms": percentile(delays, 0.99), "p50_ms": percentile(delays, 0.50),
              "cut": sum(s.cut for s in streams) + never_closed, "peak_rss": peak_rss}
    result.update(lateness_figures(streams, start, offsets))
    if echo:
        result.update(echo_figures(streams))
    if arrivals_dir is not None:
        result.update(delivery_figures(streams, arrivals_dir))
    elif not echo:  # --plain: nothing notes the arrivals
        result.update(delivery_p50=math.nan, delivery_p99=math.nan, delivery_max=math.nan, lost=0)
    return result


def check_summaries(log_path: Path, streams: list[Stream], echo: bool = False) -> tuple[int, int]:
    """(exact, wrong) summary counts for our server's log, once every stream has its
    summary line (or 10 s have passed). With `echo`, a summary is exact when it counts every
    chunk both ways: media=<sent> and sent=<sent>/<seconds>s."""
    deadline = time.monotonic() + 10
    while True:
        found = {sid: (media, played_back) for sid, media, played_back in re.findall(
            r"summary stream=(\S+) .*? media=(\d+)(?:.*? sent=(\S+))?", log_path.read_text())}
        if all(s.sid in found for s in streams) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    exact = sum(1 for s in streams if found.get(s.sid, (None,))[0] == str(s.sent) and (
        not echo or found[s.sid][1] == f"{s.sent}/{s.sent * 0.020:.2f}s"))
    return exact, len(streams) - exact


def open_sockets(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except FileNotFoundError:  # closed since the listing
            pass
    return count


def wait_for_sockets(pid: int, count: int, timeout: float = 10.0) -> None:
    """Until the server holds no more than `count` sockets: every connection it had is gone."""
    deadline = time.monotonic() + timeout
    while open_sockets(pid) > count and time.monotonic() < deadline:
        time.sleep(0.05)


def bench(name: str, args, ours_args: list[str] = ()) -> dict:
    """One server process through every count of --calls, --rounds rounds each."""
    folder = Path(tempfile.mkdtemp(prefix="bench-"))
    log_path, arrivals_dir = folder / "server.log", None if args.echo or args.plain else folder / "arrivals"
    if arrivals_dir:
        arrivals_dir.mkdir()
    process, port = start_server(name, log_path, list(ours_args), args.echo, args.server_cpu, arrivals_dir)
    name = " ".join(["ours", *ours_args]) if name == "ours" else name
    try:
        idle = rss_mib(process.pid)
        idle_sockets = open_sockets(process.pid)
        rounds = []
        for calls in args.calls:
            for r in range(args.rounds):
                result = one_round(port, process.pid, calls, args.seconds, args.echo, arrivals_dir)
                result["calls"], result["round"] = calls, r + 1
                if name.startswith("ours"):
                    result["exact"], result["wrong"] = check_summaries(log_path, result["streams"], args.echo)
                wait_for_sockets(process.pid, idle_sockets)
                result["after_rss"] = rss_mib(process.pid)
                rounds.append(result)
                late = f"client late p99/max {result['late_p99']:.1f}/{result['late_max']:.0f} ms"
                print(f"  {name}, {calls} calls, round {r + 1}: {result['us_per_message']:.1f} us/msg, "
                      f"worst stop-to-close {result['worst_ms']:.0f} ms, RSS {result['peak_rss']:.0f} MiB peak, "
                      f"{result['after_rss']:.0f} MiB after, {late}", file=sys.stderr)
                if args.echo:
                    print(f"    round trip p50/p99/max {result['rtt_p50']:.1f}/{result['rtt_p99']:.1f}/"
                          f"{result['rtt_max']:.0f} ms, lost {result['lost']}, reordered {result['reordered']}, "
                          f"corrupt {result['corrupt']}, marks {result['marks']}", file=sys.stderr)
                else:
                    print(f"    delivery p50/p99/max {result['delivery_p50']:.1f}/{result['delivery_p99']:.1f}/"
                          f"{result['delivery_max']:.0f} ms, lost {result['lost']}", file=sys.stderr)
        return {"name": name, "idle_rss": idle, "rounds": rounds, "log": log_path}
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def round_label(result: dict, r: dict, args) -> str:
    return (f"{result['name']}" + (f" [{result['repeat']}]" if args.repeat > 1 else "")
            + (f" #{r['round']}" if args.rounds > 1 else ""))


def common_cells(result: dict, r: dict) -> tuple:
    return (f"{r['us_per_message']:.1f}", f"{r['p50_ms']:.1f}/{r['p99_ms']:.0f}/{r['worst_ms']:.0f}", str(r["lost"]),
            f"{r['failures']}/{r['cut']}", f"{r['exact']}/{len(r['streams'])}" if "exact" in r else "n/a",
            f"{result['idle_rss']:.0f}/{r['peak_rss']:.0f}/{r['after_rss']:.0f}",
            f"{100 * r['client_cpu'] / r['wall']:.0f}", f"{r['late_p99']:.1f}/{r['late_max']:.0f}")


COMMON_HEADER = ("us CPU/msg", "stop->close p50/p99/max ms", "lost", "fails/cut", "exact summaries",
                 "RSS idle/peak/after MiB", "client CPU %", "client late p99/max ms")


def client_was_late(r: dict) -> bool:
    return not r["late_p99"] <= LATE_MS


def report(results: list[dict], args) -> None:
    print(f"{','.join(map(str, args.calls))} calls x {args.seconds:g} s at 50 media messages/s each, "
          f"{os.cpu_count()} cores, " + (f"server on CPU {args.server_cpu}, client on CPU {args.client_cpu}"
                                          if args.server_cpu is not None else "not pinned")
          + f", rounds={args.rounds}, repeat={args.repeat}")
    key = "rtt" if args.echo else "delivery"
    header = ("server", "calls", ("round trip" if args.echo else "delivery") + " p50/p99/max ms", *COMMON_HEADER)
    if args.echo:
        header += ("reordered", "corrupt")
    rows, late = [], []
    for calls in args.calls:
        for result in results:
            for r in result["rounds"]:
                if r["calls"] != calls:
                    continue
                row = (round_label(result, r, args), str(calls),
                       f"{r[key + '_p50']:.1f}/{r[key + '_p99']:.1f}/{r[key + '_max']:.0f}", *common_cells(result, r))
                rows.append(row + ((str(r["reordered"]), str(r["corrupt"])) if args.echo else ()))
                if client_was_late(r):
                    late.append(f"warning: {round_label(result, r, args)} at {calls} calls: the client sent "
                                f"{r['late_p99']:.1f} ms late at p99 ({r['late_max']:.0f} ms at worst) against its "
                                f"20 ms schedule: its latencies include the client's own lateness")
    print_table(header, rows)
    for line in late:
        print(line)
    for calls in args.calls:
        for ours, node in beside_node(results, calls):
            cpu, p50, p99 = (statistics.median(r[k] for r in ours) for k in ("us_per_message", key + "_p50",
                                                                            key + "_p99"))
            node_cpu, node_p50, node_p99 = (statistics.median(r[k] for r in node) for k in (
                "us_per_message", key + "_p50", key + "_p99"))
            close_p50, close_p99 = (statistics.median(r[k] for r in ours) for k in ("p50_ms", "p99_ms"))
            node_close_p50, node_close_p99 = (statistics.median(r[k] for r in node) for k in ("p50_ms", "p99_ms"))
            met = p50 <= node_p50 + 5 and p99 <= node_p99 + 20 and all(r["lost"] == 0 for r in ours)
            closes_met = close_p50 <= node_close_p50 + 5 and close_p99 <= node_close_p99 + 20
            print(f"{calls} calls, {ours[0]['server']} / node: CPU per message {cpu / node_cpu:.2f}x "
                  f"({cpu:.1f} vs {node_cpu:.1f} us; target <= 1.5x), {key} p50 {p50:.1f} vs {node_p50:.1f} ms, "
                  f"p99 {p99:.1f} vs {node_p99:.1f} ms (target: node + 5 / + 20 ms, nothing lost: "
                  f"{'met' if met else 'MISSED'}), stop->close p50 {close_p50:.1f} vs {node_close_p50:.1f} ms, "
                  f"p99 {close_p99:.0f} vs {node_close_p99:.0f} ms ({'met' if closes_met else 'MISSED'})")
    if len(args.calls) > 1:
        for name in dict.fromkeys(result["name"] for result in results):
            rounds = [r for result in results if result["name"] == name for r in result["rounds"]]
            print(f"capacity of {name}: {capacity(rounds, key)}")


def beside_node(results: list[dict], calls: int):
    """(rounds of a run of ours, Node's rounds) at `calls`, for each run of ours, if Node ran."""
    def at(result):
        return [{**r, "server": result["name"]} for r in result["rounds"] if r["calls"] == calls]
    node = [r for result in results if result["name"] == "node" for r in at(result)]
    names = dict.fromkeys(result["name"] for result in results if result["name"].startswith("ours"))
    for name in names:
        ours = [r for result in results if result["name"] == name for r in at(result)]
        if node and ours:
            yield ours, node


def capacity(rounds: list[dict], key: str) -> str:
    """The largest count of calls whose every round had p99 latency under 200 ms, nothing
    lost, failed, cut or miscounted, with a client on schedule."""
    by_calls: dict[int, list[dict]] = {}
    for r in rounds:
        by_calls.setdefault(r["calls"], []).append(r)
    carried, note = None, ""
    for calls, rounds in sorted(by_calls.items()):
        if any(client_was_late(r) for r in rounds):
            note = f" (from {calls} calls on, the client fell behind: not measured)"
            break
        if all(r[key + "_p99"] < 200 and r["lost"] == r["failures"] == r["cut"] == r.get("wrong", 0) == 0
               for r in rounds):
            carried = calls
        else:
            note = (f" ({calls} did not: p99 {max(r[key + '_p99'] for r in rounds):.0f} ms, lost "
                    f"{sum(r['lost'] for r in rounds)}, failed/cut {sum(r['failures'] for r in rounds)}/"
                    f"{sum(r['cut'] for r in rounds)}, wrong summaries {sum(r.get('wrong', 0) for r in rounds)})")
            break
    return (f"{carried} calls" if carried else "none of the counts tried") + note


def print_table(header: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", default="300",
                        help="calls at once; several, e.g. 300,600,900, find the capacity (default 300)")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=1, help="rounds against the same server process")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every server this many times, interleaved (ours, peers, ours, peers...)")
    parser.add_argument("--vs", default="", help="peers to run in the same session: node,asyncio,tutorial")
    parser.add_argument("--ours", action="append", metavar="FLAGS",
                        help='flags for one run of our app.py; repeat for several, e.g. --ours="" '
                             '--ours="--quiet-levels" (default: one run, no flags); "none": skip')
    parser.add_argument("--echo", action="store_true",
                        help="servers that play each chunk back (our --echo, Node's echo peer): round trips")
    parser.add_argument("--plain", action="store_true",
                        help="our server with its own MediaStream, not tests/bench_stream.py's on_audio() class, "
                             "and the peers: CPU and closing only, no delivery figures (nothing notes arrivals)")
    parser.add_argument("--pin", default="1,0" if len(os.sched_getaffinity(0)) >= 2 else "no",
                        help="SERVER,CLIENT: the CPUs the server and this client run on, as taskset -c "
                             "(default 1,0 on two cores or more); no: not pinned")
    args = parser.parse_args(argv)
    args.calls = [int(n) for n in args.calls.split(",")]
    args.server_cpu = args.client_cpu = None
    if args.pin != "no":
        args.server_cpu, args.client_cpu = map(int, args.pin.split(","))
        os.sched_setaffinity(0, {args.client_cpu})  # the servers get theirs at start
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a socket per call, here and in the peers
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    peers = [name for name in args.vs.split(",") if name]
    if args.echo and any(name not in ECHO_PEERS for name in peers):
        raise SystemExit(f"--echo: {', '.join(name for name in peers if name not in ECHO_PEERS)} has no echo "
                         f"variant; only {', '.join(ECHO_PEERS)} can run with --echo (--vs node)")
    variants = [flags.split() + (["--echo"] if args.echo else []) for flags in (args.ours or [""]) if flags != "none"]
    results = []
    for repeat in range(1, args.repeat + 1):
        for name, flags in [("ours", flags) for flags in variants] + [(name, []) for name in peers]:
            results.append({**bench(name, args, flags), "repeat": repeat})
    print()
    report(results, args)


if __name__ == "__main__":
    main()
