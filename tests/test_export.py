"""``Ledger.export``: scores joined with samples in one parquet file, written atomically."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import lossledger as ll
from lossledger import errors as E


@pytest.fixture
def two_runs(tmp_path):
    ledger = ll.create(tmp_path / "e.ll", sample_ids=[10, 20, 30, 40], labels=[0, 1, 1, 0], classes=["cat", "dog"],
                       splits=["train", "train", "val", "val"])
    with ledger.run("a", model="mlp", seed=0) as run:
        for t in range(3):
            run.log([10, 20, 30], loss=[1.0 + t, 2.0, 0.5 * t])
            run.end_epoch()
    with ledger.run("b", seed=1) as run:
        run.log([40], loss=[4.0], margin=[-1.0])
        run.end_epoch()
    return ledger


@pytest.mark.parametrize("batch_rows", [None, 3])
def test_export_matches_scores_and_samples(two_runs, tmp_path, monkeypatch, batch_rows):
    if batch_rows:  # scores read in batches of 3 and 1 rows: the samples' columns are sliced to match
        monkeypatch.setattr("lossledger._scoring.BATCH_ROWS", batch_rows)
    out = two_runs.export(tmp_path / "scores.parquet")
    table = pq.read_table(out)
    assert table.column_names == ["run", "stream", "sample_id", "label", "class", "split", "action", "variance",
                                  "mean", "first", "last", "min", "max", "n_obs"]
    assert [(r, s) for r, s in zip(table["run"].to_pylist()[::4], table["stream"].to_pylist()[::4])] == [
        ("a", "loss"), ("b", "loss"), ("b", "margin")
    ]
    for run, stream in [("a", "loss"), ("b", "loss"), ("b", "margin")]:
        part = table.filter(pc.and_(pc.equal(table["run"], run), pc.equal(table["stream"], stream)))
        want = two_runs.scores(run, stream)
        assert part["sample_id"].to_pylist() == [10, 20, 30, 40]
        assert part["class"].to_pylist() == ["cat", "dog", "dog", "cat"]
        assert part["split"].to_pylist() == ["train", "train", "val", "val"]
        for column in ("action", "variance", "mean", "first", "last", "min", "max", "n_obs"):
            got = np.array([np.nan if v is None else v for v in part[column].to_pylist()], dtype=float)
            np.testing.assert_array_equal(got, want[column].to_numpy(zero_copy_only=False))
        # Never observed: null in the file (NaN in Ledger.scores), and n_obs 0.
        observed = want["n_obs"].to_numpy() > 0
        assert [v is None for v in part["action"].to_pylist()] == list(~observed)
    meta = json.loads(pq.read_schema(out).metadata[b"lossledger"])
    assert meta["dt"] == "epoch" and meta["format_version"] == ll.format.FORMAT_VERSION
    assert meta["runs"]["a"]["attrs"] == {"model": "mlp", "seed": 0} and meta["runs"]["a"]["ticks"] == 3
    assert set(meta["runs"]) == {"a", "b"}


def test_export_selected_runs_streams_and_dt(two_runs, tmp_path):
    out = two_runs.export(tmp_path / "b.parquet", ["b"], streams=["margin"], dt="step")
    table = pq.read_table(out)
    assert set(table["run"].to_pylist()) == {"b"} and set(table["stream"].to_pylist()) == {"margin"}
    assert table["action"].to_pylist() == [None, None, None, -1.0]
    assert json.loads(pq.read_schema(out).metadata[b"lossledger"])["dt"] == "step"


def test_failed_export_leaves_the_old_file_and_no_temp_file(two_runs, tmp_path):
    out = tmp_path / "scores.parquet"
    out.write_bytes(b"old")
    with pytest.raises(E.ShapeMismatchError, match="dt must be one of"):
        two_runs.export(out, dt="minutes")
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.ll", "scores.parquet"]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "hint"),
    [
        (("missing/x.parquet",), {}, E.OutputPathError, "does not exist"),
        ((".",), {}, E.OutputPathError, "it is a folder"),
        (("x.parquet", ["nope"]), {}, E.UnknownRunError, "existing runs"),
        (("x.parquet", ["a"]), {"streams": ["margin"]}, E.UnknownStreamError, "its streams are"),
    ],
)
def test_export_bad_input_writes_nothing(two_runs, tmp_path, monkeypatch, args, kwargs, error, hint):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=hint):
        two_runs.export(*args, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.ll"]
