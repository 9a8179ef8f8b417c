"""app.py type-checks: mypy, pinned in requirements.txt, with the checks tests/mypy.ini lists."""
import subprocess
import sys

from tests.conftest import ROOT


def test_app_type_checks_with_no_errors(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "tests/mypy.ini", "--cache-dir",
                           str(tmp_path / "cache"), "app.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
