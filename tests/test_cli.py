"""The command line, run as a real subprocess."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

import lossledger as ll


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lossledger", *args], capture_output=True, text=True, timeout=60,
                          check=False)


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


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    """A closed 90-sample ledger (3 classes, 2 splits): run "r" with 8 ticks of loss (three curve shapes, a few
    samples missing at some ticks, two never observed) and a (4,) embedding at the last tick (sample 5 not logged)."""
    rng = np.random.default_rng(7)
    n, n_ticks = 90, 8
    path = tmp_path_factory.mktemp("cli") / "curves.ll"
    led = ll.create(path, n_samples=n, labels=np.arange(n) % 3, classes=["a", "b", "c"],
                    splits=["train" if i % 4 else "val" for i in range(n)])
    t = np.arange(n_ticks)
    shape = np.stack([np.exp(-t / 2), np.ones(n_ticks), 0.2 + t / n_ticks])  # falling, flat, rising
    loss = (shape[np.arange(n) % 3] * rng.uniform(0.5, 2.0, (n, 1)) + rng.uniform(0, 0.05, (n, n_ticks)))
    embedding = rng.normal(size=(n, 4)) + (np.arange(n) % 3)[:, None]
    with led.run("r") as run:
        for tick in range(n_ticks):
            seen = np.flatnonzero((np.arange(n) < n - 2) & (rng.random(n) > 0.1))
            run.log(seen, loss=loss[seen, tick])
            if tick == n_ticks - 1:
                have = np.setdiff1d(np.arange(n), [5])
                run.log(have, embedding=embedding[have])
            run.end_epoch()
    led.close()
    np.save(path.parent / "features.npy", embedding[::-1].copy())
    return ll.open(path), path.parent / "features.npy"


def read_parquet(tmp_path, *args):
    """Run the CLI with ``--format parquet`` and read what it wrote."""
    import pyarrow.parquet as pq

    target = tmp_path / f"{args[0]}.parquet"
    out = run_cli(*args, "--format", "parquet", "-o", str(target))
    assert out.returncode == 0, out.stderr
    return pq.read_table(target)


def assert_same(written, expected):
    """Same columns, types and values (NaN equal to NaN, null to null)."""
    assert written.schema.remove_metadata() == expected.schema.remove_metadata()
    for name in expected.column_names:
        if pa.types.is_floating(expected.schema.field(name).type):
            np.testing.assert_array_equal(written[name].to_numpy(), expected[name].to_numpy(), err_msg=name)
        else:
            assert written[name].to_pylist() == expected[name].to_pylist(), name


def test_curriculum_matches_the_python_api(curves, tmp_path):
    ledger, _ = curves
    path = str(ledger.path)
    expected = ll.analysis.curriculum_chunks(ledger, "r", 4, split="train", ticks=slice(1, 6))
    written = read_parquet(tmp_path, "curriculum", path, "--chunks", "4", "--split", "train", "--ticks", "1:6")
    assert_same(written, expected)
    out = run_cli("curriculum", path, "--chunks", "4", "--split", "train", "--ticks", "1:6", "--summary",
                  "--format", "csv")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == '"chunk","n","mean_action","min_action","max_action"' and len(lines) == 5
    chunk = expected["chunk"].to_numpy()
    action = expected["action"].to_numpy()
    for line, c in zip(lines[1:], range(4), strict=True):
        fields = line.split(",")
        assert int(fields[0]) == c and int(fields[1]) == (chunk == c).sum()
        assert float(fields[2]) == pytest.approx(action[chunk == c].mean(), rel=1e-12)
        assert float(fields[3]) == action[chunk == c].min() and float(fields[4]) == action[chunk == c].max()
    table = run_cli("curriculum", path, "--chunks", "3")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split() == ["sample_id", "label", "action", "chunk"]
    assert table.stdout.strip().endswith("(88 rows)")  # the two never-observed samples are left out
    bad = run_cli("curriculum", path, "--ticks", "3")
    assert bad.returncode == 2 and "START:STOP" in bad.stderr
    too_many = run_cli("curriculum", path, "--chunks", "1000")
    assert too_many.returncode == 1 and "Traceback" not in too_many.stderr


def test_clusters_match_the_python_api(curves, tmp_path):
    ledger, _ = curves
    path = str(ledger.path)
    found = ll.analysis.cluster_curves(ledger, "r", k=3, batch_size=32, n_members=4, seed=1)
    common = ("clusters", path, "--batch-size", "32", "--members", "4", "--seed", "1")
    assert_same(read_parquet(tmp_path, *common, "--show", "assignments"), found.assignments)
    assert_same(read_parquet(tmp_path, *common, "--show", "members"), found.members)
    centres = read_parquet(tmp_path, *common, "--show", "centres")
    np.testing.assert_array_equal(centres["value"].to_numpy().reshape(3, -1), found.centres)
    assert centres["tick"].to_pylist() == list(found.ticks) * 3
    found = ll.analysis.cluster_curves(ledger, "r")  # the defaults: k = 3, one batch (Lloyd's algorithm)
    summary = read_parquet(tmp_path, "clusters", path)
    cluster = found.assignments["cluster"].to_numpy(zero_copy_only=False)
    distance = found.assignments["distance"].to_numpy()
    sizes = [int((cluster == c).sum()) for c in range(3)]
    assert summary["n"].to_pylist() == sizes and sum(sizes) == 88
    np.testing.assert_allclose(summary["share"].to_numpy(), np.array(sizes) / 88)
    np.testing.assert_allclose(summary["mean_distance"].to_numpy(), [distance[cluster == c].mean() for c in range(3)])
    np.testing.assert_array_equal(summary["centre_first"].to_numpy(), found.centres[:, 0])
    np.testing.assert_array_equal(summary["centre_max"].to_numpy(), found.centres.max(axis=1))
    np.testing.assert_array_equal(summary["centre_last"].to_numpy(), found.centres[:, -1])
    # three curve shapes (one per label), three clusters of 30, less the 2 never observed
    assert sorted(sizes) == [29, 29, 30]
    raw = ll.analysis.cluster_curves(ledger, "r", k=2, normalize=False, ticks=slice(0, 4))
    assert_same(read_parquet(tmp_path, "clusters", path, "-k", "2", "--raw", "--ticks", "0:4", "--show",
                             "assignments"), raw.assignments)
    text = run_cli("clusters", path, "--help")
    assert text.returncode == 0 and "fractions" in text.stdout and "stream" in text.stdout and "units" in text.stdout


def test_neighbours_match_the_python_api(curves, tmp_path):
    ledger, features = curves
    path = str(ledger.path)
    expected = ll.analysis.neighbours(ledger, "r", k=4, top=6)  # the logged embedding at the last tick
    assert_same(read_parquet(tmp_path, "neighbours", path, "-k", "4", "--top", "6"), expected)
    user = np.load(features)
    expected = ll.analysis.neighbours(ledger, "r", ids=[5, 40, 3], k=3, features=user)
    assert_same(read_parquet(tmp_path, "neighbours", path, "--ids", "5,40,3", "-k", "3", "--features",
                             str(features)), expected)
    out = run_cli("neighbours", path, "--ids", "1", "-k", "2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["query_id", "query_label", "rank", "neighbour_id", "neighbour_label", "distance"]
    assert len(lines) == 2 + 2 + 1
    no_features = run_cli("neighbours", path, "--ids", "5")  # sample 5 has no embedding
    assert no_features.returncode == 1 and "no features" in no_features.stderr
    assert "Traceback" not in no_features.stderr
    missing = run_cli("neighbours", path, "--stream", "feats")
    assert missing.returncode == 1 and "no committed stream 'feats'" in missing.stderr
    bad = run_cli("neighbours", path, "--ids", "a,b")
    assert bad.returncode == 2 and "comma-separated sample ids" in bad.stderr


def test_report_passes_the_neighbour_options(tmp_path):
    rng = np.random.default_rng(3)
    ledger = ll.create(tmp_path / "r.ll", n_samples=40, labels=np.arange(40) % 4)
    with ledger.run("r") as run:
        for _ in range(3):
            run.log(np.arange(40), loss=rng.gamma(2.0, 0.5, 40), embedding=rng.normal(size=(40, 5)))
            run.end_epoch()
    out = run_cli("report", str(ledger.path), str(tmp_path / "r.html"), "--neighbour-rows", "2", "--neighbour-k", "3")
    assert out.returncode == 0, out.stderr
    page = (tmp_path / "r.html").read_text()
    section = page[page.index('<section id="neighbours">'):]
    section = section[: section.index("</section>")]
    assert section.count("<tr>") - 1 == 2  # a header row and one row per hard sample
    assert "neighbour 3" in section and "neighbour 4" not in section
