"""Only Twilio gets in, and no client can exhaust the server."""

import pytest
from twilio.request_validator import RequestValidator

import app
from tests.twilio_sim import Call, HandshakeRefused, WSClient, frame

TOKEN = "0123456789abcdef0123456789abcdef"
OTHER_TOKEN = "fedcba9876543210fedcba9876543210"


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
    assert server.stream(call.session(media=1, stop=True), **headers) == 1000
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
    server.wait_for("TWILIO_AUTH_TOKEN is not set: anyone who knows this URL can stream to it")  # after "Listening"
    assert stream_one_call(server)["media"] == "1"


def rss_kib(server):
    status = open(f"/proc/{server.process.pid}/status").read()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])


@pytest.mark.parametrize("big", [frame(0x1, b"x" * 1000, length=2 ** 30), frame(0x1, b"a" * (4 << 20))],
                         ids=["announcing-a-gibibyte", "a-real-4-mib"])
def test_a_frame_over_the_limit_costs_no_memory(start_server, big):
    server = start_server()
    client, call = server.open_call(media=1)
    before = rss_kib(server)
    client.send_raw(big)  # the 4 MiB are read and dropped after the refusal: no reset
    assert server.ending(client, call) == (1009, "error", "1")
    assert rss_kib(server) - before < 5_000


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


def test_recordings_are_readable_by_the_servers_user_only(start_server, tmp_path):
    """A call is private: the directory --record creates, and each file in it, are the
    server's user's alone, whatever the umask (shared on purpose with chmod, README)."""
    server = start_server("--record", str(tmp_path / "new" / "recordings"))
    call = Call(tracks=("inbound", "outbound"))
    assert server.stream([*call.session(media=3), call.media("outbound", b"\xff" * 160, 20), call.stop()]) == 1000
    folder = tmp_path / "new" / "recordings"
    assert folder.stat().st_mode & 0o777 == 0o700
    recordings = sorted(folder.glob(f"{call.stream_sid}_*.wav"))
    assert len(recordings) == 2 and all(path.stat().st_mode & 0o777 == 0o600 for path in recordings)
