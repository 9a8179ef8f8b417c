"""Does the suite bite? Break app.py on purpose, one promise at a time, and see a test fail.

    python -m tests.mutations            # every mutation: a table of the test that caught each
    python -m tests.mutations gap dup    # only those whose name contains one of the words

Run by hand (pytest does not collect it). Each mutation in mutations.json replaces one
piece of app.py in a copy of the working tree and runs the whole suite there with -x; a
mutation no test catches is a promise nothing checks. A mutation whose text is no longer
in app.py says so: update it with the code.
"""
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SELF_CHECK = "tests/test_setup.py::test_every_mutation_still_finds_its_text_in_app_py_once"
MUTATIONS = json.loads((ROOT / "tests" / "mutations.json").read_text())  # name, promise, find, replace


def run(name, old, new):
    """(status, the first failing test) of the suite on app.py with `old` made `new`."""
    source = (ROOT / "app.py").read_text()
    if source.count(old) != 1:
        return "stale", f"the text is in app.py {source.count(old)} times, not once"
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as folder:
        copy = Path(folder) / "repo"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache"))
        (copy / "app.py").write_text(source.replace(old, new))
        out = subprocess.run([sys.executable, "-m", "pytest", "-n", "4", "-x", "-q", "-p", "no:cacheprovider", "-rf",
                              "--deselect", SELF_CHECK],  # it fails for every mutant: it would hide what else does
                             cwd=copy, capture_output=True, text=True, timeout=900)
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", out.stdout, re.MULTILINE)
    if out.returncode == 0:
        return "SURVIVED", "no test failed"
    return "caught", failed.group(1) if failed else out.stdout.strip().splitlines()[-1]


def main(words):
    chosen = [m for m in MUTATIONS if not words or any(w in m["name"] for w in words)]
    rows = []
    for m in chosen:
        started = time.monotonic()
        status, detail = run(m["name"], m["find"], m["replace"])
        rows.append((m["name"], m["promise"], status, detail))
        print(f"{m['name']}: {status} ({time.monotonic() - started:.0f} s) {detail}", file=sys.stderr, flush=True)
    print("| mutation | promise | result | first test that failed |")
    print("| --- | --- | --- | --- |")
    for name, promise, status, detail in rows:
        print(f"| {name} | {promise} | {status} | `{detail}` |")
    return 1 if any(status != "caught" for _, _, status, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
