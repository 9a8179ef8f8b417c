"""Only Twilio gets in, and no client can exhaust the server."""
import socket
import time

import pytest
from twilio.request_validator import RequestValidator

import app
from tests.twilio_sim import CHUNK, Call, HandshakeRefused, WSClient

TOKEN = "0123456789abcdef0123456789abcdef"
OTHER_TOKEN = "fedcba9876543210fedcba9876543210"
SILENCE = b"\xff" * CHUNK


@pytest.mark.parametrize("token, url, signature", [  # reference section 5.4
    ("12345", "wss://example.com/media", "7PR3qMkpDyEJtMrVOY/LDyNq8J8="),
    ("12345", "https://example.com/media", "6HZQ7Cq/dSYDCAiy3qRA6PZfACI="),
    ("12345", "wss://example.com:443/media", "zyyJQiPZXIGCLy3HYdHEfry0yDg="),
    ("12345", "wss://example.com:80/media", "bTK2p3+LS6H4a5yPQ8BcEFK6RPI="),
    ("00000000000000000000000000000000", "wss://example.com/media", "rD920Cm1XGT4ldn7pw7CTlde1UE="),
    ("00000000000000000000000000000000", "https://example.com/media", "rSRbeUs+GQHr90aDnC+WmYEueiI="),
])
def test_reference_signature_vectors(token, url, signature):
    assert app.twilio_signature(token, url) == signature


@pytest.mark.parametrize("host, valid", [
    ("example.com", True),            # as signed
    ("example.com:443", True),        # the default port added by a proxy
    ("example.com:8443", True),       # Twilio's validator also accepts the URL without its port
    ("other.example.com", False),
])
def test_signature_check_accepts_the_url_with_and_without_default_port(host, valid):
    assert app.signature_is_valid("12345", host, "/media", "7PR3qMkpDyEJtMrVOY/LDyNq8J8=") is valid


def test_signature_check_rejects_the_https_form_and_garbage():
    assert not app.signature_is_valid("12345", "example.com", "/media", "6HZQ7Cq/dSYDCAiy3qRA6PZfACI=")
    assert not app.signature_is_valid("12345", "example.com", "/media", "")
    assert not app.signature_is_valid("12345", "example.com", "/media", "\u00ff" * 28)


def stream_one_call(server, **headers):
    call = Call()
    client = WSClient(server.url, headers=headers)
    for message in [call.connected(), call.start(), call.media("inbound", SILENCE, 20), call.stop()]:
        client.send(message)
    client.wait_closed()
    return server.summary(call.stream_sid)


def test_signed_handshake_through_ngrok_host_is_accepted(start_server):
    server = start_server(env={"TWILIO_AUTH_TOKEN": TOKEN})
    signature = RequestValidator(TOKEN).compute_signature("wss://abc123.ngrok.app/media", {})
    summary = stream_one_call(server, Host="abc123.ngrok.app", **{"X-Twilio-Signature": signature})
    assert summary["media"] == "1" and summary["ended"] == "stop"
    assert "TWILIO_AUTH_TOKEN is not set" not in server.log()
    assert TOKEN not in server.log() and signature not in server.log()


def test_signed_handshake_with_public_url_is_accepted(start_server):
    server = start_server("--public-url", "https://media.example.com", env={"TWILIO_AUTH_TOKEN": TOKEN})
    signature = RequestValidator(TOKEN).compute_signature("wss://media.example.com/media", {})
    summary = stream_one_call(server, **{"X-Twilio-Signature": signature})  # Host: 127.0.0.1:port
    assert summary["media"] == "1"


@pytest.mark.parametrize("case", ["missing", "wrong", "other token", "https form", "other host"])
def test_bad_signatures_are_refused_with_403_before_the_upgrade(start_server, case):
    server = start_server(env={"TWILIO_AUTH_TOKEN": TOKEN})
    url = "wss://abc123.ngrok.app/media"
    signature = {
        "missing": None,
        "wrong": "7PR3qMkpDyEJtMrVOY/LDyNq8J8=",
        "other token": RequestValidator(OTHER_TOKEN).compute_signature(url, {}),
        "https form": RequestValidator(TOKEN).compute_signature(url.replace("wss", "https"), {}),
        "other host": RequestValidator(TOKEN).compute_signature("wss://evil.example/media", {}),
    }[case]
    headers = {"Host": "abc123.ngrok.app"}
    if signature:
        headers["X-Twilio-Signature"] = signature
    with pytest.raises(HandshakeRefused) as refused:
        WSClient(server.url, headers=headers)
    assert refused.value.status == 403
    line = server.wait_for(r".*refused WebSocket.*").group(0)
    assert "remote=127.0.0.1" in line and "status=403" in line
    assert ("missing X-Twilio-Signature" if case == "missing" else "does not match") in line
    log = server.log()
    assert "Connection accepted" not in log and "summary" not in log
    assert TOKEN not in log and (signature is None or signature not in log)


def test_without_a_token_the_server_says_anyone_can_stream(start_server):
    server = start_server()
    assert "TWILIO_AUTH_TOKEN is not set: anyone who knows this URL can stream to it" in server.log()
    assert stream_one_call(server)["media"] == "1"


def rss_kib(server):
    status = open(f"/proc/{server.process.pid}/status").read()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])


def test_a_frame_announcing_a_gibibyte_is_refused_from_its_header(start_server):
    server = start_server()
    call = Call()
    client = server.connect()
    for message in [call.connected(), call.start(), call.media("inbound", SILENCE, 20)]:
        client.send(message)
    before = rss_kib(server)
    client.send_raw(WSClient.frame(0x1, b"x" * 1000, length=2 ** 30))
    assert client.wait_closed()
    summary = server.summary(call.stream_sid)
    assert summary["ended"] == "error" and summary["media"] == "1"
    assert f"stream={call.stream_sid} frame of {2 ** 30} bytes over the 65536-byte limit" in server.log()
    assert rss_kib(server) - before < 5_000


def test_a_real_4_mib_frame_is_refused_without_memory_growth(start_server):
    server = start_server()
    call = Call()
    client = server.connect()
    client.send(call.connected())
    client.send(call.start())
    before = rss_kib(server)
    try:
        client.send_raw(WSClient.frame(0x1, b"a" * (4 << 20)))
    except OSError:
        pass  # the server may close while we are still sending: that is the point
    assert client.wait_closed()
    assert server.summary(call.stream_sid)["ended"] == "error"
    assert rss_kib(server) - before < 5_000


def test_a_fragmented_message_over_the_limit_is_refused(start_server):
    server = start_server("--max-message-bytes", "1000")
    call = Call()
    client = server.connect()
    client.send(call.connected())
    client.send(call.start())
    for _ in range(3):
        client.send_raw(WSClient.frame(0x1 if _ == 0 else 0x0, b"y" * 400, fin=False))
    assert client.wait_closed()
    assert server.summary(call.stream_sid)["ended"] == "error"
    assert "message over the 1000-byte limit" in server.log()


def test_max_streams_refuses_with_503_before_the_upgrade(start_server):
    server = start_server("--max-streams", "2")
    first, second = server.connect(), server.connect()
    with pytest.raises(HandshakeRefused) as refused:
        server.connect()
    assert refused.value.status == 503
    assert "status=503" in server.log()
    first.close()
    server.wait_for("summary", count=1)
    third = server.connect()  # a place is free again
    third.close()
    second.close()
    server.wait_for("summary", count=3)


def test_idle_stream_is_closed_and_summarized(start_server):
    server = start_server("--idle-timeout", "0.5")
    call = Call()
    client = server.connect()
    client.send(call.connected())
    client.send(call.start())
    started = time.monotonic()
    assert client.wait_closed(5)
    assert time.monotonic() - started < 3
    summary = server.summary(call.stream_sid)
    assert summary["ended"] == "idle"
    assert f"stream={call.stream_sid} nothing received for 0.5 s" in server.log()


def test_a_connection_that_never_sends_a_request_is_dropped(start_server):
    server = start_server("--idle-timeout", "0.5")
    silent = socket.create_connection(("127.0.0.1", server.port))
    half = socket.create_connection(("127.0.0.1", server.port))
    half.sendall(b"GET /media HTTP/1.1\r\nHost: x\r\n")  # never finished
    for sock in (silent, half):
        sock.settimeout(5)
        started = time.monotonic()
        answer = b""
        while chunk := sock.recv(1024):
            answer += chunk
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer
        assert time.monotonic() - started < 3
    assert stream_one_call(server)["media"] == "1", "the server still serves"
    assert "Traceback" not in server.log()
