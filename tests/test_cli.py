"""The command line, run as a real subprocess."""

from __future__ import annotations

import subprocess
import sys

import lossledger as ll


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lossledger", *args], capture_output=True, text=True, timeout=60)


def test_version():
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"lossledger {ll.__version__}"


def test_info(ledger):
    with ledger.run("r", model="mlp") as run:
        run.log([0, 1], loss=[1.0, 2.0])
        run.end_epoch()
    out = run_cli("info", str(ledger.path))
    assert out.returncode == 0, out.stderr
    assert "samples: 10" in out.stdout and "r: 1 tick(s); streams: loss; model=mlp" in out.stdout


def test_errors_exit_1_with_a_message(tmp_path):
    out = run_cli("info", str(tmp_path / "missing.ll"))
    assert out.returncode == 1
    assert "no ledger at" in out.stderr and "Traceback" not in out.stderr


def test_no_command_prints_help():
    out = run_cli()
    assert out.returncode == 2 and "info" in out.stdout
