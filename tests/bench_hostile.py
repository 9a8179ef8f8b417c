"""What one hostile or Twilio-like client costs everyone else: a figure for each case.

    python -m tests.bench_hostile                      # every case, against ./app.py
    python -m tests.bench_hostile close ping-flood     # only these
    python -m tests.bench_hostile --app /tmp/old/app.py --seconds 10

Run by hand (pytest does not collect it; tests/test_fairness.py checks the same cases with
generous bounds). Each case starts its own `python app.py` on a free port and prints one
line of figures:
  close        --calls calls (300) that end at once as Twilio ends them, `stop` and the close
               frame in one TCP segment: how long until the server drops TCP (p50/p99/max),
               also for the peers of --vs (node)
  <kind>-flood one client floods pings, marks, unknown events, invalid JSON or media and
               never reads, for --seconds; meanwhile a new call connects and a short call
               runs, again and again: the slowest handshake and the slowest short call, the
               server's RSS at its peak and after the flood
  unix-flood   a mark flood through a unix socket (gunicorn -b unix:, as behind nginx), with
               the same probes
  echo-flood   the same with --echo and media: RSS, how much the server took, how it ended
  marks        --echo, a client that reads but never echoes marks, --marks seconds of audio
               (10,000 marks outstanding), then 20,000 mark echoes of unknown names: the time
               they take
  jump         a real-time call of 4 s with --record, one chunk's timestamp 10^9 ms ahead:
               how long the recording is, and what the server said
  pong-order   --echo, a media message in two fragments with a ping between them: what the
               server sends first
"""
import argparse
import functools
import multiprocessing
import os
import re
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.bench_load import MEDIA, PEERS_DIR, peer_command
from tests.conftest import LISTENING, ROOT, ZERO_MASK, clean_environment, free_port, rss_mib, text_frame
from tests.twilio_sim import CHUNK, Call, WSClient, frame

SILENCE = b"\xff" * CHUNK


class Server:
    def __init__(self, app_path, *args, folder):
        self.log_path = Path(folder) / f"server-{time.monotonic_ns()}.log"
        self.process = subprocess.Popen([sys.executable, str(app_path), "--host", "127.0.0.1", "--port", "0", *args],
                                        cwd=Path(app_path).parent, env=clean_environment(),
                                        stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)
        self.port = int(self.wait_for(LISTENING).group(1))
        self.url = f"ws://127.0.0.1:{self.port}/media"

    def log(self):
        return self.log_path.read_text()

    def wait_for(self, pattern, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log())
            if found:
                return found
            time.sleep(0.02)
        raise SystemExit(f"no {pattern!r} in the server's log:\n{self.log()[-2000:]}")

    def rss(self):
        return rss_mib(self.process.pid)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def closed_after(sock, timeout=10.0):
    """Seconds until the server drops the connection (EOF or reset), reading what it sends."""
    started = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
    return time.monotonic() - started


def close_waits(url, calls):
    """`calls` calls opened at once, then all ended as Twilio ends them, `stop` and the close
    frame in one segment: the milliseconds from that segment to the server dropping TCP."""
    clients = [WSClient(url) for _ in range(calls)]
    for client in clients:
        call = Call()
        client.send_all(call.session(media=5))
        client.ending = frame(0x1, call.stop().encode()) + frame(0x8, struct.pack("!H", 1000))
    time.sleep(0.5)
    selector, waits, sent_at = selectors.DefaultSelector(), [], {}
    for client in clients:
        client.sock.setblocking(False)
        selector.register(client.sock, selectors.EVENT_READ, client)
        sent_at[client] = time.monotonic()
        client.sock.send(client.ending)
    deadline = time.monotonic() + 30
    while len(waits) < calls and time.monotonic() < deadline:
        for key, _ in selector.select(1):
            try:
                data = key.fileobj.recv(65536)
            except ConnectionError:
                data = b""
            if not data:
                waits.append(1000 * (time.monotonic() - sent_at[key.data]))
                selector.unregister(key.fileobj)
                key.fileobj.close()
    return sorted(waits)


def case_close(app, folder, args):
    lines = []
    for name in ["ours", *args.vs]:
        if name == "ours":
            server = Server(app, "--quiet-levels", folder=folder)
            url, stop = server.url, server.stop
        else:
            port = free_port()
            process = subprocess.Popen(peer_command(name, port), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                       env={**os.environ, "NODE_PATH": str(PEERS_DIR / "node" / "node_modules")})
            time.sleep(1.0)
            url, stop = f"ws://127.0.0.1:{port}/media", process.terminate
        try:
            waits = close_waits(url, args.calls)
        finally:
            stop()
        lines.append(f"{name}: {args.calls} calls ending at once, stop and close frame in one segment: TCP dropped "
                     f"after p50 {statistics.median(waits):.1f} ms, p99 {waits[int(0.99 * (len(waits) - 1))]:.1f} ms, "
                     f"max {waits[-1]:.1f} ms")
    return "; ".join(lines)


class Flood:
    """Framed messages of one kind, made cheaply (a zero mask, a template), as many as asked."""

    def __init__(self, kind, stream_sid):
        self.kind, self.stream_sid, self.sequence = kind, stream_sid, 10

    def next_bytes(self, size=65536):
        parts, length = [], 0
        while length < size:
            self.sequence += 1
            n = self.sequence
            if self.kind == "ping":
                part = frame(0x9, b"", mask=ZERO_MASK)
            else:
                text = {"mark": MARK, "unknown": UNKNOWN, "invalid-json": "{not json %d %s",
                        "media": MEDIA}[self.kind]
                part = text_frame(text % ((n, self.stream_sid) if self.kind != "media" else (n, self.stream_sid, n, 20 * n)))
            parts.append(part)
            length += len(part)
        return b"".join(parts)


MARK = '{"event":"mark","sequenceNumber":"%d","streamSid":"%s","mark":{"name":"never-sent"}}'
UNKNOWN = '{"event":"custom","sequenceNumber":"%d","streamSid":"%s"}'


def flood(url, kind, seconds, results):
    """A client of its own process that sends `kind` as fast as the socket takes it and never
    reads, for `seconds`: the bytes it sent, and how it ended, go to `results`."""
    client, call = WSClient(url), Call()
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)  # ahead of the server: it always has more to read
    client.send_all(call.session(media=1))
    results.put(call.stream_sid)
    client.sock.settimeout(1.0)
    messages, sent, ended = Flood(kind, call.stream_sid), 0, "still open"
    # The same MiB again and again (as fast as the kernel copies it), but media, which must be new
    # to be handled (a repeated sequenceNumber is a duplicate, dropped)
    block = None if kind == "media" else messages.next_bytes(1 << 20)
    next_bytes = messages.next_bytes if block is None else lambda: block
    deadline = time.monotonic() + seconds
    pending = memoryview(next_bytes())
    while time.monotonic() < deadline:
        try:
            n = client.sock.send(pending)  # send, not sendall: a timeout must not cut a frame in two
        except TimeoutError:
            continue  # the server is not reading: back-pressure
        except OSError:
            ended = "dropped by the server"
            break
        sent += n
        pending = pending[n:] if n < len(pending) else memoryview(next_bytes())
    results.put((sent, ended))


def probe_calls(server, stop, handshakes, calls):
    """New calls, one after another, while a flood runs: handshake and whole-call times."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            client = WSClient(server.url, timeout=20)
            handshakes.append(time.monotonic() - started)
            call = Call()
            client.send_all(call.session(media=5, stop=True))
            client.wait_closed(20)
            calls.append(time.monotonic() - started)
        except OSError as exc:
            handshakes.append(float("inf"))
            print(f"  probe failed: {exc}", file=sys.stderr)
        time.sleep(0.2)


def run_flood(app, folder, args, kind, flags=()):
    server = Server(app, "--quiet-levels", *flags, folder=folder)
    handshakes, calls, rss = [], [], [server.rss()]
    idle = rss[0]
    stop, results = threading.Event(), multiprocessing.Queue()
    try:
        flooder = multiprocessing.Process(target=flood, args=(server.url, kind, args.seconds, results))
        flooder.start()
        stream_sid = results.get(timeout=10)
        time.sleep(0.5)
        prober = threading.Thread(target=probe_calls, args=(server, stop, handshakes, calls), daemon=True)
        prober.start()
        while flooder.is_alive():
            time.sleep(0.25)
            rss.append(server.rss())
        sent, ended = results.get(timeout=10)
        stop.set()
        prober.join(30)
        flooder.join()
        time.sleep(1)
        after = server.rss()
        late = [int(m) for m in re.findall(r"event loop (\d+) ms late", server.log())]
        summary = re.search(rf"summary stream={stream_sid} .*? ended=(\w+).*? media=(\d+)", server.log())
    finally:
        server.stop()
    flood_ended = f"ended={summary.group(1)} media={summary.group(2)}" if summary else ended
    return (f"{kind} flood for {args.seconds:g} s: slowest handshake {1000 * max(handshakes, default=0):.0f} ms, "
            f"slowest short call {1000 * max(calls, default=float('inf')):.0f} ms ({len(calls)} calls); "
            f"RSS {idle:.0f} -> peak {max(rss):.0f} -> after {after:.0f} MiB; "
            f"loop late at most {max(late, default=0)} ms; {sent >> 20} MiB sent; flooder: {flood_ended}")


def send_for_ever(sock, block):
    try:
        while True:
            sock.sendall(block)
    except OSError:
        pass


def case_unix_flood(app, folder, args):
    """A mark flood through a unix socket (gunicorn -b unix:, as behind nginx), never reading:
    there the socket never runs dry, so a server that reads while there is more never stops."""
    path = str(Path(folder) / "media.sock")
    log_path = Path(folder) / "gunicorn.log"
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-k", "app.GunicornWorker", "-b", f"unix:{path}",
                                "-w", "1", "--no-control-socket", "app:app"], cwd=Path(app).parent,
                               env=clean_environment({"QUIET_LEVELS": "1"}), stdout=open(log_path, "w"),
                               stderr=subprocess.STDOUT)
    handshakes, calls, flooder = [], [], None
    try:
        while "Booting worker" not in log_path.read_text():
            time.sleep(0.05)
        time.sleep(0.5)
        flooder, flooded = WSClient("ws://localhost/media", unix_socket=path), Call()
        flooder.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        flooder.send_all(flooded.session(media=1))
        block = Flood("mark", flooded.stream_sid).next_bytes(1 << 20)
        flooder.sock.settimeout(None)
        threading.Thread(target=lambda: send_for_ever(flooder.sock, block), daemon=True).start()
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                client, call = WSClient("ws://localhost/media", unix_socket=path, timeout=args.seconds), Call()
                handshakes.append(time.monotonic() - started)
                client.send_all(call.session(media=5, stop=True))
                client.wait_closed(args.seconds)
                calls.append(time.monotonic() - started)
            except OSError:
                handshakes.append(float("inf"))
            time.sleep(0.2)
    finally:
        if flooder:
            flooder.sock.shutdown(socket.SHUT_RDWR)
        process.send_signal(signal.SIGINT)  # gunicorn's quick stop
        process.wait(15)
    return (f"mark flood on a unix socket for {args.seconds:g} s: slowest handshake "
            f"{1000 * max(handshakes, default=0):.0f} ms, slowest short call {1000 * max(calls, default=float('inf')):.0f} "
            f"ms ({len(calls)} calls completed, {handshakes.count(float('inf'))} timed out)")


def case_echo_flood(app, folder, args):
    return run_flood(app, folder, args, kind="media", flags=("--echo",))


def case_marks(app, folder, args):
    server = Server(app, "--quiet-levels", "--echo", folder=folder)
    try:
        client, call = WSClient(server.url), Call()
        client.send_all(call.session())
        reader = threading.Thread(target=lambda: closed_after(client.sock, 600), daemon=True)
        reader.start()  # reads and drops all that is echoed: never echoes a mark
        for first in range(0, 50 * args.marks, 10_000):  # a mark every 50 chunks: --marks outstanding
            client.send_raw(b"".join(text_frame(call.media("inbound", SILENCE, 20 * (n + 1)))
                                     for n in range(first, first + 10_000)))
        client.send_raw(frame(0x1, call.dtmf("1").encode()))
        server.wait_for(rf"stream={call.stream_sid} dtmf digit=1", 600)
        marks = b"".join(frame(0x1, call.mark(f"unknown-{n}").encode()) for n in range(20_000))
        started = time.monotonic()
        client.send_raw(marks + frame(0x1, call.dtmf("2").encode()))
        server.wait_for(rf"stream={call.stream_sid} dtmf digit=2", 120)
        took = time.monotonic() - started
        client.send_raw(frame(0x1, call.stop().encode()))
        summary = server.wait_for(rf"summary stream={call.stream_sid} .*").group(0)
    finally:
        server.stop()
    outstanding = re.search(r"marks=(\d+)/", summary).group(1)
    return f"{outstanding} marks outstanding, 20,000 unknown mark echoes handled in {1000 * took:.0f} ms " \
           f"({1e6 * took / 20_000:.0f} us each)"


def case_jump(app, folder, args):
    record = Path(folder) / f"rec-{time.monotonic_ns()}"
    server = Server(app, "--quiet-levels", "--record", str(record), folder=folder)
    try:
        client, call = WSClient(server.url), Call()
        client.send_all(call.session())
        started = time.monotonic()
        for n in range(200):  # 4 s at real time
            timestamp = 20 * (n + 1) + (10 ** 9 if n == 100 else 0)
            client.send(call.media("inbound", SILENCE, timestamp))
            time.sleep(max(0.0, started + 0.02 * (n + 1) - time.monotonic()))
        client.send(call.stop())
        client.wait_closed()
        summary = server.wait_for(rf"summary stream={call.stream_sid} .*").group(0)
    finally:
        server.stop()
    recorded = re.search(r"recordings=\S+:([\d.]+)s", summary)
    said = [line.split(" ", 4)[-1] for line in server.log().splitlines() if "recording" in line and "summary" not in line]
    return f"4 s call, one timestamp 10^9 ms ahead: recorded {recorded.group(1) if recorded else '?'} s; " \
           f"the server said: {said or 'nothing'}"


def case_pong_order(app, folder, args):
    server = Server(app, "--quiet-levels", "--echo", folder=folder)
    try:
        client, call = WSClient(server.url), Call()
        client.send_all(call.session())
        server.wait_for(rf"stream={call.stream_sid} start")
        text = call.media("inbound", SILENCE, 20).encode()
        client.send_raw(frame(0x1, text[:50], fin=False) + frame(0x9, b"ping") + frame(0x0, text[50:]))
        client.sock.settimeout(5)
        first = client.recv_frame()
    finally:
        server.stop()
    return f"ping inside a fragmented media message: the server sent first {'the pong' if first[0] == 0xA else 'the echo'}"


CASES = {"close": case_close,
         **{f"{kind}-flood": functools.partial(run_flood, kind=kind)
            for kind in ("ping", "mark", "unknown", "invalid-json", "media")},
         "unix-flood": case_unix_flood, "echo-flood": case_echo_flood, "marks": case_marks, "jump": case_jump, "pong-order": case_pong_order}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cases", nargs="*", help=f"of {', '.join(CASES)} (default: all)")
    parser.add_argument("--app", default=str(ROOT / "app.py"), help="the app.py to run (default: this one)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each flood lasts (default 10)")
    parser.add_argument("--marks", type=int, default=10_000, help="marks: how many are outstanding (default 10,000)")
    parser.add_argument("--calls", type=int, default=300, help="close: calls ending at once (default 300)")
    parser.add_argument("--vs", type=lambda raw: raw.split(",") if raw else [], default=[],
                        help="close: peers to run the same against, e.g. node (tests/bench_load.py installs them)")
    parser.add_argument("--keep", action="store_true", help="keep each case's folder (the server's log) in /tmp")
    args = parser.parse_args(argv)
    for name in args.cases or CASES:
        folder = tempfile.mkdtemp(prefix=f"bench-hostile-{name}-")
        print(f"{name}: {CASES[name](args.app, folder, args)}", flush=True)
        if not args.keep:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
