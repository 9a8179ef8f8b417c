"""Hostile clients, each attack reproduced on a real server: no socket held, no log line
forged, no traceback at will, no disk filled, no memory kept."""
import contextlib
import os
import re
import resource
import select
import socket
import ssl
import threading
import time

import pytest

import app
from tests.conftest import GUNICORN_READY, free_port, gunicorn_command, http_request
from tests.twilio_sim import CHUNK, Call, frame

SILENCE = b"\xff" * CHUNK
TOKEN = "0123456789abcdef0123456789abcdef"
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
STAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR)\s")


def upgrade(path=b"/media", host=b"x", version=b"HTTP/1.1", extra=b""):
    return (b"GET " + path + b" " + version + b"\r\nHost: " + host + b"\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n"
            + extra + b"\r\n")


def answer_to(server, request):
    """Send raw bytes, read to the end: all the server answered."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    return answer


def ask(server, request):
    """The status line of the answer to raw bytes ('' for none)."""
    return answer_to(server, request).split(b"\r\n", 1)[0].decode()


def closed_by_server(sock, timeout=5.0):
    """True once the server has closed the connection (EOF or reset) within `timeout`."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1024):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass
    return True


def still_open(sock):
    sock.settimeout(0)  # a socket with a timeout would wait for data before the peek
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


# 1. Slowloris: a request must be complete within --handshake-timeout, whatever it trickles

def test_a_request_that_trickles_is_dropped_at_the_handshake_timeout(start_server):
    server = start_server("--handshake-timeout", "1")
    silent = socket.create_connection(("127.0.0.1", server.port))
    trickling = socket.create_connection(("127.0.0.1", server.port))
    trickling.sendall(b"GET /media HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    stop = threading.Event()

    def trickle():  # one byte every 0.2 s: each read is quick, the request never ends
        while not stop.wait(0.2):
            try:
                trickling.sendall(b"a")
            except OSError:
                return

    threading.Thread(target=trickle, daemon=True).start()
    try:
        assert closed_by_server(silent) and closed_by_server(trickling)
    finally:
        stop.set()
    log = server.wait_for(r"dropped connection .*", count=2).string
    assert log.count("dropped connection remote=127.0.0.1 reason=no complete HTTP request within 1 s "
                     "(--handshake-timeout)") == 2
    assert server.stream(Call().session(stop=True)) == 1000, "the server still serves"


def limit_files(soft, hard):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_half_sent_requests_cannot_use_up_the_file_descriptors(start_server):
    """With 256 files allowed, 1000 connections that never finish their request took every
    descriptor, and real calls failed. Only 100 may be pending: the oldest make room, and the
    server accepts no more connections than its streams and those 100."""
    server = start_server(preexec_fn=limit_files(256, 256))
    assert "--max-streams lowered from 1000 to 92: this process may open 256 files (ulimit -n)" in server.log()
    pending = []
    for _ in range(1000):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(b"GET /media HTTP/1.1\r\nHost: x\r\n")
        pending.append(sock)
    call = Call()
    assert server.stream(call.session(media=3, stop=True)) == 1000
    assert server.summary(call.stream_sid)["media"] == "3"
    deadline = time.monotonic() + 5
    while sum(map(still_open, pending)) > 100 and time.monotonic() < deadline:
        time.sleep(0.05)  # the dropped ones are closed as the server gets to them
    assert sum(map(still_open, pending)) <= 100, "the oldest made room"
    assert "reason=the oldest of more than 100 connections still sending a request" in server.log()
    assert "Traceback" not in server.log()


def test_the_limit_on_open_files_is_raised_for_max_streams(start_server, tmp_path):
    server = start_server("--record", str(tmp_path / "rec-unused"), "--max-streams", "300",
                          preexec_fn=limit_files(64, 4096))
    limits = open(f"/proc/{server.process.pid}/limits").read()
    soft = int(re.search(r"Max open files\s+(\d+)", limits).group(1))
    assert soft == 300 * 3 + 100 + 64, "a socket and two WAV files per stream, handshakes, spare"
    assert "lowered" not in server.log()


# 2. Log lines: every client-controlled value is bounded and shown without control characters

FORGED = "2026-01-01 00:00:00,000 INFO    FORGED"


def test_no_client_can_forge_or_flood_a_log_line(start_server):
    server = start_server(env={"TWILIO_AUTH_TOKEN": TOKEN})
    requests = [
        upgrade(path=b"/x%0A" + FORGED.replace(" ", "%20").encode()),  # decoded into the path
        upgrade(path=b"/x%1b[31mred%1b[0m"),
        upgrade(host=b"x\r\n\t" + FORGED.encode()),  # a folded header
        upgrade(host=b"\x1b[31mansi\x1b[0m"),
        upgrade(host=b"h" * 60000),
        upgrade(extra=b"X-Twilio-Signature: \x1b[2J" + b"s" * 5000 + b"\r\n"),
        b"GET /\x1b[31m HTTP/1\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: \x1b%s\r\n" % (i, FORGED.encode()) for i in range(101)) + b"\r\n",
    ]
    for request in requests:
        assert re.match(r"HTTP/1.1 4\d\d ", ask(server, request))
    server.wait_for(r"status=400 .*", count=2)
    server.stop()
    lines = server.log().splitlines()
    assert len(lines) >= len(requests)
    assert all(STAMPED.match(line) for line in lines), [line for line in lines if not STAMPED.match(line)]
    assert max(map(len, lines)) < 500 and "\x1b" not in server.log()


# 3. Tracebacks at will: each bad request gets its 4xx and one short warning

BAD_REQUESTS = {
    "http-1-without-minor": (b"GET / HTTP/1\r\n\r\n", "HTTP/1.1 400 Bad Request"),
    "over-100-headers": (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n",
                         "HTTP/1.1 400 Bad Request"),
    "no-websocket-version": (upgrade().replace(b"Sec-WebSocket-Version: 13\r\n", b""), "HTTP/1.1 426 Upgrade Required"),
    "websocket-version-8": (upgrade().replace(b"Version: 13", b"Version: 8"), "HTTP/1.1 426 Upgrade Required"),
    "invalid-key": (upgrade().replace(KEY, b"!!!"), "HTTP/1.1 400 Bad Request"),
    "short-key": (upgrade().replace(KEY, b"c2hvcnQ="), "HTTP/1.1 400 Bad Request"),
    "http-1.0-upgrade": (upgrade(version=b"HTTP/1.0"), "HTTP/1.1 400 Bad Request"),
    "post-upgrade": (upgrade().replace(b"GET", b"POST"), "HTTP/1.1 405 Method Not Allowed"),
    "upgrade-without-connection": (upgrade().replace(b"Connection: Upgrade\r\n", b""), "HTTP/1.1 400 Bad Request"),
    # a body that never comes held the connection for ever once the request was read
    "body-never-sent": (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n", "HTTP/1.1 400 Bad Request"),
    "chunked-body": (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", "HTTP/1.1 400 Bad Request"),
    "upgrade-with-body": (upgrade(extra=b"Content-Length: 1000\r\n"), "HTTP/1.1 400 Bad Request"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_a_bad_request_gets_its_4xx_and_one_short_line(start_server, name):
    server = start_server()
    request, status = BAD_REQUESTS[name]
    assert ask(server, request) == status
    line = server.wait_for(r"(bad request|refused WebSocket) remote=127.0.0.1 .*").group(0)
    server.stop()
    assert server.log().count("remote=127.0.0.1") == 1 and len(line) < 250
    assert "Traceback" not in server.log()


def test_a_flood_of_bad_requests_is_shown_at_ten_lines_a_second(start_server):
    server = start_server()
    for _ in range(300):
        assert ask(server, b"GET / HTTP/1\r\n\r\n") == "HTTP/1.1 400 Bad Request"
    server.stop()
    log = server.log()
    shown = log.count("bad request remote=127.0.0.1")
    hidden = sum(map(int, re.findall(r"(\d+) more warnings about connections not shown", log)))
    assert shown + hidden == 300 and shown < 300
    assert "Traceback" not in log


def test_one_request_a_connection_so_unread_answers_hold_nothing(server):
    """Pipelined requests a client never reads filled the server's send buffer and blocked it."""
    answer = answer_to(server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)
    assert answer.count(b"HTTP/1.1 200 OK") == 1, "answered once, then closed"


def test_connections_beyond_the_streams_and_handshakes_wait_in_the_backlog(start_server):
    """--max-streams 1 and 100 handshakes: a pool of 101 connections. A 102nd is not
    accepted (so holds no descriptor of ours) until one of them goes."""
    server = start_server("--max-streams", "1")
    client, call = server.open_call()
    pending = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(100)]
    for sock in pending:
        sock.sendall(b"GET /media HTTP/1.1\r\nHost: x\r\n")
    server.wait_for(r"Connection accepted")
    waiting = socket.create_connection(("127.0.0.1", server.port), timeout=1)
    waiting.sendall(upgrade())
    with pytest.raises(TimeoutError):  # not accepted: nothing can answer it (a correct server never does)
        waiting.recv(100)
    pending[0].close()
    waiting.settimeout(10)
    assert waiting.recv(100).startswith(b"HTTP/1.1 503 Service Unavailable"), "accepted once a place is free"
    client.send(call.stop())
    assert server.ending(client, call) == (1000, "stop", "0"), "the stream was never disturbed"


def test_stream_warnings_from_many_connections_are_shown_at_200_lines_a_second(start_server):
    server = start_server()
    calls = [server.open_call() for _ in range(8)]
    for client, call in calls:
        client.send_all(["not json"] * 150)  # 100 warnings and a "more than 100" line each
    for client, call in calls:
        client.send(call.stop())
        client.wait_closed()
    server.wait_for(r"more stream warnings not shown")

    def shown_and_hidden():
        log = server.log()
        return (len(re.findall(r"skipped message|more than 100 warnings", log)),
                sum(map(int, re.findall(r"(\d+) more stream warnings not shown", log))))

    # Handling them can span three seconds on a slow machine: each second's hidden count is said a second later.
    deadline = time.monotonic() + 5
    while sum(shown_and_hidden()) < 8 * 101 and time.monotonic() < deadline:
        time.sleep(0.05)
    shown, hidden = shown_and_hidden()
    assert shown + hidden == 8 * 101 and hidden > 0
    assert all(server.summary(call.stream_sid)["bad_invalid_json"] == "150" for _, call in calls)


# 4. Disk: what a recording writes is bounded by the call's age and --max-recording-seconds

def test_a_timestamp_jump_writes_no_more_silence_than_the_stream_is_old(start_server, tmp_path):
    server = start_server("--record", str(tmp_path), "--quiet-levels")
    call = Call()
    media = [call.media("inbound", SILENCE, 20), call.media("inbound", SILENCE, 600_000)]  # 10 minutes on
    assert server.stream([call.connected(), call.start(), *media, call.stop()]) == 1000
    summary = server.summary(call.stream_sid)
    seconds = float(summary["recordings"].rsplit(":", 1)[1].rstrip("s"))
    assert summary["media"] == "2" and seconds <= float(summary["duration"].rstrip("s")) + 2.1


def test_audio_sent_faster_than_real_time_is_recorded_in_full(start_server, tmp_path):
    """The client pays for every byte of audio it sends; only the silence that fills a jump
    costs it nothing, and that alone is bounded by the call's age (the test above)."""
    server = start_server("--record", str(tmp_path), "--quiet-levels")
    call = Call()
    assert server.stream(call.session(media=500, stop=True)) == 1000  # 10 s of audio, sent at once
    summary = server.summary(call.stream_sid)
    assert summary["media"] == "500" and summary["recordings"].endswith(":10.00s")
    assert "recording_skipped" not in summary and "recording skips" not in server.log()


def test_a_tls_client_on_the_plain_port_is_told_what_to_do_in_one_line(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with pytest.raises((ssl.SSLError, OSError)):
            context.wrap_socket(sock, server_hostname="localhost")
    line = server.wait_for(r".* reason=a TLS handshake .*").group(0)
    assert line.endswith("bad request remote=127.0.0.1 reason=a TLS handshake (wss:// or https://) on this plain "
                         "port: connect with ws://, or put a TLS proxy such as ngrok in front")
    assert "\\x16" not in server.log() and "Invalid HTTP method" not in server.log()


def test_a_tls_hello_without_a_newline_is_told_at_once_not_at_the_handshake_timeout(start_server):
    """A ClientHello holds no HTTP line end unless its random bytes do: read as a request line,
    it would wait for one until --handshake-timeout, while the client waits for our answer."""
    server = start_server("--handshake-timeout", "60")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03" + bytes(range(11, 200)))  # no 0x0a
        assert closed_by_server(sock, timeout=5)
    assert server.wait_for(r"reason=a TLS handshake \(wss:// or https://\) on this plain port", timeout=5)


def test_a_recording_stops_at_max_recording_seconds(start_server, tmp_path):
    server = start_server("--record", str(tmp_path), "--quiet-levels", "--max-recording-seconds", "1")
    call = Call()
    assert server.stream(call.session(media=100, stop=True)) == 1000  # 2 s of audio
    summary = server.summary(call.stream_sid)
    assert summary["media"] == "100" and summary["recordings"].endswith(":1.00s")
    assert (f"stream={call.stream_sid} recording stopped track=inbound: --max-recording-seconds 1 reached"
            in server.log())


# 7. Memory: what half-received messages hold is bounded for all streams together

def test_half_received_messages_are_bounded_for_all_streams_together(start_server):
    """40 streams each leave a 1 MiB fragmented message unfinished: 40 MiB, over the 32 MiB
    all streams may hold; the streams asking for more get 1009, the others go on."""
    server = start_server("--max-message-bytes", str(2 << 20))
    calls = [server.open_call(media=1) for _ in range(40)]
    for client, call in calls:
        client.send_raw(frame(0x1, b'{"event": "media", "x": "' + b"a" * (1 << 20), fin=False))
    server.wait_for(r"over the 32 MiB limit", count=8)  # 8 MiB too many: at least 8 streams
    for client, call in calls:
        client.send_raw(frame(0x0, b'"}') + frame(0x1, call.stop().encode()))
    codes = [client.wait_closed() for client, _ in calls]
    assert 8 <= codes.count(1009) < 20 and codes.count(1000) == 40 - codes.count(1009)
    for (client, call), code in zip(calls, codes):
        ended = server.summary(call.stream_sid)["ended"]
        assert ended == ("error" if code == 1009 else "stop")
    assert server.stream(Call().session(media=1, stop=True)) == 1000, "all that was held is released"


# 8. A close code no peer may send (5000 and above) is answered with 1002 (RFC 6455 7.4):
#    test_closing.py, test_frames.py


def test_the_handshake_timeout_does_not_touch_a_stream(start_server):
    server = start_server("--handshake-timeout", "1")
    client, call = server.open_call(media=1)
    time.sleep(1.5)  # a stream outlives the handshake timeout: nothing to wait for but time itself
    client.send_all([call.media("inbound", SILENCE, 40), call.stop()])
    assert server.ending(client, call) == (1000, "stop", "2")


def dropped_in_time(connections, trickling, opened):
    """Seconds from `opened` until the listener dropped every one of `connections` (those
    `trickling` sending a header every second meanwhile, so that no one read waits long)."""
    left = list(connections)
    while left and time.monotonic() - opened < app.LISTENER_REQUEST_SECONDS + 5:
        for sock in set(trickling) & set(left):
            with contextlib.suppress(OSError):
                sock.sendall(b"X-Trickle: 1\r\n")
        ready, _, _ = select.select(left, [], [], 1.0)
        for sock in ready:
            try:
                assert sock.recv(100) == b"", "dropped without a word"
            except ConnectionResetError:  # a trickled header crossed the drop: also without a word
                pass
            left.remove(sock)
    assert not left, f"{len(left)} connections still open {app.LISTENER_REQUEST_SECONDS + 5} s after they opened"
    return time.monotonic() - opened


def test_idle_connections_cannot_lock_a_supervisor_out_of_the_floor_nor_prometheus_out_of_its_metrics(start_server):
    """64 idle connections took every slot of the floor (8 of the metrics port): a supervisor
    with the token got no answer, and none was dropped after 60 s. Now at most half of a
    listener's connections may be sending a request: a new one drops the oldest."""
    floor_port, metrics_port = free_port(), free_port()
    server = start_server("--floor-port", str(floor_port), "--floor-host", "0.0.0.0", "--metrics-port",
                          str(metrics_port), env={"FLOOR_TOKEN": TOKEN})
    idle = [socket.create_connection(("127.0.0.1", port)) for port in [floor_port] * 64 + [metrics_port] * 8]
    opened = time.monotonic()
    for sock in idle[::2]:  # half of them trickle: a request line, and nothing after it
        sock.sendall(b"GET /calls HTTP/1.1\r\n")
    assert http_request(floor_port, "/calls", Authorization=f"Bearer {TOKEN}")[0] == 200
    assert http_request(metrics_port, "/metrics")[0] == 200
    for oldest in idle[:2]:  # one that trickled, one that sent nothing
        oldest.settimeout(5)
        assert oldest.recv(100) == b"", "the oldest idle connections were dropped, without a word, for newer ones"
    feeds = []
    for _ in range(app.FLOOR_FEEDS):  # feeds take half the floor's connections at most: pages keep the rest
        feeds.append(socket.create_connection(("127.0.0.1", floor_port)))
        feeds[-1].sendall(f"GET /events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        feeds[-1].settimeout(5)
        assert feeds[-1].recv(12) == b"HTTP/1.1 200"
    status, headers, _ = http_request(floor_port, "/events", Authorization=f"Bearer {TOKEN}")
    assert (status, headers["Retry-After"]) == (503, "10")
    assert http_request(floor_port, "/calls", Authorization=f"Bearer {TOKEN}")[0] == 200
    left = [sock for sock in idle if sock.fileno() != -1 and not select.select([sock], [], [], 0)[0]]
    assert app.LISTENER_REQUEST_SECONDS - 1 < dropped_in_time(left, trickling=idle[::2], opened=opened)
    for sock in idle + feeds:
        sock.close()
    assert "Traceback" not in server.log() and "Invalid request" not in server.log()


def test_idle_connections_neither_pile_up_nor_stay_on_the_metrics_of_gunicorns_master(start_server):
    """gunicorn's master serves its workers' metrics from threads, one a connection: idle ones
    kept a thread each for ever. Now at most half of its connections may be sending a request
    (a new one drops the oldest), and each must send it within LISTENER_REQUEST_SECONDS."""
    metrics_port = free_port()
    server = start_server(command=gunicorn_command("-w", "1"), ready=GUNICORN_READY,
                          env={"METRICS_PORT": str(metrics_port)})
    server.wait_for(r"Metrics for Prometheus at .* all workers together")
    threads_before = len(os.listdir(f"/proc/{server.process.pid}/task"))
    idle = [socket.create_connection(("127.0.0.1", metrics_port)) for _ in range(3 * app.METRICS_CONNECTIONS)]
    opened = time.monotonic()
    for sock in idle[::2]:  # half of them trickle: a request line, and nothing after it
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")
    time.sleep(0.5)  # every connection's thread has taken it in: the request below is the newest
    assert http_request(metrics_port, "/metrics")[0] == 200
    left = list(idle)
    while len(left) > app.METRICS_CONNECTIONS // 2:  # the oldest, whichever they are: dropped for newer ones
        ready, _, _ = select.select(left, [], [], 5.0)
        assert ready, f"{len(left)} idle connections still open: at most {app.METRICS_CONNECTIONS // 2} may be"
        for sock in ready:
            assert sock.recv(100) == b"", "dropped without a word"
            left.remove(sock)
    assert len(os.listdir(f"/proc/{server.process.pid}/task")) <= threads_before + app.METRICS_CONNECTIONS
    # those never pushed out: dropped when their time is up, however they trickle
    assert app.LISTENER_REQUEST_SECONDS - 1 < dropped_in_time(left, trickling=idle[::2], opened=opened)
    assert http_request(metrics_port, "/metrics")[0] == 200
    assert "Traceback" not in server.log()
