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


def test_top_and_sql_formats(ledger, tmp_path):
    with ledger.run("r") as run:
        run.log([0, 1, 2], loss=[1.0, 3.0, 2.0])
        run.end_epoch()
    out = run_cli("top", str(ledger.path), "-k", "2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["rank", "sample_id", "label", "class"]
    assert lines[2].split()[:2] == ["1", "1"] and lines[3].split()[:2] == ["2", "2"] and lines[-1] == "(2 rows)"
    out = run_cli("top", str(ledger.path), "-k", "1", "--easiest", "--format", "csv")
    assert out.stdout.splitlines()[1].startswith("1,0,0,")
    target = tmp_path / "top.parquet"
    assert run_cli("top", str(ledger.path), "--format", "parquet", "-o", str(target)).returncode == 0
    import pyarrow.parquet as pq

    assert pq.read_table(target).num_rows == 3
    out = run_cli("sql", str(ledger.path), "SELECT count(*) AS n FROM losses", "--format", "json")
    assert out.returncode == 0 and out.stdout.strip() == '[{"n": 3}]'


def test_sql_errors_exit_1(ledger):
    out = run_cli("sql", str(ledger.path), "SELECT nope FROM samples")
    assert out.returncode == 1 and "SQL error" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("top", str(ledger.path), "--format", "parquet")
    assert out.returncode == 2 and "--output" in out.stderr


def test_export_writes_parquet(ledger, tmp_path):
    import pyarrow.parquet as pq

    with ledger.run("r") as run:
        run.log([0, 1], loss=[1.0, 2.0])
        run.end_epoch()
    out = run_cli("export", str(ledger.path), str(tmp_path / "s.parquet"), "--run", "r", "--dt", "step")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"wrote {tmp_path / 's.parquet'}"
    table = pq.read_table(tmp_path / "s.parquet")
    assert table.num_rows == 10 and table["action"].to_pylist()[:3] == [1.0, 2.0, None]
    missing = run_cli("export", str(ledger.path), str(tmp_path / "no" / "s.parquet"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_compare_runs(ledger):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        with ledger.run(name) as run:
            run.log(list(range(10)), loss=[scale * (i % 4) for i in range(10)])
            run.end_epoch()
    out = run_cli("compare", str(ledger.path), "a", "b", "--quantiles", "0.5", "--format", "csv")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == '"run_a","run_b","group","quantile","n","r"'
    assert lines[1].startswith('"a","b","all",,10,1') and len(lines) == 1 + 4 * 2  # all + 3 classes, 2 quantiles
    bad = run_cli("compare", str(ledger.path), "a", "b", "--quantiles", "half")
    assert bad.returncode == 2 and "comma-separated fractions" in bad.stderr
    one = run_cli("compare", str(ledger.path), "a")
    assert one.returncode == 1 and "Traceback" not in one.stderr


def test_maps_writes_pixel_maps_of_the_hardest(ledger, tmp_path):
    import numpy as np

    with ledger.run("seg") as run:
        for t in range(2):
            maps = np.arange(10 * 4 * 5, dtype=np.float32).reshape(10, 4, 5) / (t + 1)
            run.log(list(range(10)), pixel=maps)
            run.end_epoch()
    np.save(tmp_path / "images.npy", np.zeros((10, 4, 5), np.float32))
    out = run_cli("maps", str(ledger.path), str(tmp_path / "maps"), "--top", "2", "--images", str(tmp_path / "images.npy"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"wrote 2 sample map(s) to {tmp_path / 'maps'}"
    action = np.load(tmp_path / "maps" / "sample9_action.npy")  # the hardest: the largest values
    np.testing.assert_allclose(action, np.arange(180, 200, dtype=np.float32).reshape(4, 5) * 1.5)
    assert (tmp_path / "maps" / "top.png").stat().st_size > 0
    missing = run_cli("maps", str(ledger.path), str(tmp_path / "m2"), "--images", str(tmp_path / "nope.npy"))
    assert missing.returncode == 1 and "no file at" in missing.stderr
