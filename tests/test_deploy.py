"""Production: behind nginx with TLS, watched by Prometheus, checked by a load balancer.

nginx and Prometheus are the real servers, Debian's `nginx` and `prometheus` packages
(`.ci/run` installs them); a test that needs one skips, saying so, where it is absent."""
import glob
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from twilio.request_validator import RequestValidator

from tests.conftest import GUNICORN_READY, ROOT, fetch_url, free_port, gunicorn_command, run_app, simulator
from tests.twilio_sim import CHUNK, Call, HandshakeRefused, WSClient

README = (ROOT / "README.md").read_text()
TOKEN = "0123456789abcdef0123456789abcdef"


def wait_until(check, timeout: float, what: str):
    """check()'s first true value within `timeout` s; polls, as the thing checked lives in another process."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


def program(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if not path:
        pytest.skip(f"{name} is not installed (Debian: apt-get install {name}; .ci/run installs it)")
    return path


@pytest.fixture
def background():
    """start(command, log path): a process of a real third-party server, stopped after the test."""
    started = []

    def start(command, log_path):
        with open(log_path, "w") as log:
            started.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
        return started[-1]

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:  # not what the test is about: do not let it fail for that
            process.kill()
            process.wait()


# --- What any client of the app's port sees --------------------------------------------------

def test_the_index_names_both_urls_and_the_public_one_when_given(start_server):
    plain = start_server()
    status, text = fetch_url(plain.http_url + "/")
    assert status == 200
    assert f"wss://127.0.0.1:{plain.port}/media through a TLS proxy" in text
    assert f"ws://127.0.0.1:{plain.port}/media without one" in text
    public = start_server("--public-url", "https://abc.ngrok.app")
    assert fetch_url(public.http_url + "/")[1] == "Twilio Media Streams server is up. WebSocket: wss://abc.ngrok.app/media " \
                                             "(--public-url)\n"


def test_healthz_counts_open_streams_and_says_503_when_full(start_server):
    server = start_server("--max-streams", "2")
    assert fetch_url(server.http_url + "/healthz") == (200, "ok streams=0\n")
    first, first_call = server.open_call(media=1)
    server.wait_for(rf"stream={first_call.stream_sid} first media")
    assert fetch_url(server.http_url + "/healthz") == (200, "ok streams=1\n")
    second, second_call = server.open_call(media=1)
    server.wait_for(rf"stream={second_call.stream_sid} first media")
    assert fetch_url(server.http_url + "/healthz") == (503, "full streams=2 (--max-streams)\n")
    for client, call in ((first, first_call), (second, second_call)):
        client.send(call.stop())
        assert client.wait_closed() == 1000
        server.summary(call.stream_sid)
    assert fetch_url(server.http_url + "/healthz") == (200, "ok streams=0\n")


# --- Behind nginx, over TLS ------------------------------------------------------------------

def readme_location_blocks() -> str:
    """The `location` blocks of the README's nginx configuration (/media, /healthz), as written."""
    config = re.search(r"```nginx\n(.*?)```", README, re.DOTALL).group(1)
    blocks = []
    for start in (match.start() for match in re.finditer(r"^ *location ", config, re.MULTILINE)):
        depth = 0
        for end, char in enumerate(config[start:], start):
            depth += {"{": 1, "}": -1}.get(char, 0)
            if char == "}" and depth == 0:
                blocks.append(config[start:end + 1])
                break
        else:
            raise AssertionError("a location block of the README's does not close")
    assert len(blocks) == 2, blocks
    return "\n".join(blocks)


@pytest.fixture
def nginx(tmp_path, certificate, background):
    """start(upstream port): a real nginx terminating TLS on a free port in front of it, with
    the README's location blocks verbatim; returns its port."""
    binary = program("nginx")

    def start(upstream_port: int) -> int:
        port, prefix = free_port(), tmp_path / "nginx"
        prefix.mkdir()
        cert, key = certificate
        (prefix / "nginx.conf").write_text(f"""
daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy; fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
    upstream media_servers {{ server 127.0.0.1:{upstream_port}; }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        proxy_bind 127.0.0.5;  # our server sees the proxy at another address than the caller's
{readme_location_blocks()}
    }}
}}
""")
        process = background([binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e",
                              str(prefix / "error.log")], prefix / "console.log")
        wait_until(lambda: listening(port) or process.poll() is not None, 15, f"nginx on port {port}")
        assert process.poll() is None, (prefix / "error.log").read_text()
        return port

    def listening(port):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    return start


def test_a_signed_wss_call_through_nginx_as_the_readme_configures_it(start_server, nginx, certificate):
    server = start_server("--trusted-proxies", "1", env={"TWILIO_AUTH_TOKEN": TOKEN})
    port = nginx(server.port)
    url = f"wss://localhost:{port}/media"  # Twilio signs the URL it was given, port and all
    played = simulator(url, "--seconds", "1", "--cafile", str(certificate[0]), "--header",
                      f"X-Twilio-Signature:{RequestValidator(TOKEN).compute_signature(url, {})}")
    assert played.returncode == 0, played.stderr
    accepted = server.wait_for(r"Connection accepted remote=(\S+)")
    assert accepted.group(1) == "127.0.0.1", "the caller's address, from X-Forwarded-For; nginx is at 127.0.0.5"
    stream_sid = server.wait_for(r"stream=(\S+) start call=").group(1)
    summary = server.summary(stream_sid)
    assert (summary["ended"], summary["media"], summary["bad"]) == ("stop", "50", "0")

    forged = simulator(url, "--seconds", "1", "--cafile", str(certificate[0]), "--header", "X-Twilio-Signature:forged")
    assert forged.returncode != 0 and len(forged.stderr.strip().splitlines()) == 1, forged.stderr
    assert "403" in forged.stderr
    server.wait_for(rf"refused WebSocket remote=127\.0\.0\.1 path=/media status=403 reason=X-Twilio-Signature does "
                    rf"not match wss://localhost:{port}/media")
    context = ssl.create_default_context(cafile=str(certificate[0]))
    health = urllib.request.urlopen(f"https://localhost:{port}/healthz", context=context, timeout=10)
    assert (health.status, health.read()) == (200, b"ok streams=0\n"), "the balancer reaches /healthz through nginx"


# --- Client addresses behind proxies ------------------------------------------------------------

@pytest.mark.parametrize("proxies, forwarded, remote", [
    (0, "203.0.113.9", "127.0.0.1"),                  # trusted by no one: the header is anyone's
    (1, "203.0.113.9", "203.0.113.9"),
    (1, "198.51.100.1, 203.0.113.9", "203.0.113.9"),  # the client's own claim comes first: not trusted
    (2, "198.51.100.1, 203.0.113.9", "198.51.100.1"),
    (2, "203.0.113.9", "127.0.0.1"),                  # fewer addresses than proxies: none is trusted
    (1, "not-an-address\nforged line", "127.0.0.1"),
    (1, "fe80::1%x remote=203.0.113.66 forged", "127.0.0.1"),  # an IPv6 scope id may hold any text
    (1, "", "127.0.0.1"),
])
def test_the_client_address_comes_from_x_forwarded_for_only_through_trusted_proxies(
        start_server, proxies, forwarded, remote):
    server = start_server("--trusted-proxies", str(proxies))
    call = Call()
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    client = WSClient(server.url, headers={name: value.replace("\n", " ") for name, value in headers.items()})
    client.send_all(call.session(stop=True))
    assert client.wait_closed() == 1000
    server.wait_for(rf"Connection accepted remote={re.escape(remote)}\n")
    server.wait_for(rf"remote={re.escape(remote)} connected protocol=Call")


def test_a_refused_handshake_names_the_forwarded_client(start_server):
    server = start_server("--trusted-proxies", "1", env={"TWILIO_AUTH_TOKEN": "secret"})
    with pytest.raises(HandshakeRefused):
        WSClient(server.url, headers={"X-Forwarded-For": "2001:db8::7"})
    server.wait_for(r"refused WebSocket remote=2001:db8::7 path=/media status=403 reason=missing X-Twilio-Signature")


# --- Metrics ------------------------------------------------------------------------------------

def scrape(url: str) -> dict:
    """{'name{labels}': value} of a Prometheus text exposition."""
    values = {}
    for line in fetch_url(url)[1].splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_count_what_the_summaries_count(start_server, tmp_path):
    metrics_port = free_port()
    server = start_server("--metrics-port", str(metrics_port), "--record", str(tmp_path / "rec"))
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    both, dropped = Call(tracks=("inbound", "outbound")), Call()
    server.stream([*both.session(media=7), both.media("outbound", b"\xff" * CHUNK, 20), "{bad json", both.stop()])
    messages = dropped.session(media=3)
    client = server.connect()
    client.send_all([*messages, messages[-1], messages[-2]])  # a duplicate, one out of order, then the socket drops
    server.wait_for(rf"stream={dropped.stream_sid} first media")
    client.sock.close()
    with pytest.raises(HandshakeRefused):
        WSClient(server.url.replace("/media", "/nope"))
    summary = server.summary(dropped.stream_sid)
    assert (summary["media"], summary["duplicates"], summary["out_of_order"]) == ("4", "1", "1")
    values = scrape(metrics)
    assert values['mediastreams_media_messages_total{track="inbound"}'] == 7 + 4
    assert values['mediastreams_media_messages_total{track="outbound"}'] == 1
    assert values['mediastreams_audio_seconds_total{track="inbound"}'] == pytest.approx(11 * CHUNK / 8000)
    assert values['mediastreams_streams_ended_total{ended="stop"}'] == 1
    assert values['mediastreams_streams_ended_total{ended="disconnect"}'] == 1
    assert values['mediastreams_bad_messages_total{kind="invalid_json"}'] == 1
    assert values["mediastreams_duplicate_messages_total"] == values["mediastreams_out_of_order_messages_total"] == 1
    assert values['mediastreams_handshakes_refused_total{reason="path",status="404"}'] == 1
    assert values['mediastreams_recordings_total{result="written"}'] == 3  # two tracks, then one
    assert values["mediastreams_streams_open"] == 0
    assert "process_resident_memory_bytes" in values


def test_open_streams_are_counted_while_they_last(start_server):
    metrics_port = free_port()
    server = start_server("--metrics-port", str(metrics_port))
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    client, call = server.open_call(media=25)
    wait_until(lambda: scrape(metrics).get('mediastreams_media_messages_total{track="inbound"}') == 25, 5,
               "the open stream's 25 messages counted")
    assert scrape(metrics)["mediastreams_streams_open"] == 1
    client.send(call.stop())
    assert client.wait_closed() == 1000
    server.summary(call.stream_sid)
    assert scrape(metrics)["mediastreams_streams_open"] == 0


def test_metrics_port_in_use_or_library_missing_stops_the_server_at_start():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        status, _, err = run_app("--host", "127.0.0.1", "--port", "0", "--metrics-port", str(taken.getsockname()[1]))
    assert status == 2 and re.fullmatch(r"app\.py: error: --metrics-port \(METRICS_PORT\): cannot listen on "
                                        r"127\.0\.0\.1:\d+: Address already in use\n", err), err
    without_the_library = ("import runpy, sys; sys.modules['prometheus_client'] = None; "
                           "sys.argv = ['app.py', '--metrics-port', '9999']; runpy.run_path('app.py', run_name='__main__')")
    status, _, err = run_app(code=without_the_library)
    assert (status, err) == (2, "app.py: error: --metrics-port (METRICS_PORT) needs the Prometheus client: "
                                "pip install prometheus-client==0.26.0\n")


@pytest.fixture
def prometheus(tmp_path, background):
    """A real Prometheus server scraping `targets` every second; query(expr) reads a value back
    through its HTTP API."""
    binary = program("prometheus")

    def start(*targets):
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(json.dumps({"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                                      "scrape_configs": [{"job_name": "mediastreams",
                                                          "static_configs": [{"targets": list(targets)}]}]}))
        background([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}"], tmp_path / "prometheus.log")
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: ready(url), 30, f"Prometheus ready at {url}:\n{(tmp_path / 'prometheus.log').read_text()}")

        def query(expression: str) -> float | None:
            answer = json.loads(fetch_url(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expression}))[1])
            result = answer["data"]["result"]
            return float(result[0]["value"][1]) if result else None
        return query

    def ready(url):
        try:
            return fetch_url(url + "/-/ready", timeout=1)[0] == 200
        except OSError:
            return False

    return start


def worker_open_streams(folder: Path) -> dict:
    """{worker pid: streams it has open}, from the files gunicorn's workers share metrics by."""
    from prometheus_client.multiprocess import MultiProcessCollector
    counts = {}
    for path in glob.glob(str(folder / "gauge_livesum_*.db")):
        for metric in MultiProcessCollector._read_metrics([path]).values():
            for sample in metric.samples:
                if sample.name == "mediastreams_streams_open":
                    counts[int(Path(path).stem.rsplit("_", 1)[1])] = sample.value
    return counts


def test_prometheus_reads_exact_sums_over_two_gunicorn_workers(start_server, prometheus, tmp_path):
    metrics_port, folder = free_port(), tmp_path / "multiprocess"
    folder.mkdir()
    server = start_server(command=gunicorn_command("-w", "2", "--graceful-timeout", "3"), ready=GUNICORN_READY,
                          env={"METRICS_PORT": str(metrics_port), "PROMETHEUS_MULTIPROC_DIR": str(folder)})
    server.wait_for(r"Booting worker", count=2)
    query = prometheus(f"127.0.0.1:{metrics_port}")
    calls, clients = [], []
    while len([n for n in worker_open_streams(folder).values() if n]) < 2:  # until both workers hold a call
        assert len(calls) < 40, f"40 calls, all in one worker: {worker_open_streams(folder)}"
        calls.append(Call())
        clients.append(server.connect())
        clients[-1].send_all(calls[-1].session(media=1))
        server.wait_for(rf"stream={calls[-1].stream_sid} first media")
    for n, (client, call) in enumerate(zip(clients, calls)):
        client.send_all([*(call.media("inbound", b"\xff" * CHUNK, 20 * (i + 2)) for i in range(n)), call.stop()])
        assert client.wait_closed() == 1000
    sent = sum(1 + n for n in range(len(calls)))
    assert sum(int(server.summary(call.stream_sid)["media"]) for call in calls) == sent
    wait_until(lambda: query("sum(mediastreams_media_messages_total)") == sent, 20,
               f"Prometheus to read {sent} messages (reads {query('sum(mediastreams_media_messages_total)')})")
    assert query('sum(mediastreams_streams_ended_total{ended="stop"})') == len(calls)
    assert query("sum(mediastreams_streams_open)") == 0


def test_without_metrics_the_prometheus_client_is_not_even_imported():
    status, out, err = run_app(code="import sys, app; app.configure([]); print('prometheus_client' in sys.modules)")
    assert (status, out) == (0, "False\n"), err


def test_metrics_count_the_streams_of_a_dataclass_subclass(start_server, tmp_path):
    """A subclass declared with a plain @dataclass has no hash: metrics must not need one."""
    (tmp_path / "my_stream.py").write_text("from dataclasses import dataclass\nimport app\n\n\n"
                                           "@dataclass\nclass MyStream(app.MediaStream):\n    pass\n")
    metrics_port = free_port()
    server = start_server("--metrics-port", str(metrics_port),
                          env={"STREAM_CLASS": "my_stream:MyStream", "PYTHONPATH": str(tmp_path)})
    call = Call()
    assert server.stream(call.session(media=5, stop=True)) == 1000
    assert server.summary(call.stream_sid)["media"] == "5"
    assert scrape(f"http://127.0.0.1:{metrics_port}/metrics")['mediastreams_media_messages_total{track="inbound"}'] == 5


def test_a_worker_killed_with_calls_open_no_longer_counts_them(start_server, tmp_path):
    metrics_port, folder = free_port(), tmp_path / "multiprocess"
    folder.mkdir()
    server = start_server(command=gunicorn_command("-w", "2", "--graceful-timeout", "3"), ready=GUNICORN_READY,
                          env={"METRICS_PORT": str(metrics_port), "PROMETHEUS_MULTIPROC_DIR": str(folder)})
    server.wait_for(r"Booting worker", count=2)
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    client, call = server.open_call(media=1)
    server.wait_for(rf"stream={call.stream_sid} first media")
    wait_until(lambda: scrape(metrics).get("mediastreams_streams_open") == 1, 10, "the stream counted as open")
    (worker,) = [pid for pid, streams in worker_open_streams(folder).items() if streams]
    os.kill(worker, 9)
    assert client.wait_closed() is None  # no close frame: the process is gone
    wait_until(lambda: scrape(metrics).get("mediastreams_streams_open") == 0, 10,
               f"the dead worker's stream uncounted: {fetch_url(metrics)}")


def test_the_metrics_port_listens_on_this_machine_alone_unless_told(start_server):
    """Call counts, alert categories and refusals are for your Prometheus: 127.0.0.1 unless
    --metrics-host says otherwise (as the floor's --floor-host)."""
    port = free_port()
    server = start_server("--metrics-port", str(port))
    server.wait_for(rf"Metrics for Prometheus at http://127.0.0.1:{port}/metrics")
    listening = [line.split()[1] for line in open("/proc/net/tcp").read().splitlines()[1:]
                 if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"]
    assert listening == [f"0100007F:{port:04X}"], "bound to 127.0.0.1 only"
    other = start_server("--metrics-port", str(free_port()), "--metrics-host", "0.0.0.0")
    other.wait_for(r"Metrics for Prometheus at http://0.0.0.0:\d+/metrics")
