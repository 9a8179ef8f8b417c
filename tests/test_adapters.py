"""Our gevent-websocket and flask-sockets adapters, over real gevent sockets, in process.

MediaWebSocket reads through FrameParser instead of the library's reader, for speed and for
RFC 6455's closing handshake. Its messages must be the library's own on the same random
byte streams (the one intended difference, unmasked frames, is tested in test_frames.py),
and its closing must let a client read our close code."""
import gc
import inspect
import logging
import random
import struct
import time
from types import FrameType, SimpleNamespace, TracebackType

import flask
import gevent
import gevent.event
import pytest
from gevent import socket as gsocket
from gevent.pywsgi import WSGIHandler
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import WebSocket
from werkzeug.test import EnvironBuilder

import app
from tests.conftest import runtime, tcp_pair, websocket
from tests.twilio_sim import close_code, frame, read_frames


def read_to_eof(sock):
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def random_text(rng, n):
    alphabet = "abc{}\":,0123456789 éß€😀\u0800"
    return "".join(rng.choice(alphabet) for _ in range(n)).encode()


def random_stream(rng):
    """A client byte stream: mostly valid messages, sometimes a protocol or UTF-8 error."""
    def masked(opcode, payload, **options):
        return frame(opcode, payload, mask=bytes(rng.getrandbits(8) for _ in range(4)), **options)

    out = b""
    for _ in range(rng.randint(1, 8)):
        kind = rng.random()
        size = rng.choice([0, 1, 5, 125, 126, 127, 300, 4000, 65535, 65536 - 100])
        if kind < 0.35:
            out += masked(0x1, random_text(rng, size // 3),
                          length_form=rng.choice([None, None, 16, 64]) if size < 126 else None)
        elif kind < 0.5:
            out += masked(0x2, bytes(rng.getrandbits(8) for _ in range(size)))
        elif kind < 0.65:  # fragmented text, split anywhere (even inside a UTF-8 sequence)
            data = random_text(rng, rng.randint(2, 200))
            cuts = sorted(rng.sample(range(1, len(data)), min(rng.randint(1, 3), len(data) - 1)))
            pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
            for i, piece in enumerate(pieces):
                out += masked(0x1 if i == 0 else 0x0, piece, fin=i == len(pieces) - 1)
                if rng.random() < 0.3:
                    out += masked(0x9, b"ping!")
        elif kind < 0.72:
            out += masked(0x9, random_text(rng, 10)[:125])
        elif kind < 0.76:
            out += masked(0xA, b"pong")
        elif kind < 0.80:
            out += masked(0x1, b"\xff\xfe" + random_text(rng, 5))  # invalid UTF-8
        elif kind < 0.84:
            out += masked(0x1, b"{}", rsv=rng.choice([0x10, 0x20, 0x40]))
        elif kind < 0.87:
            out += masked(rng.choice([0x3, 0x7, 0xB, 0xF]), b"x")  # reserved opcode
        elif kind < 0.90:
            out += masked(0x0, b"orphan")  # continuation without a start
        elif kind < 0.93:
            out += masked(0x9, b"p" * 126)  # control frame too long
        elif kind < 0.96:
            code = rng.choice([1000, 1001, 999, 1005, 3000, 4999])
            out += masked(0x8, struct.pack("!H", code) + rng.choice([b"", b"bye", b"\xff"]))
        else:
            out += masked(0x1, random_text(rng, 20))[:rng.randint(1, 10)]  # truncated
    return out


def run(cls, data, serving=None):
    """Messages `cls` returns for `data` (until None), and the bytes it sends back."""
    ours, theirs = gsocket.socketpair()
    ws = websocket(cls, ours, serving)
    sender = gevent.spawn(lambda: (theirs.sendall(data), theirs.shutdown(gsocket.SHUT_WR)))
    received = []
    while len(received) < 50:
        message = ws.receive()
        received.append(message)
        if message is None:
            break
    sender.join(5)
    ours.shutdown(gsocket.SHUT_WR)
    sent_back = read_to_eof(theirs)
    ours.close()
    theirs.close()
    return received, sent_back


@pytest.mark.parametrize("seed", range(300))
def test_media_websocket_reads_like_gevent_websocket(seed):
    rng = random.Random(seed)
    data = random_stream(rng)
    our_messages, our_reply = run(app.MediaWebSocket, data)
    their_messages, their_reply = run(WebSocket, data)
    assert our_messages == their_messages
    ours, theirs = read_frames(our_reply), read_frames(their_reply)
    assert [f for f in ours if f[0] != 0x8] == [f for f in theirs if f[0] != 0x8], "same pongs"
    # The library also sends a close frame to a client that has gone (EOF); we do not.
    # Ours carry a valid status code (the library sends its reason where the code belongs).
    assert len([f for f in ours if f[0] == 0x8]) <= 1
    assert all(close_code(payload) in (1000, 1001, 1002, 1007, 3000, 4999) for opcode, payload in ours
               if opcode == 0x8)


@pytest.mark.parametrize("bad, code", [(frame(0x1, b"\xff"), 1007), (frame(0x1, b"{}", rsv=0x40), 1002),
                                       (frame(0x0, b"x"), 1002), (frame(0x1, b"{}", mask=None), 1002),
                                       (frame(0x1, b"a" * 70000), 1009),
                                       (frame(0x8, struct.pack("!H", 1001) + b"bye"), 1001),
                                       (frame(0x8, b""), 1005)],
                         ids=["invalid-utf8", "reserved-bit", "orphan-continuation", "unmasked", "too-large",
                              "client-close-1001", "client-close-without-code"])
def test_the_close_frame_carries_the_code(bad, code):
    (message, *_), reply = run(app.MediaWebSocket, bad)
    assert message is None
    (opcode, payload), = read_frames(reply)
    assert opcode == 0x8 and close_code(payload) == code


def test_a_client_still_sending_after_an_error_reads_the_close_code_not_a_reset():
    """RFC 6455 7.1.7 and websockets' way: after a failure we send the close frame and our
    EOF, and read (and drop) what the client still sends until its EOF, so closing the
    socket does not reset the connection under a client that has not read our code yet."""
    server_side, client_side = tcp_pair()
    ws = websocket(app.MediaWebSocket, server_side)
    flood = frame(0x1, b'{"event": "media"}' * 50) * 2000  # 1.8 MB behind the bad frame

    def client():
        client_side.sendall(frame(0x1, b"{}", rsv=0x40) + flood)
        client_side.shutdown(gsocket.SHUT_WR)
        return read_to_eof(client_side)

    sending = gevent.spawn(client)
    assert ws.receive() is None
    assert ws.error == "WebSocket error, closed with 1002: reserved bits set without an extension"
    ws.close()  # what the route does once receive() has returned None
    server_side.close()  # and then the handler
    (opcode, payload), = read_frames(sending.get(timeout=10))
    assert (opcode, close_code(payload)) == (0x8, 1002)


def test_our_close_waits_for_the_clients_close_frame():
    server_side, client_side = tcp_pair()
    ws = websocket(app.MediaWebSocket, server_side)
    fed = gevent.event.Event()
    feed = ws.parser.feed
    ws.parser.feed = lambda data: (feed(data), fed.set())
    closing = gevent.spawn(ws.close, 1000)
    opcode, payload = read_frames(client_side.recv(100))[0]
    assert (opcode, close_code(payload)) == (0x8, 1000)
    client_side.sendall(frame(0x1, b'{"late": 1}'))  # still in flight: read and dropped
    assert fed.wait(5), "the closing wait reads on"
    assert not closing.dead, "the closing handshake is not over before the client's close frame"
    client_side.sendall(frame(0x8, payload))
    closing.join(app.Limits.close_timeout / 2)
    assert closing.dead, "the client's close frame ends the wait"
    server_side.close()
    client_side.close()


def test_the_clients_eof_ends_our_closing_wait():
    server_side, client_side = tcp_pair()
    ws = websocket(app.MediaWebSocket, server_side)
    closing = gevent.spawn(ws.close, 1001)
    assert close_code(read_frames(client_side.recv(100))[0][1]) == 1001
    client_side.shutdown(gsocket.SHUT_WR)
    closing.join(app.Limits.close_timeout / 2)
    assert closing.dead
    server_side.close()
    client_side.close()


def test_a_silent_client_holds_our_close_for_close_timeout_at_most():
    server_side, client_side = tcp_pair()
    ws = websocket(app.MediaWebSocket, server_side, runtime(limits=app.Limits(close_timeout=0.2)))
    closing = gevent.spawn(ws.close, 1001)
    closing.join(2)
    assert closing.dead and ws.closed
    assert close_code(read_frames(client_side.recv(100))[0][1]) == 1001
    server_side.close()
    client_side.close()


def has(cls, *names):
    return all(callable(getattr(cls, name, None)) for name in names)


def test_every_library_edge_we_rely_on_is_still_there():
    """app.LIBRARY_EDGES lists what app.py relies on of its libraries' insides; each has its
    check here. If a library changes under one, our adapters would silently stop applying."""
    import socket

    import flask_sockets
    import redis.connection
    from geventwebsocket.gunicorn.workers import GeventWebSocketWorker
    hub, source = gevent.get_hub(), inspect.getsource
    checks = {
        "gevent: socket._sock": lambda: isinstance(gsocket.socket()._sock, socket.SocketType)
        and callable(gsocket.socket()._sock.recv),
        "gevent: socket.send(data, flags, timeout)": lambda: list(inspect.signature(gsocket.socket.send).parameters)
        == ["self", "data", "flags", "timeout"],
        "gevent: hub.loop.io, hub.loop.timer, hub.loop.run_callback, hub.wait": lambda: has(
            hub.loop, "io", "timer", "run_callback") and has(hub, "wait", "switch"),
        "gevent-websocket: handler.WebSocket": lambda: "WebSocket(self.environ, Stream(self), self)" in source(
            WebSocketHandler.upgrade_connection),
        "gevent-websocket: WebSocketHandler.run_application() -> upgrade_websocket(), self.websocket": lambda:
            "self.upgrade_websocket()" in source(WebSocketHandler.run_application)
            and "self.websocket = " in source(WebSocketHandler.upgrade_connection),
        "gevent-websocket: WebSocket's slots closed, environ, stream, raw_write, raw_read, handler": lambda: {
            "closed", "environ", "stream", "raw_write", "raw_read", "handler"} <= set(WebSocket.__slots__),
        "pywsgi: WSGIHandler._handle_client_error(ex)": lambda: "self._handle_client_error(" in source(
            WSGIHandler.handle_one_request) and list(inspect.signature(WSGIHandler._handle_client_error).parameters)
        == ["self", "ex"],
        "pywsgi: WSGIHandler.read_requestline, read_request, handle_one_request, handle_one_response, get_environ":
            lambda: has(WSGIHandler, "read_requestline", "read_request", "handle_one_request", "handle_one_response",
                        "get_environ") and "self.read_requestline()" in source(WSGIHandler.handle_one_request)
            and "self.read_request(" in source(WSGIHandler.handle_one_request),
        "pywsgi: WSGIHandler.rfile (peek, read1), content_length, headers, command, path, close_connection, "
        "requestline": lambda: all(f"self.{name}" in source(WSGIHandler) for name in (
            "rfile", "content_length", "headers", "command", "path", "close_connection", "requestline")),
        "flask-sockets: SocketMiddleware's ws, app, wsgi_app; Sockets.url_map, add_url_rule(rule, _, f)": lambda:
            all(f"self.{name} = " in source(flask_sockets.SocketMiddleware.__init__) for name in ("ws", "app", "wsgi_app"))
            and "self.url_map = " in source(flask_sockets.Sockets.__init__)
            and "self.add_url_rule(rule, endpoint, f, **options)" in source(flask_sockets.Sockets.route),
        "redis-py: redis.connection.socket, redis.connection.ssl": lambda: "socket.socket(" in source(
            redis.connection.Connection) and "ssl." in source(redis.connection.SSLConnection),
        "gunicorn: GeventWebSocketWorker.server_class, wsgi_handler, load_wsgi, handle_exit, handle_quit, alive":
            lambda: has(GeventWebSocketWorker, "server_class", "load_wsgi", "handle_exit", "handle_quit") and
            hasattr(GeventWebSocketWorker, "wsgi_handler") and "self.alive" in source(GeventWebSocketWorker.run),
    }
    assert set(checks) == set(app.LIBRARY_EDGES), "an edge of app.LIBRARY_EDGES with no check, or a check of none"
    changed = [edge for edge, check in checks.items() if not check()]
    assert not changed, f"a library changed under app.py: {changed}"
    assert "self._sock.recv" not in source(app.MediaWebSocket), "read through MediaWebSocket.recv, set only for a plain socket"


def test_a_finished_call_leaves_no_call_state_in_reference_cycles():
    """Cycles live until a collection of their generation, and a call's lasts long enough to
    reach the oldest one: Flask kept a WebsocketMismatch, its traceback and frames per call,
    and the server's RSS grew by megabytes per 300 calls until a full collection. (Werkzeug's
    matcher makes a small cycle of a closure per match; it dies young and is left alone.)"""
    class GoneWebSocket:  # a call whose client went away at once
        closed = False
        error = None
        greenlet = None
        runtime = runtime()

        def hand_media_to(self, stream):
            pass

        def receive(self):
            return None

        def close(self, code=1000):
            self.closed = True
            self.handle_as_it_lands = None  # as MediaWebSocket.close() lets go of the stream

        def drop_audio(self):
            return 0

    environ = EnvironBuilder(path="/media", headers={"Upgrade": "websocket", "Connection": "Upgrade"}).get_environ()
    environ["wsgi.websocket"] = GoneWebSocket()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        assert app.app.wsgi_app(environ, lambda *args: None) == []
        del environ
        gc.collect()
        kept = [type(o).__name__ for o in gc.garbage
                if isinstance(o, (BaseException, TracebackType, FrameType, app.MediaStream, flask.Request))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not kept


def test_a_connection_dropped_as_its_request_came_in_takes_the_exception_before_any_answer(caplog):
    """The oldest pending connection is dropped by an exception thrown into its greenlet,
    which lands at its next switch. If its last bytes came in the same turn of the event loop,
    it has read them and would answer, or upgrade, and the exception land in the call (a
    101, then 1011). It must land before anything is answered."""
    handler = object.__new__(app.MediaStreamHandler.serving(runtime()))  # what handle_one_response needs of it
    handler.deadline, handler.client_address, handler.evicted = gevent.Timeout(), ("192.0.2.1", 5), True
    answered = []
    handler.run_application = lambda: answered.append("answered")

    def dropped_as_its_request_came_in():
        gevent.kill(gevent.getcurrent(), app.HandshakeTimeout("the oldest of more than 100 connections"))
        handler.handle_one_response()
        return "ended quietly"

    assert gevent.spawn(dropped_as_its_request_came_in).get(timeout=5) == "ended quietly"
    assert answered == [] and handler.close_connection
    assert "dropped connection remote=192.0.2.1 reason=the oldest of more than 100 connections" in caplog.text


class TalkingBack(app.MediaWebSocket):
    def __init__(self, *args):
        super().__init__(*args)
        self.talks_back = True  # as after its stream's first play(), mark() or clear()


@pytest.mark.parametrize("behind, cls, batched", [(False, app.MediaWebSocket, False),
                                                  (True, app.MediaWebSocket, True), (True, TalkingBack, False)])
def test_listen_only_streams_are_read_in_batches_only_while_the_loop_is_behind(monkeypatch, behind, cls, batched):
    naps = []
    real_sleep = gevent.sleep
    serving = runtime(read_interval_ms=100)
    serving.loop_behind = behind
    monkeypatch.setattr(gevent, "sleep", lambda seconds=0, *args: (naps.append(seconds), real_sleep(0))[1])
    received, _ = run(cls, b"".join(frame(0x1, b"message %d" % i) for i in range(3)), serving)
    assert received == ["message 0", "message 1", "message 2", None]
    assert (0.1 in naps) == batched


def test_a_stream_read_in_batches_catches_up_on_all_it_has_waiting_after_each_nap(monkeypatch):
    """Batched, a stream read 4 KiB a nap (40 KB/s): after repeated stalls of the event loop, a
    call fell further and further behind (issue 37: 2.4-3.0 s after 0.45 s stalls). Now each
    wake-up reads all that waits, 4 KiB a turn of the loop. Naps counted, not timed."""
    naps = []
    real_sleep = gevent.sleep
    serving = runtime(read_interval_ms=100)
    serving.loop_behind = True
    monkeypatch.setattr(gevent, "sleep", lambda seconds=0, *args: (naps.append(seconds), real_sleep(0))[1])
    ours, theirs = gsocket.socketpair()
    ws = websocket(app.MediaWebSocket, ours, serving)
    messages = [b"%04d" % i + b"x" * 118 for i in range(320)]  # 40 KB waiting, as after a stall: 128-byte frames
    theirs.sendall(b"".join(frame(0x1, message) for message in messages))
    received = [ws.receive() for _ in messages]
    assert received == [message.decode() for message in messages]
    assert naps.count(0.1) == 1, "one wake-up for all that gathered"
    ours.close()
    theirs.close()



def turns_to_read(messages, waited, as_it_lands, others=0):
    """How many turns of the event loop a stream takes to read `messages`, all waiting at once,
    after the loop was held for `waited` seconds (0: a client that always has more, a flood),
    with `others` streams open beside it. `as_it_lands`: read by the event loop's callback
    (media), else by receive()'s greenlet."""
    ours, theirs = gsocket.socketpair()
    serving = runtime()
    serving.open_websockets.update(object() for _ in range(others))
    ws = websocket(app.MediaWebSocket, ours, serving)
    theirs.sendall(frame(0x1, b"start"))  # read whole: from now on the socket is read as it is after a handshake
    assert ws.receive() == "start"
    got = []
    if as_it_lands:  # as a stream's media are: handled in the loop's callback, the greenlet woken for the rest
        ws.handle_as_it_lands = lambda message: "end" if message == "end" else got.append(message) or "media"
    sender = gevent.spawn(theirs.sendall, b"".join(frame(0x1, message) for message in [*messages, b"end"]))
    gevent.sleep(0.05)  # all of it waiting, or as much as the socket holds (a flood: the rest as it is read)
    time.sleep(waited)  # the loop held: the stream has waited this long, as after a stall
    turns = []
    ticker = gevent.spawn(lambda: [(turns.append(1), gevent.get_hub().wait(gevent.get_hub().loop.timer(0)))
                                   for _ in iter(int, 1)])
    while (message := ws.receive()) != "end":
        got.append(message)
    ticker.kill()
    sender.get()
    assert [m.encode() if isinstance(m, str) else m for m in got] == messages
    ours.close()
    theirs.close()
    return len(turns)


@pytest.mark.parametrize("as_it_lands", [False, True], ids=["receive", "as-it-lands"])
def test_a_stream_the_event_loop_left_unread_catches_up_at_once_and_a_flood_still_lets_it_go_round(as_it_lands):
    """After a full read (RECV_BYTES) the loop went round before the next: with stalls turn after
    turn, a call read 4 KiB a stall and fell further behind at each (issue 37: 1.7 s behind after
    10 s of back-to-back 0.45 s stalls, 20 calls). A stream now reads on at once what it earned
    by waiting; a client that always has more (it never waited) still reads 4 KiB a turn."""
    backlog = [b"%04d" % i + b"x" * 318 for i in range(120)]  # 40 KB of Twilio-sized messages: 0.45 s of 6 calls
    assert turns_to_read(backlog, waited=0.8, as_it_lands=as_it_lands) <= 2, "one turn for all that waited"
    flood = [b"%05d" % i + b"x" * 317 for i in range(1200)]  # 400 KB
    assert turns_to_read(flood, waited=0, as_it_lands=as_it_lands) >= 50, "a flood earns next to nothing"
    # beside 63 others, each stream earns a 64th of CATCH_UP_ALL_BYTES_PER_SECOND: 13 KB in 0.8 s
    assert turns_to_read(backlog, waited=0.8, as_it_lands=as_it_lands, others=63) >= 5, "all floods together gain little"

class CountedRecv:
    """A socket's own socket, counting its recv() calls."""

    def __init__(self, sock):
        self.sock, self.calls = sock, 0

    def recv(self, *args):
        self.calls += 1
        return self.sock.recv(*args)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_a_message_costs_one_recv_not_a_failed_one_first():
    """As libuv reads: after a read that emptied the socket, wait for the next bytes, then
    read them; a recv() that fails with EAGAIN first cost 4 µs a message (bench_load)."""
    ours, theirs = gsocket.socketpair()
    ws = websocket(app.MediaWebSocket, ours)
    ours._sock = counted = CountedRecv(ours._sock)

    def client():
        for i in range(3):
            gevent.sleep(0.02)  # a message at a time, as Twilio sends them
            theirs.sendall(frame(0x1, b"message %d" % i))
        gevent.sleep(0.02)
        theirs.shutdown(gsocket.SHUT_WR)

    sender = gevent.spawn(client)
    assert [ws.receive() for _ in range(4)] == ["message 0", "message 1", "message 2", None]
    sender.join(5)
    assert counted.calls == 3, "one recv() a message (the first comes through the handler's rfile), one for the EOF"
    ours.close()
    theirs.close()


def test_batching_starts_when_the_event_loop_is_late_and_stops_once_it_is_on_time(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="mediastreams")
    serving = runtime(limits=app.Limits(caught_up_seconds=0.3))
    watcher = gevent.spawn(app.watch_the_event_loop, serving)
    try:
        gevent.sleep(0.2)
        assert not serving.loop_behind, "an idle loop is on time"
        time.sleep(0.12)  # blocks the whole event loop, as more work than the process can do would
        deadline = time.monotonic() + 5
        while not serving.loop_behind and time.monotonic() < deadline:
            gevent.sleep(0.01)
        assert serving.loop_behind
        assert "this process cannot keep up; reading listen-only streams every 100 ms" in caplog.text
        deadline = time.monotonic() + 5
        while serving.loop_behind and time.monotonic() < deadline:
            gevent.sleep(0.05)
        assert not serving.loop_behind
        assert "reading each message as it lands again" in caplog.text
    finally:
        watcher.kill()


def test_a_stream_that_talks_back_sends_without_waiting_for_acks():
    """TCP_NODELAY once it sends: Nagle's algorithm held every echo after a mark 20 ms (bench_load --echo)."""
    ours, client = tcp_pair()
    ws = websocket(app.MediaWebSocket, ours)
    assert ours.getsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY) == 0, "listen-only: the kernel may batch"
    assert ws.send_text(b'{"event":"clear","streamSid":"MZ1"}')
    assert ours.getsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY) != 0
    assert read_frames(client.recv(100)) == [(0x1, b'{"event":"clear","streamSid":"MZ1"}')]
    for sock in (client, ours):
        sock.close()


def test_nothing_of_the_librarys_websocket_reaches_the_socket_past_the_outbox():
    """What MediaWebSocket inherits from gevent-websocket's WebSocket, found by looking, touches
    neither the socket nor the library's readers and writers; what it overrides of the
    library's own I/O either goes through the outbox (send) or raises one line naming what to use."""
    library_io = {"raw_write", "raw_read", "stream", "socket", "rfile", "send_frame", "read_frame", "read_message",
                  "handle_ping", "handle_close"}
    for name, attribute in vars(WebSocket).items():
        code = attribute.fget if isinstance(attribute, property) else attribute
        if not inspect.isfunction(code) or name == "__init__":  # what __init__ sets, ours replaces (below)
            continue
        if name in vars(app.MediaWebSocket):
            continue
        used = app.names_in(code.__code__) & library_io
        assert not used, f"MediaWebSocket inherits {name}(), which uses {used}: override it"
    ours, client = tcp_pair()
    ws = websocket(app.MediaWebSocket, ours)
    ours.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_SNDBUF, 4096)
    stream = SimpleNamespace(stream_sid="MZ1", played_back=app.PlayedBack())
    assert ws.send_audio(app.Playback(stream, b"\xff" * 160 * 2000))  # 40 s of audio: it waits in the outbox
    ws.send('{"event": "mark"}')
    ws.send(b"\x01\x02")
    assert ws.writer is not None and ws.queued > 0, "what send() sends waits behind what waited"
    refused = [name for name, attribute in vars(app.MediaWebSocket).items()
               if inspect.isfunction(attribute) and name in vars(WebSocket)
               and name not in ("__init__", "__del__", "receive", "send", "close")]
    assert {"send_frame", "read_frame", "read_message", "handle_ping", "handle_close", "handle_pong"} <= set(refused)
    for name in refused:
        function = getattr(ws, name)
        with pytest.raises(app.WebSocketError, match=r"^[^\n]*: use \w+\(\)|through the outbox|itself") as raised:
            function(*[None] * (len(inspect.signature(function).parameters)))
        assert name in str(raised.value)
    for direct in (lambda: ws.raw_write(b"x"), lambda: ws.raw_read(1), lambda: ws.stream.write(b"x")):
        with pytest.raises(app.WebSocketError, match=r"^[^\n]*: use (send|receive)\(\)$"):
            direct()
    received = b""
    while received.count(b"\x82\x02\x01\x02") == 0:
        received += client.recv(65536)
    frames = read_frames(received)
    assert [opcode for opcode, _ in frames[-2:]] == [0x1, 0x2] and frames[-2][1] == b'{"event": "mark"}'
    assert len(frames) == 2002 and all(b'"media"' in payload for _, payload in frames[:-2]), "in order, whole"
    gevent.spawn(ws.close, 1000)
    gevent.sleep(0.01)
    with pytest.raises(app.WebSocketError, match="closing or gone"):
        ws.send("too late")
    for sock in (client, ours):
        sock.close()
