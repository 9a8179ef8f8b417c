"""Does the suite bite? Break app.py on purpose, one promise at a time, and see a test fail.

    python -m tests.mutations            # every mutation: a table of the test that caught each
    python -m tests.mutations gap dup    # only those whose name contains one of the words

Run by hand (pytest does not collect it). Each mutation replaces one piece of app.py in a
copy of the working tree and runs the whole suite there with -x; a mutation no test catches
is a promise nothing checks. A mutation whose text is no longer in app.py says so: update
it with the code.
"""
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MUTATIONS = [  # (name, the promise, text in app.py, what it becomes)
    ("close-1000-after-stop", "1000 after stop", '"stop": 1000', '"stop": 1001'),
    ("close-1000-after-idle", "1000 after idle", '"idle": 1000', '"idle": 1001'),
    ("close-1001-on-shutdown", "1001 on shutdown", '"shutdown": 1001', '"shutdown": 1000'),
    ("close-1011-on-a-bug", "1011 when a bug ends the stream", '"error": 1011', '"error": 1000'),
    ("close-1002-reserved-bits", "1002 for a protocol error",
     'return self.fail(1002, "reserved bits set without an extension")',
     'return self.fail(1000, "reserved bits set without an extension")'),
    ("unmasked-frames-accepted", "RFC 6455 5.1: unmasked client frames fail",
     "if not second & 0x80:\n", "if False:\n"),
    ("close-1007-invalid-utf8", "1007 for invalid UTF-8",
     'return self.fail(1007, "invalid UTF-8 in a text message")',
     'return self.fail(1002, "invalid UTF-8 in a text message")'),
    ("close-1009-too-large", "1009 over --max-message-bytes",
     'return self.fail(1009, f"frame of', 'return self.fail(1002, f"frame of'),
    ("size-limit-doubled", "the size limit", "if length > self.max_message_bytes:",
     "if length > 2 * self.max_message_bytes:"),
    ("fragments-unlimited", "the size limit across fragments",
     "if len(self.fragments) > self.max_message_bytes:", "if False:"),
    ("control-frame-126", "control frames up to 125 bytes", "(not fin or length > 125)", "(not fin or length > 126)"),
    ("close-codes-5000-accepted", "RFC 6455 7.4: close codes a peer may send", "3000 <= code <= 4999",
     "3000 <= code"),
    ("no-pong", "a ping is answered", "self.outgoing += server_frame(OP_PONG, payload)", "pass"),
    ("no-closing-handshake", "the client reads our code, not a reset",
     "with gevent.Timeout(CLOSE_TIMEOUT, False):", "with gevent.Timeout(0.0001, False):"),
    ("idle-while-closing", "a stream that is closing is not also idle",
     "self.last_received = math.inf  # the closing wait", "pass  # the closing wait"),
    ("close-reason-cut-anywhere", "a close reason of whole characters", '.decode(errors="ignore").encode()  # 5.5', "  # 5.5"),
    ("gaps-not-counted", "gap counting", "timestamp > track.end_ms + GAP_MS", "timestamp > track.end_ms + 10 * GAP_MS"),
    ("duplicates-kept", "duplicate drop", "if sequence == self.last_sequence:", "if False:"),
    ("out-of-order-not-counted", "out-of-order counting", "self.out_of_order += 1", "pass"),
    ("bad-input-not-counted", "bad-input counting", "self.bad[bad.kind] = self.bad.get(bad.kind, 0) + 1",
     "self.bad[bad.kind] = 1"),
    ("boolean-sequence-accepted", "JSON true is not a number", "or value is True or value is False", ""),
    ("signature-ignored", "the signature check", "    return valid\n", "    return True\n"),
    ("idle-never", "the idle timeout", "if ws.last_received < silent_since:", "if False:"),
    ("max-streams-plus-one", "--max-streams", "if len(open_websockets) >= settings.max_streams:",
     "if len(open_websockets) > settings.max_streams:"),
    ("recording-gaps-not-filled", "recording gap fill", "if missing > self.SILENCE_SLACK:", "if False:"),
    ("no-shutdown-summaries", "shutdown summaries",
     "gevent.killall([ws.greenlet for ws in open_websockets], block=True, timeout=STREAM_END_SECONDS)", "pass"),
    ("werkzeug-fix-undone", "the Werkzeug fix", "Rule(rule, endpoint=f, websocket=True)", "Rule(rule, endpoint=f)"),
    ("log-lines-forgeable", "no forged log lines", 'c if c.isprintable() else "?"', "c"),
    ("settings-unchecked", "settings checked", "if not low <= value <= high:", "if False:"),
    ("listening-line-at-info", "where it listens, at every log level", 'startup_log.info("Listening on',
     'log.info("Listening on'),
    ("pcm-always-off", "on_audio gets PCM when asked", "self.decoding = self.wants_pcm or bool(settings.record)",
     "self.decoding = bool(settings.record)"),
]


def run(name, old, new):
    """(status, the first failing test) of the suite on app.py with `old` made `new`."""
    source = (ROOT / "app.py").read_text()
    if source.count(old) != 1:
        return "stale", f"the text is in app.py {source.count(old)} times, not once"
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as folder:
        copy = Path(folder) / "repo"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache"))
        (copy / "app.py").write_text(source.replace(old, new))
        out = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf"],
                             cwd=copy, capture_output=True, text=True, timeout=900)
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", out.stdout, re.MULTILINE)
    if out.returncode == 0:
        return "SURVIVED", "no test failed"
    return "caught", failed.group(1) if failed else out.stdout.strip().splitlines()[-1]


def main(words):
    chosen = [m for m in MUTATIONS if not words or any(w in m[0] for w in words)]
    rows = []
    for name, promise, old, new in chosen:
        started = time.monotonic()
        status, detail = run(name, old, new)
        rows.append((name, promise, status, detail))
        print(f"{name}: {status} ({time.monotonic() - started:.0f} s) {detail}", file=sys.stderr, flush=True)
    print("| mutation | promise | result | first test that failed |")
    print("| --- | --- | --- | --- |")
    for name, promise, status, detail in rows:
        print(f"| {name} | {promise} | {status} | `{detail}` |")
    return 1 if any(status != "caught" for _, _, status, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
