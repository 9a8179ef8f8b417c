"""Configuration: every setting from a flag or its environment variable, checked at start-up;
a value that cannot work is one line naming both, exit status 2; importing app does nothing."""
import dataclasses
import re
import socket

import pytest

import app
from tests.conftest import LISTENING, ROOT, readme_example, run_app
from tests.twilio_sim import Call


def test_defaults():
    settings = app.read_settings([], environ={})
    assert (settings.host, settings.port, settings.log_level, settings.record) == ("0.0.0.0", 5000, "INFO", None)
    assert (settings.max_message_bytes, settings.max_streams, settings.idle_timeout) == (65536, 1000, 30)
    assert (settings.read_interval_ms, settings.quiet_levels, settings.public_url) == (100, False, None)
    assert (settings.auth_token, settings.trusted_proxies, settings.metrics_port) == (None, 0, None)


@pytest.mark.parametrize("flag, variable, raw, value", [
    ("--port", "PORT", "0", 0), ("--log-level", "LOG_LEVEL", "debug", "DEBUG"),
    ("--record", "RECORD_DIR", "rec", "rec"), ("--quiet-levels", "QUIET_LEVELS", "yes", True),
    ("--public-url", "PUBLIC_URL", "abc.ngrok.app", "abc.ngrok.app"),
    ("--max-message-bytes", "MAX_MESSAGE_BYTES", "1024", 1024), ("--max-streams", "MAX_STREAMS", "1", 1),
    ("--idle-timeout", "IDLE_TIMEOUT", "0", 0), ("--read-interval-ms", "READ_INTERVAL_MS", "40", 40),
    ("--handshake-timeout", "HANDSHAKE_TIMEOUT", "2.5", 2.5),
    ("--max-recording-seconds", "MAX_RECORDING_SECONDS", "60", 60),
    ("--host", "HOST", "127.0.0.1", "127.0.0.1"),
    ("--echo", "ECHO", "1", True), ("--greet", "GREET", "hello.wav", "hello.wav"),
    ("--trusted-proxies", "TRUSTED_PROXIES", "2", 2), ("--metrics-port", "METRICS_PORT", "9100", 9100),
])
def test_each_flag_reads_its_variable_and_the_flag_wins(flag, variable, raw, value):
    name = flag[2:].replace("-", "_")
    assert getattr(app.read_settings([], environ={variable: raw}), name) == value
    if flag in ("--quiet-levels", "--echo"):  # switches
        assert getattr(app.read_settings([flag], environ={variable: "0"}), name) is True
    else:
        assert getattr(app.read_settings([flag, raw], environ={variable: "bogus!"}), name) == value


BAD_VALUES = [  # (flag or None, variable, value, what the message says it should be)
    ("--trusted-proxies", "TRUSTED_PROXIES", "yes", "a whole number from 0 to 10"),
    ("--trusted-proxies", "TRUSTED_PROXIES", "-1", "a whole number from 0 to 10"),
    ("--metrics-port", "METRICS_PORT", "0", "a whole number from 1 to 65535"),
    ("--metrics-port", "METRICS_PORT", "http", "a whole number from 1 to 65535"),
    ("--port", "PORT", "abc", "a whole number from 0 to 65535"),
    ("--port", "PORT", "70000", "a whole number from 0 to 65535"),
    ("--max-streams", "MAX_STREAMS", "ten", "a whole number from 1 to 100000"),
    ("--max-streams", "MAX_STREAMS", "-1", "a whole number from 1 to 100000"),
    ("--max-streams", "MAX_STREAMS", "0", "a whole number from 1 to 100000"),
    ("--max-message-bytes", "MAX_MESSAGE_BYTES", "0", "a whole number from 1024 to 16777216"),
    ("--log-level", "LOG_LEVEL", "verbose", "one of debug, info, warning, error"),
    ("--tracks", "TRACKS", "left", "one of inbound, outbound, both"),
    ("--idle-timeout", "IDLE_TIMEOUT", "30s", "0 (never) or a number of seconds from 1 to 86400"),
    ("--idle-timeout", "IDLE_TIMEOUT", "-5", "0 (never) or a number of seconds from 1 to 86400"),
    ("--idle-timeout", "IDLE_TIMEOUT", "1e-6", "0 (never) or a number of seconds from 1 to 86400"),
    ("--idle-timeout", "IDLE_TIMEOUT", "nan", "0 (never) or a number of seconds from 1 to 86400"),
    ("--idle-timeout", "IDLE_TIMEOUT", "inf", "0 (never) or a number of seconds from 1 to 86400"),
    ("--read-interval-ms", "READ_INTERVAL_MS", "fast", "a number from 0 to 1000"),
    ("--handshake-timeout", "HANDSHAKE_TIMEOUT", "0", "a number from 1 to 300"),
    ("--max-recording-seconds", "MAX_RECORDING_SECONDS", "-1", "a number from 1 to 86400"),
    ("--quiet-levels", "QUIET_LEVELS", "maybe", "1, true, yes, on, or 0, false, no, off"),
    ("--public-url", "PUBLIC_URL", "https://", "a URL with a host, such as https://abc.ngrok.app"),
    ("--public-url", "PUBLIC_URL", "http://[::1", "a URL with a host, such as https://abc.ngrok.app"),
    ("--public-url", "PUBLIC_URL", "ftp://x.com", "a URL with a host, such as https://abc.ngrok.app"),
    ("--public-url", "PUBLIC_URL", "notaurl", "a URL with a host, such as https://abc.ngrok.app"),
    ("--transcribe-model", "TRANSCRIBE_MODEL", "./no/such/model",
     "a Whisper model name such as tiny.en, or a model directory: there is no such directory"),
    ("--host", "HOST", "", "a name"),
    *(("--dial", "DIAL", raw, "a phone number in E.164 (+15551234567) or a SIP URI (sip:agent@example.com)")
      for raw in ("foo", "5551234567", "+0155512", "+1555123456789012", "sip:example.com", "sip:a b@example.com",
                  "+1555<Hangup/>")),
]


@pytest.mark.parametrize("flag, variable, raw, wanted", BAD_VALUES)
def test_a_value_that_cannot_work_is_refused_naming_the_flag_and_its_variable(flag, variable, raw, wanted):
    message = f"{flag} ({variable}): {raw!r} is not {wanted}"
    with pytest.raises(app.SettingsError) as from_environment:
        app.read_settings([], environ={variable: raw})
    assert str(from_environment.value) == message
    if flag != "--quiet-levels":
        with pytest.raises(app.SettingsError) as from_flag:
            app.read_settings([flag, raw], environ={})
        assert str(from_flag.value) == message


@pytest.mark.parametrize("args, env, line", [
    ([], {"PORT": "abc"}, "--port (PORT): 'abc' is not a whole number from 0 to 65535"),
    ([], {"MAX_STREAMS": "ten"}, "--max-streams (MAX_STREAMS): 'ten' is not a whole number from 1 to 100000"),
    ([], {"LOG_LEVEL": "verbose"}, "--log-level (LOG_LEVEL): 'verbose' is not one of debug, info, warning, error"),
    ([], {"IDLE_TIMEOUT": "30s"},
     "--idle-timeout (IDLE_TIMEOUT): '30s' is not 0 (never) or a number of seconds from 1 to 86400"),
    ([], {"READ_INTERVAL_MS": "fast"}, "--read-interval-ms (READ_INTERVAL_MS): 'fast' is not a number from 0 to 1000"),
    (["--idle-timeout", "-5"], {},
     "--idle-timeout (IDLE_TIMEOUT): '-5' is not 0 (never) or a number of seconds from 1 to 86400"),
    (["--max-streams", "-1"], {}, "--max-streams (MAX_STREAMS): '-1' is not a whole number from 1 to 100000"),
    (["--max-message-bytes", "0"], {},
     "--max-message-bytes (MAX_MESSAGE_BYTES): '0' is not a whole number from 1024 to 16777216"),
    ([], {"STREAM_CLASS": "json:JSONDecoder"}, "STREAM_CLASS: 'json:JSONDecoder' is not a subclass of app.MediaStream"),
    ([], {"STREAM_CLASS": "json:NoSuchClass"}, "STREAM_CLASS: cannot load 'json:NoSuchClass': module 'json' has no "
                                               "'NoSuchClass'"),
    ([], {"STREAM_CLASS": "app:Nope"}, "STREAM_CLASS: cannot load 'app:Nope': module 'app' has no 'Nope'"),
    ([], {"STREAM_CLASS": "process_audio"},
     "STREAM_CLASS: 'process_audio' is not module:Class, such as process_audio:Transcribing"),
    ([], {"TWILIO_AUTH_TOKEN": " 0123456789abcdef\n"},
     "TWILIO_AUTH_TOKEN: has spaces or control characters: no signature would match"),
    (["--host", "nonexistent.invalid"], {},
     "--host (HOST): cannot listen on nonexistent.invalid:0: Name or service not known"),
])
def test_the_server_refuses_to_start_with_one_line_and_status_2(args, env, line):
    status, stdout, stderr = run_app(*args, env={"PORT": "0", **env})
    assert (status, stdout, stderr) == (2, "", f"app.py: error: {line}\n")


def test_main_checks_the_stream_class_it_is_given():
    status, _, stderr = run_app(code=f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); import app; "
                                     "app.main(['--port', '0'], stream_class=json.JSONDecoder)")
    assert (status, stderr) == (2, "app.py: error: stream_class is not a subclass of app.MediaStream\n")


def test_an_unwritable_record_dir_stops_the_start_with_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    status, _, stderr = run_app("--port", "0", "--record", str(blocker / "recordings"))
    assert status == 2
    assert stderr == (f"app.py: error: --record (RECORD_DIR): cannot write recordings to "
                      f"'{blocker / 'recordings'}': Not a directory. Pick another directory or fix its permissions.\n")


def test_a_port_in_use_is_one_line(server):
    status, _, stderr = run_app("--host", "127.0.0.1", "--port", str(server.port))
    assert status == 2
    assert stderr == f"app.py: error: --port (PORT): cannot listen on 127.0.0.1:{server.port}: Address already in use\n"


IMPORT_CHECK = """
import logging, os
import geventwebsocket.handler
import app
assert not os.path.exists("should-not-exist"), "a directory was created"
assert not logging.getLogger("mediastreams").handlers, "logging was configured"
assert geventwebsocket.handler.WebSocket is not app.MediaWebSocket, "the library was changed"
del os.environ["PORT"]  # configure() would refuse it: import did not look
app.configure([])
assert os.path.isdir("should-not-exist") and geventwebsocket.handler.WebSocket is app.MediaWebSocket
print("configured")
"""


def test_importing_app_has_no_side_effects(tmp_path):
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + IMPORT_CHECK
    env = {"RECORD_DIR": "should-not-exist", "PORT": "abc", "LOG_LEVEL": "verbose"}
    status, stdout, stderr = run_app(code=code, env=env, cwd=tmp_path)
    assert (status, stdout, stderr) == (1, "", stderr) and "--log-level (LOG_LEVEL): 'verbose'" in stderr
    status, stdout, stderr = run_app(code=code, env={**env, "LOG_LEVEL": "info"}, cwd=tmp_path)
    assert (status, stdout) == (0, "configured\n"), stderr


def test_a_flag_wins_over_a_bad_variable_for_the_same_setting(start_server, tmp_path):
    server = start_server("--record", str(tmp_path / "ok"), env={"RECORD_DIR": "/proc/cannot-write-here"})
    call = Call()
    assert server.stream(call.session(media=2, stop=True)) == 1000
    assert (tmp_path / "ok" / f"{call.stream_sid}_inbound.wav").exists()


@pytest.mark.parametrize("level", ["DEBUG", "INFO", "WARNING", "ERROR"])
def test_where_it_listens_is_printed_at_every_log_level(start_server, level):
    server = start_server("--log-level", level)  # --port 0: the line has the real port
    line = server.wait_for(LISTENING + ".*").group(0)
    assert line.endswith(f"Listening on http://127.0.0.1:{server.port} (this interface only), "
                         f"WebSocket at ws://127.0.0.1:{server.port}/media")
    with socket.create_connection(("127.0.0.1", server.port)):
        pass


def test_all_interfaces_are_said_to_be_all_interfaces(start_server):
    server = start_server("--host", "0.0.0.0")  # the last --host wins over the fixture's 127.0.0.1
    line = server.wait_for(LISTENING + ".*").group(0)
    assert line.endswith(f"Listening on http://localhost:{server.port} (all interfaces: 0.0.0.0), "
                         f"WebSocket at ws://localhost:{server.port}/media")


@pytest.mark.parametrize("args, said", [
    (["--public-url", "https://media.example.com"], "Accepting only handshakes Twilio signed for "
                                                    "wss://media.example.com/media (--public-url)"),
    ([], "Accepting only handshakes Twilio signed for wss://<the request's Host>/media (behind a proxy that "
         "rewrites Host, give --public-url)"),
])
def test_with_a_token_the_start_up_says_which_url_signatures_are_checked_against(start_server, args, said):
    server = start_server(*args, env={"TWILIO_AUTH_TOKEN": "0123456789abcdef0123456789abcdef"})
    assert server.wait_for(re.escape(said))
    assert "TWILIO_AUTH_TOKEN is not set" not in server.log()


def test_debug_logs_parameter_values(start_server):
    server = start_server(env={"LOG_LEVEL": "debug"})
    call = Call(params={"tenant": "acme"})
    server.stream(call.session(stop=True))
    server.wait_for(r"customParameters=\{'tenant': 'acme'\}")


def test_help_lists_every_option_and_what_0_means():
    status, out, _ = run_app("--help")
    assert status == 0
    for flag, variable, *_ in app.OPTIONS:
        assert flag in out and variable in out
    text = " ".join(out.split())
    for meaning in ("0: any free one", "0: never", "0: never (a stream that talks back never is)"):
        assert meaning in text


def test_stream_class_works_under_python_app_py_too(start_server, tmp_path):
    """STREAM_CLASS's module does `import app`: it must get the running module, not a copy."""
    (tmp_path / "process_audio.py").write_text(readme_example())
    server = start_server(env={"STREAM_CLASS": "process_audio:ProcessedStream", "PYTHONPATH": str(tmp_path)})
    call = Call()
    assert server.stream(call.session(media=5, stop=True)) == 1000
    server.wait_for(rf"stream={call.stream_sid} processed chunks=5 seconds=0.10 peak=\d+")


def test_the_readme_options_table_has_every_flag_and_its_variable():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Options"):readme.index("## Troubleshooting")]
    for flag, variable, *_ in app.OPTIONS:
        assert re.search(rf"^\| `{flag}( [^`]+)?` \| `{variable}(=[01])?` \|", table, re.MULTILINE), flag


def test_each_flag_is_said_once_in_settings_and_no_test_rebinds_a_module_constant():
    """A flag's name, variable, default, reader and help are its Settings field's; tuning that
    tests change is a field of app.Limits, passed in, never a module constant rebound."""
    flagged = [f for f in dataclasses.fields(app.Settings) if "read" in f.metadata]
    assert [flag for flag, *_ in app.OPTIONS] == [f.metadata["flag"] or f"--{f.name.replace('_', '-')}" for f in flagged]
    for f in flagged:
        assert f.default == f.metadata["read"](f.metadata["default"]), f"{f.name}: its default, as read"
    rebinding = re.compile(r"^\s*app\.[A-Z][A-Z0-9_]+\s*=|setattr\(app,\s*[\"'][A-Z]", re.MULTILINE)
    for path in sorted((ROOT / "tests").glob("*.py")):
        assert not rebinding.search(path.read_text()), f"{path.name} rebinds a constant of app.py: use app.Limits"
