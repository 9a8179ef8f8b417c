"""Real servers for the tests: `python app.py` on a free port, its console in a file."""
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.twilio_sim import WSClient

ROOT = Path(__file__).resolve().parent.parent


class Server:
    """One `python app.py` process on 127.0.0.1 and a free port."""

    def __init__(self, tmp_path, *args, env=None, command=None,
                 ready=r"Listening on http://localhost:(\d+)"):
        self.log_path = tmp_path / f"server-{time.monotonic_ns()}.log"
        environment = {k: v for k, v in os.environ.items()
                       if k not in ("HOST", "PORT", "LOG_LEVEL", "RECORD_DIR", "QUIET_LEVELS", "PUBLIC_URL",
                                    "TWILIO_AUTH_TOKEN", "MAX_MESSAGE_BYTES", "MAX_STREAMS", "IDLE_TIMEOUT",
                                    "READ_INTERVAL_MS")}
        environment.update(env or {})
        environment["PYTHONUNBUFFERED"] = "1"
        self.log_file = open(self.log_path, "w")
        command = command or [sys.executable, "app.py", "--host", "127.0.0.1", "--port", "0", *args]
        self.process = subprocess.Popen(command, cwd=ROOT, env=environment,
                                        stdout=self.log_file, stderr=subprocess.STDOUT)
        match = self.wait_for(ready)
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

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()


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
    """Start servers with extra flags or environment; all are stopped after the test."""
    servers = []

    def start(*args, env=None, command=None):
        server = Server(tmp_path, *args, env=env, command=command)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One shared server for tests that only stream ordinary calls into it."""
    server = Server(tmp_path_factory.mktemp("server"))
    yield server
    server.stop()
