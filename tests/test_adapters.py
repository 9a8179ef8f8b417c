"""Our gevent-websocket adapter against the library's own code, on random input.

MediaWebSocket replaces WebSocket's reading (buffering, unmasking, UTF-8 checking) for
speed; RFC 6455 behaviour must not change. Each case feeds the same random byte stream to
both classes over real gevent sockets and compares every message returned, and every
byte each one sends back (pongs, close frames)."""
import gc
import inspect
import logging
import random
import struct
from types import FrameType, SimpleNamespace, TracebackType

import flask
import gevent
import pytest
from gevent import socket as gsocket
from gevent.pywsgi import WSGIHandler
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import Stream, WebSocket
from werkzeug.test import EnvironBuilder

import app


class FakeHandler:
    """What WebSocket needs of gevent-websocket's handler: a socket, its rfile, a logger."""

    def __init__(self, sock):
        self.socket = sock
        self.rfile = sock.makefile("rb", -1)
        self.server = SimpleNamespace(application=None)
        self.logger = logging.getLogger("test-adapters")


def frame(opcode, payload, fin=True, masked=True, rsv=0, length_form=None):
    length = len(payload)
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    form = length_form or (7 if length < 126 else 16 if length < 65536 else 64)
    bit = 0x80 if masked else 0
    if form == 7:
        head += bytes([bit | length])
    elif form == 16:
        head += bytes([bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", length)
    if not masked:
        return head + payload
    mask = bytes(random.getrandbits(8) for _ in range(4))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def random_text(rng, n):
    alphabet = "abc{}\":,0123456789 éß€😀\u0800"
    return "".join(rng.choice(alphabet) for _ in range(n)).encode()


def random_stream(rng):
    """A client byte stream: mostly valid messages, sometimes a protocol or UTF-8 error."""
    out = b""
    for _ in range(rng.randint(1, 8)):
        kind = rng.random()
        masked = rng.random() < 0.95
        size = rng.choice([0, 1, 5, 125, 126, 127, 300, 4000, 65535, 65536 - 100])
        if kind < 0.35:
            out += frame(0x1, random_text(rng, size // 3), masked=masked,
                         length_form=rng.choice([None, None, 16, 64]) if size < 126 else None)
        elif kind < 0.5:
            out += frame(0x2, bytes(rng.getrandbits(8) for _ in range(size)), masked=masked)
        elif kind < 0.65:  # fragmented text, split anywhere (even inside a UTF-8 sequence)
            data = random_text(rng, rng.randint(2, 200))
            cuts = sorted(rng.sample(range(1, len(data)), min(rng.randint(1, 3), len(data) - 1)))
            pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
            for i, piece in enumerate(pieces):
                out += frame(0x1 if i == 0 else 0x0, piece, fin=i == len(pieces) - 1, masked=masked)
                if rng.random() < 0.3:
                    out += frame(0x9, b"ping!", masked=masked)
        elif kind < 0.72:
            out += frame(0x9, random_text(rng, 10)[:125], masked=masked)
        elif kind < 0.76:
            out += frame(0xA, b"pong", masked=masked)
        elif kind < 0.80:
            out += frame(0x1, b"\xff\xfe" + random_text(rng, 5), masked=masked)  # invalid UTF-8
        elif kind < 0.84:
            out += frame(0x1, b"{}", rsv=rng.choice([0x10, 0x20, 0x40]), masked=masked)
        elif kind < 0.87:
            out += frame(rng.choice([0x3, 0x7, 0xB, 0xF]), b"x", masked=masked)  # reserved opcode
        elif kind < 0.90:
            out += frame(0x0, b"orphan", masked=masked)  # continuation without a start
        elif kind < 0.93:
            out += frame(0x9, b"p" * 126, masked=masked)  # control frame too long
        elif kind < 0.96:
            code = rng.choice([1000, 1001, 999, 1005, 3000, 4999])
            out += frame(0x8, struct.pack("!H", code) + rng.choice([b"", b"bye", b"\xff"]), masked=masked)
        else:
            out += frame(0x1, random_text(rng, 20), masked=masked)[:rng.randint(1, 10)]  # truncated
    return out


def server_frames(data):
    """(opcode, payload) of the unmasked frames a server sent."""
    frames = []
    while len(data) >= 2:
        length, start = data[1] & 0x7F, 2
        if length == 126:
            length, start = struct.unpack("!H", data[2:4])[0], 4
        frames.append((data[0] & 0x0F, data[start:start + length]))
        data = data[start + length:]
    return frames


def run(cls, data):
    """Messages `cls` returns for `data` (until None), and the bytes it sends back."""
    ours, theirs = gsocket.socketpair()
    handler = FakeHandler(ours)
    ws = cls({}, Stream(handler), handler)
    sender = gevent.spawn(lambda: (theirs.sendall(data), theirs.shutdown(gsocket.SHUT_WR)))
    received = []
    while len(received) < 50:
        message = ws.receive()
        received.append(message)
        if message is None:
            break
    sender.join(5)
    ours.shutdown(gsocket.SHUT_WR)
    sent_back = b""
    while chunk := theirs.recv(65536):
        sent_back += chunk
    ours.close()
    theirs.close()
    return received, sent_back


CLOSE_CODES = {"invalid UTF-8": 1007, "protocol": 1002}


@pytest.mark.parametrize("seed", range(300))
def test_media_websocket_reads_like_gevent_websocket(seed):
    rng = random.Random(seed)
    random.seed(seed)
    data = random_stream(rng)
    our_messages, our_reply = run(app.MediaWebSocket, data)
    their_messages, their_reply = run(WebSocket, data)
    assert our_messages == their_messages
    ours, theirs = server_frames(our_reply), server_frames(their_reply)
    assert [f for f in ours if f[0] != 0x8] == [f for f in theirs if f[0] != 0x8], "same pongs"
    # the one fix: our close frames carry a status code (RFC 6455 section 5.5.1)
    assert [f[0] for f in ours] == [f[0] for f in theirs]
    for opcode, payload in ours:
        if opcode == 0x8:
            assert len(payload) >= 2 and struct.unpack("!H", payload[:2])[0] in (1000, 1001, 1002, 1007, 3000, 4999)


def test_close_frames_carry_the_status_code():
    cases = {frame(0x1, b"\xff"): 1007, frame(0x1, b"{}", rsv=0x40): 1002, frame(0x0, b"x"): 1002,
             frame(0x8, struct.pack("!H", 1001) + b"bye"): 1001, frame(0x8, b""): 1000,
             frame(0x1, b"a" * 70000): 1009}
    for data, code in cases.items():
        (message, *_), reply = run(app.MediaWebSocket, data)
        assert message is None
        assert server_frames(reply)[-1][0] == 0x8
        assert struct.unpack("!H", server_frames(reply)[-1][1][:2])[0] == code


def test_unmask_matches_the_rfc_definition():
    rng = random.Random(7)
    for n in [0, 1, 3, 4, 5, 160, 383, 4096]:
        payload, mask = bytes(rng.getrandbits(8) for _ in range(n)), bytes(rng.getrandbits(8) for _ in range(4))
        assert app.unmask(payload, mask) == bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_the_size_limit_is_ours_alone():
    """The one intended difference: gevent-websocket reads any size, we stop at the limit."""
    data = frame(0x1, b"a" * (app.settings.max_message_bytes + 1))
    assert run(WebSocket, data)[0][0] == "a" * (app.settings.max_message_bytes + 1)
    assert run(app.MediaWebSocket, data)[0] == [None]


def test_the_library_still_builds_its_socket_where_we_replace_it():
    """If gevent-websocket stops building connections from its module-level WebSocket name,
    or pywsgi drops its client-error hook, our adapters silently stop applying."""
    import geventwebsocket.handler
    assert geventwebsocket.handler.WebSocket is app.MediaWebSocket
    assert "WebSocket(self.environ, Stream(self), self)" in inspect.getsource(WebSocketHandler.upgrade_connection)
    assert "self.upgrade_websocket()" in inspect.getsource(WebSocketHandler.run_application)
    assert "_handle_client_error" in inspect.getsource(WSGIHandler.handle_one_request)
    assert "self._sock.recv" not in inspect.getsource(app.MediaWebSocket)


def test_a_finished_call_leaves_no_call_state_in_reference_cycles():
    """Cycles live until a collection of their generation, and a call's lasts long enough to
    reach the oldest one: Flask kept a WebsocketMismatch, its traceback and frames per call,
    and the server's RSS grew by megabytes per 300 calls until a full collection. (Werkzeug's
    matcher makes a small cycle of a closure per match; it dies young and is left alone.)"""
    class GoneWebSocket:  # a call whose client went away at once
        closed = False
        end_reason = None

        def receive(self):
            return None

        def close(self, code=1000):
            self.closed = True

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


@pytest.mark.parametrize("open_streams, batched", [(50, False), (51, True)])
def test_streams_are_read_in_batches_only_above_fifty_open(monkeypatch, open_streams, batched):
    naps = []
    real_sleep = gevent.sleep
    monkeypatch.setattr(app.settings, "read_interval_ms", 100)
    monkeypatch.setattr(app, "open_websockets", {object() for _ in range(open_streams)})
    monkeypatch.setattr(gevent, "sleep", lambda seconds=0, *args: (naps.append(seconds), real_sleep(0))[1])
    received, _ = run(app.MediaWebSocket, b"".join(frame(0x1, b"message %d" % i) for i in range(3)))
    assert received == ["message 0", "message 1", "message 2", None]
    assert (0.1 in naps) == batched
