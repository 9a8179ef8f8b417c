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

What each attack of the reliability campaign costs everyone else ("no client delays another
call by more than 0.5 s or grows the server by more than 100 MB"): beside each, --bystanders
(20) well-behaved real-time calls, driven from one thread, send a media message every 20 ms
and a ping after every 5th; each line gives their round trip (p50/p99/max), how far behind
the server was with them:
  webhook-fields  TWILIO_AUTH_TOKEN set, 4 clients POST unsigned forms of --fields (1,000) and
               3,800 fields (distinct names, 16 KiB at most) to /twiml for --seconds, a new
               connection each: the statuses, the time per request (p50/max)
  odd-sids     600 short calls of a SID with a space ("MZ<32 hex> x") and 4,000 parameters
               (--max-message-bytes 1 MiB, so that such a start is taken): the calls /calls
               still shows open and ended, RSS before -> peak -> after
  floor-bloat  250 open calls of 4,000 parameters and 500 key presses, then /calls again and
               again for 3 s (5 times at least): its size, its time (p50/max), the bystanders'
               round trip during the fetches, RSS
  lockout      FLOOR_TOKEN set, 64 idle connections to the floor and 8 to --metrics-port: how
               long /calls (with the token) and /metrics take to answer (15 s at most), and how
               many idle connections the server has closed after 12 s
  last-event-id  50 GET /events with a Last-Event-ID of 5,000 digits: the statuses, the lines
               (and tracebacks) the server's log grew by
  redis-entries  --redis-url (a redis-server of its own; skipped without one): 4 entries of
               the stream with wrong fields, 200 of 100 KB, then a valid start: /calls 5 times,
               whether the valid call is there, RSS, tracebacks
  stalls       the server started through a wrapper whose greenlet holds the event loop (a
               blocking sleep of --stall s, 0.45) every --stall-every s (1.0), for --seconds;
               also with --read-interval-ms 0: a call that fell behind by more than one stall
               shows in the max. --stall-every 0.001: stall upon stall, as four clients of
               1,000-field webhooks made them before (the loop goes round once between two)
"""
import argparse
import collections
import functools
import http.client
import itertools
import json
import multiprocessing
import os
import re
import selectors
import shutil
import signal
import socket
import statistics
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.bench_load import MEDIA, PEERS_DIR, peer_command
from tests.conftest import (LISTENING, ROOT, ZERO_MASK, Redis, clean_environment, free_port, rss_mib,
                            text_frame)
from tests.twilio_sim import CHUNK, Call, WSClient, as_signed, frame, parse_frame, signature

SILENCE = b"\xff" * CHUNK


class Server:
    """`python app.py ARGS` (or `command` ARGS) on a free port, with `env` added to its environment."""

    def __init__(self, app_path, *args, folder, env=None, command=None):
        self.log_path = Path(folder) / f"server-{time.monotonic_ns()}.log"
        self.process = subprocess.Popen([*(command or [sys.executable, str(app_path)]), "--host", "127.0.0.1",
                                         "--port", "0", *args],
                                        cwd=Path(app_path).parent, env=clean_environment(env),
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


# --- What a hostile client costs the calls beside it: 20 bystanders and their round trip ------

class Bystanders:
    """`count` well-behaved real-time calls, all driven from one thread (a thread each would add
    this process's GIL to what is measured): every 20 ms each call sends a media message, and
    after every 5th a ping whose payload is when it was sent. A pong's round trip is how far
    behind the server is with that call. A stall of ours is caught up (the messages missed are
    sent), never drifted. stop() ends the calls as Twilio does and returns the round trips (ms)."""

    def __init__(self, url, count=20, headers=None):
        self.url, self.count, self.headers = url, count, headers
        self.round_trips, self.pings, self.dropped = [], 0, 0
        self.running, self.sending = threading.Event(), threading.Event()
        self.clients, self.thread = [], None

    def start(self):
        for _ in range(self.count):
            client, call = WSClient(self.url, headers=self.headers, timeout=10), Call()
            client.send_all(call.session())
            client.call, client.sent, client.alive = call, 0, True
            self.clients.append(client)
        self.running.set()
        self.sending.set()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def run(self):
        selector, started = selectors.DefaultSelector(), time.monotonic()
        for n, client in enumerate(self.clients):
            client.first_at = started + 0.020 * n / len(self.clients)  # spread over the 20 ms
            selector.register(client.sock, selectors.EVENT_READ, client)
        while self.running.is_set():
            now = time.monotonic()
            for client in self.clients if self.sending.is_set() else ():
                while client.alive and client.first_at + 0.020 * client.sent <= now:  # the missed ones too
                    self.send_media(client, selector)
            due = [client.first_at + 0.020 * client.sent for client in self.clients
                   if client.alive and self.sending.is_set()]
            wait = min(due, default=now + 0.020) - time.monotonic()
            for key, _ in selector.select(max(0.0, min(wait, 0.020))):
                self.read(key.data, selector)

    def send_media(self, client, selector):
        client.sent += 1
        data = text_frame(client.call.media("inbound", SILENCE, 20 * client.sent))
        if client.sent % 5 == 0:
            data += frame(0x9, struct.pack("!d", time.monotonic()))
            self.pings += 1
        try:
            client.sock.sendall(data)  # blocks while the server takes nothing: fine, we catch up after
        except OSError:
            self.drop(client, selector)

    def read(self, client, selector):
        try:
            data = client.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            return self.drop(client, selector)
        now = time.monotonic()
        client.buffer += data
        while (parsed := parse_frame(client.buffer)) is not None:
            opcode, payload, used = parsed
            client.buffer = client.buffer[used:]
            if opcode == 0xA and len(payload) == 8:
                self.round_trips.append(1000 * (now - struct.unpack("!d", payload)[0]))
            elif opcode == 0x8:
                return self.drop(client, selector)

    def drop(self, client, selector):
        if client.alive:
            client.alive = False
            self.dropped += 1
            selector.unregister(client.sock)

    def stop(self):
        """The calls ended (stop, then a close frame), and the round trips in ms, sorted. The pongs
        of the last pings are waited for (2 s at most): they may be the ones held up."""
        self.sending.clear()
        deadline = time.monotonic() + 2
        while len(self.round_trips) < self.pings and time.monotonic() < deadline:
            time.sleep(0.01)
        self.running.clear()
        self.thread.join(30)
        for client in self.clients:
            if client.alive:
                try:
                    client.sock.sendall(text_frame(client.call.stop()) + frame(0x8, struct.pack("!H", 1000)))
                except OSError:
                    pass
        deadline = time.monotonic() + 5
        for client in self.clients:
            closed_after(client.sock, max(0.01, deadline - time.monotonic()))
            client.sock.close()
        self.round_trips.sort()
        return self.round_trips

    def summary(self):
        dropped = f", {self.dropped} dropped by the server" if self.dropped else ""
        return (f"{self.count} bystanders' round trip {spread(self.round_trips)} "
                f"({len(self.round_trips)} of {self.pings} pings answered{dropped})")


def spread(values):
    """'p50 X / p99 Y / max Z ms' of milliseconds."""
    if not values:
        return "none"
    values = sorted(values)
    return (f"p50 {statistics.median(values):.1f} / p99 {values[int(0.99 * (len(values) - 1))]:.1f} / "
            f"max {values[-1]:.1f} ms")


def counts(values):
    """'403 x120, 200 x3': how often each value came."""
    return ", ".join(f"{value} x{n}" for value, n in collections.Counter(values).most_common()) or "none"


class PeakRss:
    """A process's RSS at its peak (MiB), sampled every 0.25 s on a thread until stop()."""

    def __init__(self, pid):
        self.pid, self.peak = pid, rss_mib(pid)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self):
        while not self.done.wait(0.25):
            try:
                self.peak = max(self.peak, rss_mib(self.pid))
            except OSError:  # the process is gone
                return

    def stop(self):
        self.done.set()
        self.thread.join()
        return self.peak


def timed_get(port, path, timeout=30.0, **headers):
    """(status, or the error's name; body; seconds) of one GET to 127.0.0.1:port."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        status, body = response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        status, body = type(exc).__name__, b""
    finally:
        connection.close()
    return status, body, time.monotonic() - started


def wait_listening(port, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing listens on port {port}")
            time.sleep(0.05)


def floor_server(app, folder, *args, env=None):
    """A server with a floor on a free port: (server, floor port)."""
    port = free_port()
    server = Server(app, "--quiet-levels", "--floor-port", str(port), *args, folder=folder, env=env)
    wait_listening(port)
    return server, port


def tracebacks(text):
    return text.count("Traceback")


NAME_LETTERS = string.ascii_letters + string.digits


def form_body(fields):
    """A form of `fields` distinct names, each as short as it comes (a, b, ..., aa, ab, ...), with
    empty values: 3,800 fit in the 16 KiB body app.py takes on /twiml (old and new), each a name
    to sort for the signature."""
    names = itertools.chain(NAME_LETTERS, *(map("".join, itertools.product(NAME_LETTERS, repeat=k)) for k in (2, 3)))
    return "&".join(f"{name}=" for name in itertools.islice(names, fields)).encode()


def post_forms(port, body, seconds, statuses, times):
    """POST `body` unsigned to /twiml, a new connection each time, for `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("POST", "/twiml", body=body,
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
        except (OSError, http.client.HTTPException) as exc:
            statuses.append(type(exc).__name__)
        finally:
            connection.close()
        times.append(1000 * (time.monotonic() - started))


def case_webhook_fields(app, folder, args):
    server = Server(app, "--quiet-levels", folder=folder, env={"TWILIO_AUTH_TOKEN": "bench-token"})
    signed = {"X-Twilio-Signature": signature("bench-token", as_signed(server.url))}  # the bystanders are Twilio's
    lines = []
    try:
        for fields in sorted({args.fields, 3800}):
            body = form_body(fields)
            statuses, times = [], []
            bystanders = Bystanders(server.url, args.bystanders, signed).start()
            posters = [threading.Thread(target=post_forms, args=(server.port, body, args.seconds, statuses, times))
                       for _ in range(4)]
            for poster in posters:
                poster.start()
            for poster in posters:
                poster.join()
            bystanders.stop()
            lines.append(f"{fields} fields ({len(body)} bytes): {counts(statuses)}; "
                         f"per request p50 {statistics.median(times):.0f} / max {max(times):.0f} ms; "
                         f"{bystanders.summary()}")
    finally:
        server.stop()
    return f"4 clients POST unsigned forms to /twiml for {args.seconds:g} s: " + "; ".join(lines)


ODD_PARAMETERS = {f"p{i}": "v" * 30 for i in range(4000)}  # a start of about 170 KB
BIG_MESSAGES = ("--max-message-bytes", str(1 << 20))  # so that such a start is taken at all (64 KiB by default)


def odd_calls(url, numbers, failures):
    """Short calls, one after another, until `numbers` runs out: a SID with a space, 4,000
    parameters, then connected, start, 1 media and stop in one write, and the server's close."""
    for n in numbers:
        try:
            client, call = WSClient(url, timeout=30), Call(params=ODD_PARAMETERS, stream_sid=f"MZ{n:032x} x")
            client.send_raw(b"".join(text_frame(message) for message in call.session(media=1, stop=True)))
            client.wait_closed(30)
        except OSError as exc:
            failures.append(type(exc).__name__)


def case_odd_sids(app, folder, args):
    server, floor_port = floor_server(app, folder, *BIG_MESSAGES)
    failures, numbers = [], iter(range(600))  # next() on it is atomic: each call once, 4 at a time
    try:
        before, rss = server.rss(), PeakRss(server.process.pid)
        bystanders = Bystanders(server.url, args.bystanders).start()
        callers = [threading.Thread(target=odd_calls, args=(server.url, numbers, failures)) for _ in range(4)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
        bystanders.stop()
        time.sleep(1)
        status, body, _ = timed_get(floor_port, "/calls")
        shown = json.loads(body) if status == 200 else {}
        after, peak = server.rss(), rss.stop()
        traces = tracebacks(server.log())
    finally:
        server.stop()
    return (f"600 calls of a SID with a space and 4,000 parameters ({len(failures)} failed: {counts(failures)}): "
            f"/calls {status}, open {len(shown.get('open', []))}, ended {len(shown.get('ended', []))}; "
            f"RSS {before:.0f} -> peak {peak:.0f} -> after {after:.0f} MiB; {traces} tracebacks; "
            f"{bystanders.summary()}")


def case_floor_bloat(app, folder, args):
    server, floor_port = floor_server(app, folder, *BIG_MESSAGES, "--idle-timeout", "0")
    clients, sizes, times = [], [], []
    try:
        before, rss = server.rss(), PeakRss(server.process.pid)
        for _ in range(250):
            client, call = WSClient(server.url, timeout=120), Call(params=ODD_PARAMETERS)
            messages = [*call.session(), *(call.dtmf(str(k % 10)) for k in range(500))]
            client.send_raw(b"".join(text_frame(message) for message in messages))
            client.call = call
            clients.append(client)
        for client in clients:  # a ping behind each call's messages: its pong, once they are handled
            client.send_raw(frame(0x9, b"handled?"))
        closed = 0
        for client in clients:
            try:
                while (opcode := client.recv_frame()[0]) not in (0xA, 0x8):
                    pass
                closed += opcode == 0x8
            except OSError:
                closed += 1
        opened = server.rss()
        bystanders = Bystanders(server.url, args.bystanders).start()
        statuses, until = [], time.monotonic() + 3  # 5 fetches at least, for 3 s at least: pings to answer meanwhile
        while len(statuses) < 5 or time.monotonic() < until:
            status, body, took = timed_get(floor_port, "/calls", timeout=60)
            statuses.append(status)
            sizes.append(len(body) / 1e6)
            times.append(1000 * took)
        bystanders.stop()
        peak = rss.stop()
        for client in clients:
            try:
                client.send_raw(text_frame(client.call.stop()) + frame(0x8, struct.pack("!H", 1000)))
            except OSError:
                pass
            client.sock.close()
    finally:
        server.stop()
    return (f"250 open calls of 4,000 parameters and 500 key presses ({closed} closed by the server): "
            f"RSS {before:.0f} -> {opened:.0f} MiB (peak {peak:.0f}); /calls {counts(statuses)}, "
            f"{max(sizes):.1f} MB, fetched in p50 {statistics.median(times):.0f} / max {max(times):.0f} ms; "
            f"during the fetches {bystanders.summary()}")


FLOOR_TOKEN = "bench-floor-token-0123"  # FLOOR_TOKEN: at least 16 letters, digits or -._~


def still_open(sock):
    """Whether the server still holds this connection open (what it sent is read and dropped)."""
    try:
        while sock.recv(65536, socket.MSG_DONTWAIT):
            pass
        return False  # EOF
    except BlockingIOError:
        return True
    except OSError:  # reset
        return False


def case_lockout(app, folder, args):
    metrics_port = free_port()
    server, floor_port = floor_server(app, folder, "--metrics-port", str(metrics_port),
                                      env={"FLOOR_TOKEN": FLOOR_TOKEN})
    wait_listening(metrics_port)
    answers = {}

    def ask(name, port, path, **headers):
        answers[name] = timed_get(port, path, timeout=15, **headers)

    try:
        bystanders = Bystanders(server.url, args.bystanders).start()
        opened = time.monotonic()
        idle = {"floor": [socket.create_connection(("127.0.0.1", floor_port)) for _ in range(64)],
                "metrics": [socket.create_connection(("127.0.0.1", metrics_port)) for _ in range(8)]}
        askers = [threading.Thread(target=ask, args=("/calls", floor_port, "/calls"),
                                   kwargs={"Authorization": f"Bearer {FLOOR_TOKEN}"}),
                  threading.Thread(target=ask, args=("/metrics", metrics_port, "/metrics"))]
        for asker in askers:
            asker.start()
        time.sleep(max(0.0, opened + 12 - time.monotonic()))
        closed = {name: sum(not still_open(sock) for sock in socks) for name, socks in idle.items()}
        for asker in askers:
            asker.join(20)
        bystanders.stop()
        for sock in idle["floor"] + idle["metrics"]:
            sock.close()
    finally:
        server.stop()
    said = []
    for name in ("/calls", "/metrics"):
        status, _, took = answers.get(name, ("no answer", b"", 15.0))
        said.append(f"{name} {status} in {1000 * took:.0f} ms" if isinstance(status, int) else
                    f"{name}: no answer in 15 s ({status})")
    return (f"64 idle connections to the floor, 8 to the metrics port: {', '.join(said)}; after 12 s the server had "
            f"closed {closed['floor']} of 64 and {closed['metrics']} of 8; {bystanders.summary()}")


def status_line(port, path, headers, timeout=10.0):
    """The status of a GET, from its status line alone; the connection closed at once."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n" +
                      "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n").encode())
        head = b""
        try:
            while b"\r\n" not in head and (more := sock.recv(4096)):
                head += more
        except OSError as exc:
            return type(exc).__name__
    return head.split(b" ")[1].decode() if head.startswith(b"HTTP/") else "no answer"


def case_last_event_id(app, folder, args):
    server, floor_port = floor_server(app, folder)
    try:
        bystanders = Bystanders(server.url, args.bystanders).start()
        time.sleep(0.5)
        lines_before = server.log().splitlines()
        statuses = [status_line(floor_port, "/events", {"Last-Event-ID": "9" * 5000}) for _ in range(50)]
        time.sleep(1)
        grown = server.log().splitlines()[len(lines_before):]
        bystanders.stop()
    finally:
        server.stop()
    return (f"50 GET /events with a Last-Event-ID of 5,000 digits: {counts(statuses)}; the log grew by {len(grown)} "
            f"lines ({tracebacks(chr(10).join(grown))} tracebacks); {bystanders.summary()}")


REDIS_TIME = "2026-12-06T20:00:00.000Z"


def start_record(stream, **changed):
    """A floor's record of a call's start, as floor_record() makes it, with `changed` fields."""
    return {"type": "start", "stream": stream, "call": "CA" + "0" * 32, "server": "bench", "time": REDIS_TIME,
            "uid": f"bench/{stream}", "tracks": ["inbound"], "parameters": {"From": "+15550100"},
            "format": "audio/x-mulaw/8000/1", **changed}


def case_redis_entries(app, folder, args):
    if shutil.which("redis-server") is None:
        return "skipped: redis-server is not on PATH"
    import redis
    store = Redis(folder)
    server = None
    try:
        server, floor_port = floor_server(app, folder, "--redis-url", store.url)
        bystanders = Bystanders(server.url, args.bystanders).start()
        before, rss = server.rss(), PeakRss(server.process.pid)
        valid = "MZ" + "b" * 32
        entries = [start_record("MZ" + "1" * 32, time=None), start_record("MZ" + "2" * 32, time=5),
                   start_record("MZ" + "3" * 32, time=[1]), start_record("MZ" + "4" * 32, parameters="x"),
                   *(start_record(f"MZ{n:032x}", parameters={"p": "v" * 100_000}) for n in range(200)),
                   start_record(valid)]  # the valid one last: read only if the floor got past all the others
        client = redis.Redis.from_url(store.url)
        for entry in entries:
            client.xadd("mediastreams:events", {"event": json.dumps(entry)})
        client.close()
        deadline, seen = time.monotonic() + 15, False
        while not seen and time.monotonic() < deadline:  # until the floor has read them all
            status, body, _ = timed_get(floor_port, "/calls")
            seen = status == 200 and valid.encode() in body
            time.sleep(0 if seen else 0.5)
        statuses, there = [], []
        for _ in range(5):
            status, body, _ = timed_get(floor_port, "/calls")
            statuses.append(status)
            there.append(status == 200 and valid.encode() in body)
        bystanders.stop()
        after, peak = server.rss(), rss.stop()
        traces = tracebacks(server.log())
    finally:
        if server:
            server.stop()
        store.kill()
    return (f"XADD 4 bad entries, 200 of 100 KB, then a valid start: /calls x5 {counts(statuses)}; the valid call "
            f"shown in {sum(there)} of 5; RSS {before:.0f} -> peak {peak:.0f} -> after {after:.0f} MiB; "
            f"{traces} tracebacks; {bystanders.summary()}")


STALLING = """\
import sys, time
sys.path.insert(0, {folder!r})
import gevent
import app


def stall():
    while True:
        gevent.sleep({every!r})
        time.sleep({stall!r})  # blocking: holds the event loop


gevent.spawn(stall)
app.main(sys.argv[1:])
"""


def case_stalls(app, folder, args):
    code = STALLING.format(folder=str(Path(app).resolve().parent), every=args.stall_every, stall=args.stall)
    lines = []
    for flags in ((), ("--read-interval-ms", "0")):
        server = Server(app, "--quiet-levels", *flags, folder=folder, command=[sys.executable, "-c", code])
        try:
            bystanders = Bystanders(server.url, args.bystanders).start()
            time.sleep(args.seconds)
            bystanders.stop()
            late = [int(m) for m in re.findall(r"event loop (\d+) ms late", server.log())]
        finally:
            server.stop()
        lines.append(f"{' '.join(flags) or 'default'}: {bystanders.summary()}, "
                     f"loop late at most {max(late, default=0)} ms")
    return (f"the event loop held {args.stall:g} s every {args.stall_every:g} s for {args.seconds:g} s: " +
            "; ".join(lines))


CASES = {"close": case_close,
         **{f"{kind}-flood": functools.partial(run_flood, kind=kind)
            for kind in ("ping", "mark", "unknown", "invalid-json", "media")},
         "unix-flood": case_unix_flood, "echo-flood": case_echo_flood, "marks": case_marks, "jump": case_jump,
         "pong-order": case_pong_order,
         "webhook-fields": case_webhook_fields, "odd-sids": case_odd_sids, "floor-bloat": case_floor_bloat,
         "lockout": case_lockout, "last-event-id": case_last_event_id, "redis-entries": case_redis_entries,
         "stalls": case_stalls}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cases", nargs="*", help=f"of {', '.join(CASES)} (default: all)")
    parser.add_argument("--app", default=str(ROOT / "app.py"), help="the app.py to run (default: this one)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="how long each flood, webhook-fields and stalls last (default 10)")
    parser.add_argument("--marks", type=int, default=10_000, help="marks: how many are outstanding (default 10,000)")
    parser.add_argument("--calls", type=int, default=300, help="close: calls ending at once (default 300)")
    parser.add_argument("--vs", type=lambda raw: raw.split(",") if raw else [], default=[],
                        help="close: peers to run the same against, e.g. node (tests/bench_load.py installs them)")
    parser.add_argument("--fields", type=int, default=1000,
                        help="webhook-fields: fields of each form, besides 3,800 (default 1,000)")
    parser.add_argument("--bystanders", type=int, default=20,
                        help="well-behaved real-time calls beside each attack (default 20)")
    parser.add_argument("--stall", type=float, default=0.45, help="stalls: seconds the loop is held (default 0.45)")
    parser.add_argument("--stall-every", type=float, default=1.0,
                        help="stalls: seconds between two holds (default 1.0)")
    parser.add_argument("--keep", action="store_true", help="keep each case's folder (the server's log) in /tmp")
    args = parser.parse_args(argv)
    for name in args.cases or CASES:
        folder = tempfile.mkdtemp(prefix=f"bench-hostile-{name}-")
        print(f"{name}: {CASES[name](args.app, folder, args)}", flush=True)
        if not args.keep:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
