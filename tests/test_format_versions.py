"""Format versions: v2 ledgers checksum every chunk; v1 ledgers (tests/data/format-v1, written by the v1
writer) are read and resumed as v1, so a v1 reader still reads them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

import lossledger as ll
from lossledger.errors import CorruptLedgerError

V1 = Path(__file__).parent / "data" / "format-v1"
N, T = 12, 3


def v1_losses() -> np.ndarray:
    """(N, T) losses the v1 fixture holds: (i + 1) / (t + 2), odd samples not logged in tick 1."""
    loss = (np.arange(N)[:, None] + 1) / (np.arange(T)[None, :] + 2)
    loss[1::2, 1] = np.nan
    return loss.astype(np.float32)


def pipelines(root: Path) -> dict[str, list[str]]:
    """Codec names of every array below ``root``, by array path."""
    out = {}
    for meta_path in root.rglob("zarr.json"):
        meta = json.loads(meta_path.read_text())
        if meta["node_type"] == "array":
            out[str(meta_path.parent.relative_to(root))] = [c["name"] for c in meta["codecs"]]
    return out


@pytest.fixture
def v1(tmp_path) -> Path:
    path = tmp_path / "v1.ll"
    shutil.copytree(V1, path)
    return path


def test_v1_ledger_reads_the_values_it_was_written_with(v1):
    ledger = ll.open(v1)
    assert ledger.info().startswith("lossledger v1 ledger")
    np.testing.assert_array_equal(ledger.sample_ids, np.arange(N) * 10)
    want = v1_losses()
    np.testing.assert_array_equal(ledger.trajectories("r", "loss"), want)
    scores = ledger.scores("r")
    np.testing.assert_allclose(scores["action"].to_numpy(), np.nansum(want.astype(np.float64), axis=1), rtol=1e-12)
    np.testing.assert_array_equal(scores["n_obs"].to_numpy(), [3, 2] * (N // 2))
    pix = ledger.pixel_action("r", "pixel", ids=[0, 10]).action
    np.testing.assert_allclose(pix, np.nansum(want[:2], axis=1)[:, None, None] * [[1, 2], [3, 4]], rtol=1e-6)


def test_v1_ledger_resumes_and_grows_as_v1(v1):
    ledger = ll.open(v1, mode="a")
    with ledger.run("r") as run:
        run.log(np.arange(N) * 10, loss=np.full(N, 0.5, np.float32))
        run.end_epoch()
    with ledger.run("new") as run:
        run.log([0, 10], loss=[1.0, 2.0])
        run.end_epoch()
    assert json.loads((v1 / "zarr.json").read_text())["attributes"]["version"] == 1
    assert all(names == ["bytes", "blosc"] for names in pipelines(v1).values()), pipelines(v1)
    reopened = ll.open(v1)
    want = np.concatenate([v1_losses(), np.full((N, 1), 0.5, np.float32)], axis=1)
    np.testing.assert_array_equal(reopened.trajectories("r", "loss"), want)
    np.testing.assert_array_equal(reopened.scores("new")["action"].to_numpy()[:2], [1.0, 2.0])


def test_v2_ledger_checksums_every_chunk_and_zarr_reads_it(tmp_path):
    ledger = ll.create(tmp_path / "v2.ll", n_samples=5, labels=[0, 1, 0, 1, 1])
    values = np.array([[0.5, np.nan, 2.0, 3.0, 4.0], [1.0, 1.5, np.nan, 0.25, 8.0]], np.float32)
    with ledger.run("r") as run:
        for row in values:
            logged = ~np.isnan(row)
            run.log(np.flatnonzero(logged), loss=row[logged])
            run.end_epoch()
    assert json.loads((ledger.path / "zarr.json").read_text())["attributes"]["version"] == 2
    arrays = pipelines(ledger.path)
    assert "runs/r/streams/loss" in arrays and "samples/sample_id" in arrays
    assert all(names == ["bytes", "blosc", "crc32c"] for names in arrays.values()), arrays
    # Zarr's own pipeline (which checks the crc32c) reads what the writer encoded itself.
    stored = zarr.open_array(ledger.path / "runs/r/streams/loss", mode="r")[:2]
    np.testing.assert_array_equal(stored, values)


def test_a_v1_chunk_in_a_v2_array_is_refused(tmp_path, v1):
    # A chunk without its checksum (here: a v1 chunk copied over a v2 one) is damage, not another format.
    ledger = ll.create(tmp_path / "v2.ll", sample_ids=np.arange(N) * 10)
    with ledger.run("r") as run:
        run.log(np.arange(N) * 10, loss=np.ones(N, np.float32))
        run.end_epoch()
    chunk = "runs/r/streams/loss/c/0/0"
    shutil.copyfile(v1 / chunk, ledger.path / chunk)
    with pytest.raises(CorruptLedgerError, match="fails its crc32c checksum"):
        ll.open(ledger.path).trajectories("r", "loss")
