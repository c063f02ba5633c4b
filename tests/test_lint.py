"""The code stays clean under ruff, flake8-async (ASYNC) rules included."""

from __future__ import annotations

import shutil
import subprocess
import sys

from .conftest import ROOT


def test_ruff_is_clean():
    ruff = shutil.which("ruff")
    cmd = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    proc = subprocess.run([*cmd, "check", "trioq", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
