"""What a user touches before the first call: TwiML templates, the Werkzeug fix, the simulator, CI."""
import ast
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest
from werkzeug.routing import Map, Rule, WebsocketMismatch

import app
from tests.conftest import ROOT
from tests.twilio_sim import Call, HandshakeRefused

TWIML = sorted((ROOT / "twiml").glob("*.xml"))


def test_there_are_the_four_twiml_templates():
    assert [path.name for path in TWIML] == ["connect.xml", "stream.xml", "stream_both_tracks.xml",
                                             "stream_with_parameters.xml"]


@pytest.mark.parametrize("path", TWIML, ids=lambda p: p.name)
def test_twiml_is_well_formed_and_streams_to_wss_media(path):
    text = path.read_text()
    root = ElementTree.fromstring(text.encode())
    assert root.tag == "Response"
    if path.name == "connect.xml":  # bidirectional: <Connect> holds the call while the stream is open
        stream = root.find("./Connect/Stream")
        assert stream is not None and stream.get("track") in (None, "inbound_track"), "31941 otherwise"
        assert list(root) == [root.find("./Connect")]
    else:
        stream = root.find("./Start/Stream")
        assert stream is not None, "<Start><Stream> as in the tutorial"
        assert root.find("./Dial") is not None
    assert re.fullmatch(r"wss://[^/?]+/media", stream.get("url")), "wss:// and /media, no query string"
    assert "<!--" in text and "Replace" in text, "each template says what to replace"


def test_both_tracks_and_parameters_templates():
    both = ElementTree.parse(ROOT / "twiml/stream_both_tracks.xml").getroot()
    assert both.find("./Start/Stream").get("track") == "both_tracks"
    params = ElementTree.parse(ROOT / "twiml/stream_with_parameters.xml").getroot()
    assert len(params.findall("./Start/Stream/Parameter")) >= 1


def test_flask_sockets_still_needs_our_websocket_rule_fix():
    """If flask-sockets or Werkzeug change so that a plain Rule matches WebSocket requests,
    this fails and the adapter in app.py can go."""
    plain = Map([Rule("/media", endpoint="media")]).bind("localhost", url_scheme="ws")
    with pytest.raises(WebsocketMismatch):
        plain.match("/media")
    ours = app.sockets.url_map.bind("localhost", url_scheme="ws")
    assert ours.match("/media")[0] is app.media


def test_without_the_rule_fix_every_stream_is_lost(start_server):
    """The tutorial's failure, reproduced: flask-sockets' own add_url_rule on today's Werkzeug."""
    server = start_server(server="without-the-rule-fix")
    call = Call()
    try:
        server.stream(call.session(stop=True))
    except HandshakeRefused:
        pass  # refused or accepted and dropped: the stream is lost either way
    assert f"stream={call.stream_sid}" not in server.log()


def test_the_simulator_plays_a_paced_call(start_server):
    server = start_server()
    out = subprocess.run([sys.executable, "-m", "tests.twilio_sim", server.url, "--seconds", "1",
                          "--tracks", "both", "--param", "tenant=demo"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    sid = re.search(r"sent stream=(\S+) media=100 .* closed=1000$", out.stdout.strip()).group(1)
    summary = server.summary(sid)
    assert summary["media"] == "100" and summary["ended"] == "stop"
    assert float(summary["duration"].rstrip("s")) >= 0.9, "paced at 20 ms per message"


def test_the_readme_is_for_users_and_its_two_commands_come_first():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 450, "benchmarks, dated tables and the reasons behind internals go to tests/README.md"
    commands = [n for n, line in enumerate(lines) if line.startswith("python3 -m venv .venv")]
    assert len(commands) == 2 and commands[-1] < 40


def test_ci_runs_the_readme_test_command_word_for_word():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"```sh\n(.*pytest.*)\n```", readme).group(1)
    assert command in (ROOT / ".ci/run").read_text().splitlines()


def test_app_py_starts_where_the_tutorial_starts_and_its_map_is_true():
    """The docstring's map gives each section's first line, "Start here" gives media()'s, and so
    does the README's last line; the tutorial's app and loop come within the first 200 lines."""
    source = (ROOT / "app.py").read_text().splitlines()
    docstring = ast.get_docstring(ast.parse("\n".join(source)))
    entries = re.findall(r"^ +(\d+)  +(\S.*?)(?:  +\S.*)?$", docstring, re.MULTILINE)
    assert len(entries) >= 10
    for number, title in entries:
        first_line = source[int(number) - 1]
        assert re.match(rf"# (===|---) {re.escape(title)}(:| \(| =| -|,)", first_line), \
            f"the map says {title!r} starts at line {number}, where app.py has {first_line!r}"
    mapped = {int(number) for number, _ in entries}
    parts = [n for n, line in enumerate(source, 1) if line.startswith("# === ")]
    assert set(parts) <= mapped, f"parts of app.py missing from the map: {[source[n - 1] for n in parts]}"
    media = source.index("def media(ws):") + 1
    assert media < 200 and source.index("app = Flask(__name__)") < media, "the tutorial's app and loop first"
    assert f"Start here: media(), the tutorial's loop, at line {media}." in docstring
    readme_last = (ROOT / "README.md").read_text().splitlines()[-1]
    assert f"start at `media()`, line {media};" in readme_last


def test_no_test_module_imports_another():
    """What several test modules share lives in tests/conftest.py, found in one place."""
    for path in sorted((ROOT / "tests").glob("*.py")):
        imported = [node.module for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom) and node.module]
        assert not [name for name in imported if name.startswith("tests.test_")], path.name


def test_requirements_pin_by_name_and_version_and_name_no_package_index():
    """Every requirement is name==version; no file of the repository names a package index."""
    for path in (ROOT / "requirements.txt", ROOT / "tests" / "requirements.txt"):
        for line in path.read_text().splitlines():
            line = line.split("#")[0].strip()
            assert not line or line == "-r ../requirements.txt" or re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][\w.]*", line), \
                f"{path.name}: {line!r} is not name==version"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for name in tracked:
        path = ROOT / name
        if path.is_file() and path.suffix in ("", ".txt", ".py", ".md", ".cfg", ".toml", ".ini", ".sh"):
            text = path.read_text(errors="replace")
            assert not re.search(r"pythonhosted\.org|pypi\.org|--(extra-)?index[-]url|--find[-]links", text), name


def test_every_mutation_still_finds_its_text_in_app_py_once():
    """tests/mutations.json breaks app.py one promise at a time; a mutation whose text is gone breaks nothing."""
    source = (ROOT / "app.py").read_text()
    stale = [m["name"] for m in json.loads((ROOT / "tests" / "mutations.json").read_text()) if source.count(m["find"]) != 1]
    assert stale == []
