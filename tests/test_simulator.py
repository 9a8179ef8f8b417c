"""The simulator as a command: wss:// through a TLS relay with a throw-away certificate, and
every way a call can fail said in one line on stderr with exit status 1, no traceback."""
import asyncio
import re
import socket
import ssl
import subprocess
import sys
import threading

import pytest

from tests.conftest import ROOT, make_certificate, simulator
from tests.twilio_sim import Call, HandshakeRefused, WSClient, tls_context, tone, write_wav


def failed_with(out, line):
    """The command failed with exactly this line on stderr (a regular expression), and nothing else."""
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert re.fullmatch(f"twilio_sim: {line}\n", out.stderr), out.stderr
    return True


PATHS = pytest.mark.parametrize("path", [[], ["--connect"]], ids=["start-stream", "connect-stream"])
SHORT_CALL = ["--seconds", "0.2"]


# --- TLS: a certificate of our own and a relay that ends TLS in front of the server -------

@pytest.fixture(scope="module")
def other_certificate(tmp_path_factory):
    """A self-signed certificate for another name only."""
    return make_certificate(tmp_path_factory.mktemp("tls"), "elsewhere.test", "DNS:elsewhere.test")


class TLSRelay:
    """wss:// on a free port of 127.0.0.1 in front of a server's ws://: TLS ends here and the
    bytes go on unchanged either way, as nginx does in production. One asyncio loop in a
    thread of its own; each side's end of stream is passed on to the other."""

    def __init__(self, target_port, cert, key):
        self.target_port = target_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(lambda loop, context: None)  # a client refusing our certificate: expected
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.run(asyncio.start_server(self.relay, "127.0.0.1", 0, ssl=self.context))
        self.port = self.server.sockets[0].getsockname()[1]

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    async def relay(self, client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(self.pump(client_reader, server_writer), self.pump(server_reader, client_writer))
        for writer in (client_writer, server_writer):
            writer.close()

    @staticmethod
    async def pump(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()  # the client is done sending: so is its connection to the server
            else:
                writer.close()  # TLS has no half-close: the server's end ends the client's connection
        except OSError:
            writer.close()

    def stop(self):
        self.run(self.close())  # in the loop's own thread: asyncio's objects are not thread-safe
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def close(self):
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
def wss(start_server, certificate):
    """(a server, the wss:// URL of a TLS relay in front of it)."""
    server = start_server()
    relay = TLSRelay(server.port, *certificate)
    yield server, f"wss://127.0.0.1:{relay.port}/media"
    relay.stop()


def test_a_wss_call_checked_against_the_cafile_reaches_the_server(wss, certificate):
    server, url = wss
    out = simulator(url, "--cafile", str(certificate[0]), "--seconds", "0.5", "--tracks", "both")
    assert out.returncode == 0 and out.stderr == "", out.stderr
    sid = re.search(r"sent stream=(\S+) media=50 .* closed=1000$", out.stdout.strip()).group(1)
    summary = server.summary(sid)
    assert (summary["ended"], summary["media"]) == ("stop", "50")


def test_a_wss_connect_call_hears_its_echo_through_tls(start_server, certificate, tmp_path):
    """Both ways at once over one TLS connection: the caller's audio out, the echo and its marks back."""
    server = start_server("--echo")
    relay = TLSRelay(server.port, *certificate)
    try:
        out = simulator(f"wss://localhost:{relay.port}/media", "--cafile", str(certificate[0]), "--connect",
                        "--seconds", "1.5", "--jitter-ms", "60")
    finally:
        relay.stop()
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert re.search(r"received media=75 \(1.50 s\) marks=1 .* refused=0 .* closed=1000$", out.stdout.strip()), \
        out.stdout
    sid = re.search(r"sent stream=(\S+)", out.stdout).group(1)
    assert server.summary(sid)["ended"] == "stop"


def test_an_unknown_certificate_is_one_line_and_insecure_skips_the_check(wss):
    server, url = wss
    for path in ([], ["--connect"]):
        out = simulator(url, *SHORT_CALL, *path)
        assert failed_with(out, re.escape(
            f"cannot connect to {url}: certificate verify failed: self-signed certificate (trust the server's "
            "certificate or its CA with --cafile FILE, or skip the check with --insecure)"))
    out = simulator(url, "--insecure", *SHORT_CALL)
    assert out.returncode == 0, out.stderr
    sid = re.search(r"sent stream=(\S+) .* closed=1000$", out.stdout.strip()).group(1)
    assert server.summary(sid)["ended"] == "stop"


def test_the_certificate_must_name_the_urls_host(start_server, other_certificate):
    """--cafile trusts the certificate, not whatever host presents it: the URL's host is checked."""
    server = start_server()
    relay = TLSRelay(server.port, *other_certificate)
    try:
        url = f"wss://localhost:{relay.port}/media"
        out = simulator(url, "--cafile", str(other_certificate[0]), *SHORT_CALL)
    finally:
        relay.stop()
    assert failed_with(out, re.escape(f"cannot connect to {url}: certificate verify failed: Hostname mismatch, "
                                      "certificate is not valid for 'localhost'. (use a host name the "
                                      "certificate holds, or skip the check with --insecure)"))
    assert "Connection accepted" not in server.log()


def test_wss_to_a_plain_ws_server_is_one_line(start_server, certificate):
    server = start_server()
    url = f"wss://127.0.0.1:{server.port}/media"
    assert failed_with(simulator(url, "--cafile", str(certificate[0]), *SHORT_CALL),
                       re.escape(f"cannot connect to {url}: TLS handshake failed: ") + ".*")


def test_the_client_over_tls_reads_close_codes_and_ends(wss, certificate):
    """WSClient(cafile=...): wait_closed() gives the server's close code over TLS, and None
    when the connection ends without one."""
    server, url = wss
    call = Call()
    client = WSClient(url, cafile=str(certificate[0]))
    client.send_all(call.session(media=3, stop=True))
    assert client.wait_closed() == 1000
    client = WSClient(url, ssl_context=tls_context(insecure=True))
    client.send_all(Call().session(media=3))
    server.wait_for(r"first media", count=2)
    server.process.kill()
    assert client.wait_closed() is None
    client.sock.close()


def test_the_client_refuses_an_unknown_certificate_by_default(wss):
    server, url = wss
    with pytest.raises(ssl.SSLCertVerificationError):
        WSClient(url)


# --- Every failure: one line, exit status 1 -----------------------------------------------

@PATHS
def test_a_closed_port_is_one_line(path):
    with socket.socket() as unused:  # bound, never listening: a connection to it is refused
        unused.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{unused.getsockname()[1]}/media"
        out = simulator(url, *SHORT_CALL, *path)
    assert failed_with(out, re.escape(f"cannot connect to {url}: Connection refused"))
    assert out.stdout == ""


@PATHS
def test_a_server_that_never_answers_the_handshake_is_one_line(path):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connections wait in its backlog, unanswered
        url = f"ws://127.0.0.1:{silent.getsockname()[1]}/media"
        out = simulator(url, "--timeout", "0.5", *SHORT_CALL, *path)
    assert failed_with(out, re.escape(f"cannot connect to {url}: no answer within 0.5 s"))


def test_a_host_that_does_not_resolve_is_one_line():
    url = "wss://no-such-host.invalid/media"
    assert failed_with(simulator(url, *SHORT_CALL, timeout=60),
                       re.escape(f"cannot connect to {url}: cannot resolve the host name: ") + ".+")


@PATHS
def test_an_unsigned_call_is_refused_with_403_in_one_line(start_server, path):
    server = start_server(env={"TWILIO_AUTH_TOKEN": "secret"})
    assert failed_with(simulator(server.url, *SHORT_CALL, *path),
                       "handshake refused: 403 Forbidden: missing X-Twilio-Signature")
    assert failed_with(simulator(server.url, "--header", "X-Twilio-Signature: bogus", *SHORT_CALL, *path),
                       re.escape(f"handshake refused: 403 Forbidden: X-Twilio-Signature does not match "
                                 f"wss://127.0.0.1:{server.port}/media"))


def test_a_path_other_than_media_is_refused_with_404_in_one_line(server):
    assert failed_with(simulator(server.url.replace("/media", "/other"), *SHORT_CALL),
                       re.escape("handshake refused: 404 Not Found: no WebSocket route here (Twilio's <Stream> "
                                 "URL must end in /media)"))


@PATHS
def test_a_server_at_its_stream_limit_refuses_with_503_in_one_line(start_server, path):
    server = start_server("--max-streams", "1")
    holder, call = server.open_call(media=1)
    server.wait_for(rf"stream={call.stream_sid} first media")
    try:
        assert failed_with(simulator(server.url, *SHORT_CALL, *path), re.escape(
            "handshake refused: 503 Service Unavailable: 1 streams open already (--max-streams)"))
    finally:
        holder.close()


@PATHS
def test_a_call_the_server_closes_with_an_error_code_is_one_line(start_server, path):
    """A start message over --max-message-bytes: the server ends the call with 1009."""
    server = start_server("--max-message-bytes", "1024")
    out = simulator(server.url, "--param", "notes=" + "x" * 2000, "--seconds", "5", *path)
    assert failed_with(out, r"the server ended the call with close code 1009 \(frame of \d+ bytes over the "
                            r"1024-byte limit\) after \d+ messages")
    assert "closed=1009" in out.stdout, "the summary line still says how the call went"
    assert re.search(r"media=\d \(0\.\d\d s of 5\.00( per track)?", out.stdout), "what was sent, not what was planned"


@PATHS
def test_a_call_the_server_drops_is_one_line(start_server, path):
    """The server's process dies mid-call: no close frame, the connection just ends."""
    server = start_server()
    sim = subprocess.Popen([sys.executable, "-m", "tests.twilio_sim", server.url, "--seconds", "30", *path],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        server.wait_for(r"first media")
        server.process.kill()
        stdout, stderr = sim.communicate(timeout=20)
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait()
    assert failed_with(subprocess.CompletedProcess(sim.args, sim.returncode, stdout, stderr),
                       r"the server dropped the call after \d+ messages")
    assert "closed=without a close frame" in stdout
    sent = re.search(r"media=(\d+) \((\d+\.\d\d) s of 30\.00[ )]", stdout)  # what was sent, not what was planned
    assert sent and 0 < float(sent.group(2)) < 30 and sent.group(2) == f"{int(sent.group(1)) * 0.02:.2f}"


def test_refused_is_still_an_exception_with_status_reason_and_body(start_server):
    server = start_server("--max-streams", "1")
    holder, _ = server.open_call()
    try:
        with pytest.raises(HandshakeRefused) as refused:
            WSClient(server.url)
    finally:
        holder.close()
    assert (refused.value.status, refused.value.reason) == (503, "Service Unavailable")
    assert refused.value.body == b"503 Service Unavailable: 1 streams open already (--max-streams)\n"


@PATHS
def test_seconds_with_a_wav_file_plays_that_much_of_it(server, tmp_path, path):
    wav = tmp_path / "three-seconds.wav"
    write_wav(wav, tone(3.0))
    out = simulator(server.url, "--wav", str(wav), "--seconds", "0.5", *path)
    assert out.returncode == 0, out.stderr
    assert re.search(r"media=25 \(0\.50 s( per track)?[,)]", out.stdout), out.stdout
