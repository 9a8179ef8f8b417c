"""One client cannot stall, bloat or starve the others, each case played as a real client
plays it: Twilio's close frame in the same segment as its `stop`, floods that never read,
marks never echoed, a wild timestamp, a ping inside a fragmented message. Where a bound is
on time or memory it is generous: it tells a server that holds its event loop, or grows
without end, from one that does not (tests/bench_hostile.py measures the same cases)."""
import re
import socket
import struct
import sys
import threading
import time

import pytest

from tests.conftest import Server, ZERO_MASK, rss_mib, samples, text_frame
from tests.twilio_sim import CHUNK, Call, WSClient, decode_ulaw, encode_ulaw, frame, read_frames, tone

SILENCE = b"\xff" * CHUNK
CLOSE_1000 = frame(0x8, struct.pack("!H", 1000))


def read_to_the_end(sock, timeout=10.0):
    """(the frames the server sent, seconds until it dropped the connection), reading all."""
    started, data = time.monotonic(), b""
    sock.settimeout(timeout)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return read_frames(data), float("inf")
    except OSError:
        pass
    return read_frames(data), time.monotonic() - started


def end_in_one_segment(client, call):
    client.send_raw(frame(0x1, call.stop().encode()) + CLOSE_1000)


def whole_call_in_one_segment(client, call):
    client.send_raw(b"".join(frame(0x1, m.encode()) for m in call.session(media=3, stop=True)) + CLOSE_1000)


def close_crossing_ours(client, call):
    client.send_raw(frame(0x1, call.stop().encode()))
    client.send_raw(CLOSE_1000)  # before ours can have arrived


def close_after_ours(client, call):
    client.send_raw(frame(0x1, call.stop().encode()))
    assert client.recv_frame() == (0x8, struct.pack("!H", 1000))
    client.send_raw(CLOSE_1000)


def fin_after_stop(client, call):
    client.send_raw(frame(0x1, call.stop().encode()))
    client.sock.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("end", [end_in_one_segment, whole_call_in_one_segment, close_crossing_ours,
                                 close_after_ours, fin_after_stop], ids=lambda end: end.__name__.replace("_", "-"))
def test_a_call_that_ends_as_twilio_ends_it_is_closed_at_once(start_server, end):
    server = start_server("--quiet-levels", server="patient")
    client, call = server.connect(), Call()
    if end is not whole_call_in_one_segment:
        client.send_all(call.session(media=3))
        server.wait_for(rf"stream={call.stream_sid} first media")  # read by the event loop from here on
    end(client, call)
    frames, seconds = read_to_the_end(client.sock)
    assert seconds < 5, "the server dropped TCP without waiting for what the client had sent already"
    if end is not close_after_ours:
        assert frames == [(0x8, struct.pack("!H", 1000))]
    summary = server.summary(call.stream_sid)
    assert (summary["ended"], summary["media"]) == ("stop", "3")


# --- Fairness: no connection holds the event loop ------------------------------------------

@pytest.fixture(scope="module")
def unix_gunicorn(tmp_path_factory):
    """One gunicorn worker on a unix socket, as behind nginx, for every flood of this module:
    a client there can keep the socket full at all times (on loopback TCP the kernel's window
    lets it run dry now and then), so a server that reads as long as there is something to
    read never stops."""
    folder = tmp_path_factory.mktemp("unix")
    path = str(folder / "media.sock")
    server = Server(folder, command=[sys.executable, "-m", "gunicorn", "-k", "app.GunicornWorker", "-b",
                                     f"unix:{path}", "-w", "1", "--no-control-socket", "app:app"],
                    ready=r"Booting worker with pid: (\d+)", env={"QUIET_LEVELS": "1"})
    server.unix_socket = path
    yield server
    server.stop()


def flood_block(kind, call, size=1 << 20):
    """About `size` bytes of one kind of message, framed (media: new sequence numbers)."""
    make = {"ping": lambda: frame(0x9, b"", mask=ZERO_MASK),
            "long-ping": lambda: frame(0x9, b"p" * 125, mask=ZERO_MASK),  # the longest a control frame may be
            "mark": lambda: text_frame(call.mark("never-sent")),
            "unknown-event": lambda: text_frame(f'{{"event":"custom","streamSid":"{call.stream_sid}"}}'),
            "invalid-json": lambda: text_frame("{not json"),
            "media": lambda: text_frame(call.media("inbound", SILENCE, 20 * (call.chunks + 1)))}[kind]
    parts, length = [], 0
    while length < size:
        parts.append(make())
        length += len(parts[-1])
    return b"".join(parts)


class Flood:
    """A client that sends one block again and again, as fast as the socket takes it, and
    never reads; stop() ends it."""

    def __init__(self, client, block):
        self.client, self.block, self.sent = client, block, 0
        self.client.sock.settimeout(None)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        try:
            while True:
                self.client.sock.sendall(self.block)
                self.sent += len(self.block)
        except OSError:
            pass

    def stop(self):
        try:
            self.client.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(10)
        self.client.sock.close()


class RawClient:
    """A client whose flood begins with its handshake, in one write, and which never reads
    the answer: the server reads the flood first through what its HTTP parser buffered. The
    request is padded to 4096 bytes, so the parser's 8 KiB reads hold it and whole 4 KiB reads
    of the flood: every read of that buffer is full."""

    def __init__(self, unix_socket, opening, flood):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.sock.connect(unix_socket)
        request = (b"GET /media HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Pad: ")
        request += b"p" * (4096 - len(request) - 4) + b"\r\n\r\n"
        opening = b"".join(frame(0x1, message.encode()) for message in opening)
        self.sock.sendall(request + opening + flood)


@pytest.mark.parametrize("kind, from_the_handshake", [
    ("ping", False), ("mark", False), ("unknown-event", False), ("invalid-json", False), ("media", False),
    ("mark", True)], ids=["ping", "mark", "unknown-event", "invalid-json", "media", "mark-from-the-handshake"])
def test_while_one_client_floods_another_call_connects_and_completes(unix_gunicorn, kind, from_the_handshake):
    server, flooded = unix_gunicorn, Call()
    if from_the_handshake:
        flooder = RawClient(server.unix_socket, flooded.session(media=1), flood_block(kind, flooded))
    else:
        flooder = WSClient("ws://localhost/media", unix_socket=server.unix_socket)
        flooder.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        flooder.send_all(flooded.session(media=1))
    flood = Flood(flooder, flood_block(kind, flooded))
    server.wait_for(rf"stream={flooded.stream_sid} first media")
    try:
        while flood.sent < 2 << 20:  # the server has much more to read than it can in a turn
            time.sleep(0.01)
        started = time.monotonic()
        client, call = WSClient("ws://localhost/media", unix_socket=server.unix_socket, timeout=10), Call()
        connected = time.monotonic() - started
        client.send_all(call.session(media=5, stop=True))
        assert client.wait_closed(10) == 1000
        completed = time.monotonic() - started
    finally:
        flood.stop()
    assert connected < 0.5 and completed < 1.5, (connected, completed)
    assert server.summary(call.stream_sid)["media"] == "5"


# --- Memory: what a client that reads nothing makes us queue is bounded --------------------


def flood_until_held_back(client, block, cap=256 << 20):
    """Send `block` again and again without reading until the server stops taking it for
    half a second (back-pressure), the connection ends, or `cap` bytes have gone: the bytes
    sent, and whether the server held the client back while the connection was still open."""
    client.sock.setblocking(False)
    sent, view, blocked_since = 0, memoryview(block), None
    while sent < cap:
        try:
            n = client.sock.send(view)
        except BlockingIOError:
            blocked_since = blocked_since or time.monotonic()
            if time.monotonic() - blocked_since >= 0.5:
                return sent, True
            time.sleep(0.005)
            continue
        except OSError:
            return sent, False  # dropped
        blocked_since = None
        sent += n
        view = view[n:] if n < len(view) else memoryview(block)
    return sent, False


@pytest.mark.parametrize("kind, flags", [("long-ping", []), ("media", ["--echo"])], ids=["pings", "echo"])
def test_a_client_that_floods_and_never_reads_is_held_back_then_dropped(start_server, kind, flags):
    """Pongs, or the echo of every chunk, pile up for a client that reads nothing: the server
    stops reading from it at OUTBOX_LIMIT, so TCP holds it back, and drops it once it has
    taken nothing for STALL_SECONDS (4 s here: filling the kernel's buffers first took
    over 1.5 s on a busy machine), with a summary. Its pings are the longest a control frame
    may be: an empty one's pong is a third of it, and on a loaded machine reading the 3 MiB
    of them that fill OUTBOX_LIMIT outlasted the 4 s stall (the client was dropped, never held)."""
    # --read-interval-ms 0: a suite that loads the machine puts the server behind, where it reads this client
    # every 100 ms, and that slow reading, not its back-pressure, would be what holds the client back
    server = start_server("--quiet-levels", "--read-interval-ms", "0", *flags, server="stalls-in-4-s")
    idle_mib = rss_mib(server.process.pid)
    client, call = server.connect(), Call()
    client.send_all(call.session(media=1))
    server.wait_for(rf"stream={call.stream_sid} first media")
    block = flood_block(kind, call)
    sent, held_back = flood_until_held_back(client, block)
    grown_mib = rss_mib(server.process.pid) - idle_mib
    assert held_back, f"the server read {sent >> 20} MiB and never stopped reading"
    assert grown_mib < 100, f"the server grew by {grown_mib:.0f} MiB"
    deadline = time.monotonic() + 30
    while f"summary stream={call.stream_sid} " not in server.log() and time.monotonic() < deadline:
        flood_until_held_back(client, block)  # it goes on pushing, as a flooding client does
    summary = server.summary(call.stream_sid)
    assert summary["ended"] == "stalled"
    if kind == "long-ping":  # the echo's flood repeats its sequence numbers: its warnings run out first
        assert f"stream={call.stream_sid} the client took nothing we sent for 4 s" in server.log()
    else:
        assert int(summary["media"]) < 100_000, "what it took is bounded by what it read"
    client.sock.close()
    next_call = Call()
    assert server.stream(next_call.session(media=2, stop=True)) == 1000


# --- Marks are found by name --------------------------------------------------------------


def test_echoes_of_marks_never_sent_cost_no_scan_of_those_outstanding(start_server):
    server = start_server("--quiet-levels", server="many-marks")
    client, call = server.connect(), Call()
    reader = threading.Thread(target=read_to_the_end, args=(client.sock, 60), daemon=True)
    client.send_all(call.session())
    reader.start()  # takes the 10,000 marks and never echoes them
    server.wait_for(rf"stream={call.stream_sid} start")
    echoes = b"".join(frame(0x1, call.mark(f"never-sent-{n}").encode()) for n in range(20_000))
    started = time.monotonic()
    client.send_raw(echoes + frame(0x1, call.dtmf("1").encode()))
    server.wait_for(rf"stream={call.stream_sid} dtmf digit=1", timeout=60)
    took = time.monotonic() - started
    client.send_raw(frame(0x1, call.mark("sent-5").encode()) + frame(0x1, call.stop().encode()))
    summary = server.summary(call.stream_sid)
    assert (summary["marks"], summary["bad_unknown_mark"]) == ("10000/1/0", "20000")
    assert took < 1.5, f"20,000 unknown marks took {took:.1f} s with 10,000 outstanding"


# --- Recordings: one bad timestamp skips one chunk ------------------------------------------

def test_one_wild_timestamp_in_a_real_time_call_skips_that_chunk_only(start_server, tmp_path):
    server = start_server("--quiet-levels", "--record", str(tmp_path))
    client, call = server.connect(), Call()
    audio = encode_ulaw(tone(2.0))
    client.send_all(call.session())
    started = time.monotonic()
    for n in range(100):  # 2 s at real time; chunk 50's timestamp is 10^9 ms off
        client.send(call.media("inbound", audio[n * CHUNK:(n + 1) * CHUNK], 20 * (n + 1) + (10 ** 9 if n == 50 else 0)))
        time.sleep(max(0.0, started + 0.02 * (n + 1) - time.monotonic()))
    client.send(call.stop())
    assert client.wait_closed() == 1000
    summary = server.summary(call.stream_sid)
    assert summary["recordings"].endswith(":2.00s") and summary["recording_skipped"] == "1"
    assert "max-recording-seconds" not in server.log()
    recorded = samples(tmp_path / f"{call.stream_sid}_inbound.wav")
    expected = decode_ulaw(audio)
    assert recorded[:50 * CHUNK] == expected[:50 * CHUNK] and recorded[51 * CHUNK:] == expected[51 * CHUNK:]
    assert set(recorded[50 * CHUNK:51 * CHUNK]) == {0}, "silence where the skipped chunk was"


# --- A ping is answered before anything after it ---------------------------------------------

def frames_until(client, count):
    client.sock.settimeout(5)
    return [client.recv_frame() for _ in range(count)]


def kinds(frames):
    return ["pong" if opcode == 0xA else re.search(rb'"event":"(\w+)"', payload).group(1).decode()
            for opcode, payload in frames]


@pytest.mark.parametrize("pieces, expected", [
    (lambda media: [frame(0x1, media[0][:40], fin=False), frame(0x9, b"1"), frame(0x0, media[0][40:])],
     ["pong", "media"]),  # Autobahn 5.6
    (lambda media: [frame(0x1, media[0][:30], fin=False), frame(0x9, b"1"), frame(0x0, media[0][30:60], fin=False),
                    frame(0x9, b"2"), frame(0x0, media[0][60:])], ["pong", "pong", "media"]),  # 5.19
    (lambda media: [frame(0x1, media[0]), frame(0x9, b"1"), frame(0x1, media[1])], ["media", "pong", "media"]),
], ids=["inside-a-message", "two-inside-a-message", "between-two-messages"])
def test_a_ping_is_answered_before_what_the_rest_of_its_read_makes_us_send(start_server, pieces, expected):
    server = start_server("--quiet-levels", "--echo")
    client, call = server.connect(), Call()
    client.send_all(call.session())
    server.wait_for(rf"stream={call.stream_sid} start")
    media = [call.media("inbound", SILENCE, 20 * (n + 1)).encode() for n in range(2)]
    client.send_raw(b"".join(pieces(media)))  # one segment: one read
    assert kinds(frames_until(client, len(expected))) == expected
    client.send(call.stop())
    assert client.wait_closed() == 1000
