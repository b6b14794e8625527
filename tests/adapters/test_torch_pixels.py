"""The torch Recorder's ``pixel_streams`` in one process, and the padding repeats of ``DistributedSampler``.

The distributed protocol itself (2 and 4 gloo ranks) is tested in test_ddp.py; here: values stored as logged, a
failed chunk write drops the whole tick, close discards the chunks written, and ``padding_ids`` leaves exactly the
sampler's repeats out.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: pip install 'lossledger[torch]'")

from lossledger.adapters._torch_shards import padding_ids
from lossledger.adapters.torch import IndexedDataset, Recorder
from torch.utils.data import TensorDataset
from torch.utils.data.distributed import DistributedSampler

import lossledger as ll
from lossledger.errors import LedgerWarning, ShapeMismatchError, UnknownSampleError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N, SHAPE = 12, (3, 5)


def _maps(t: int, ids) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.float32)
    return (ids[:, None, None] + t / 10.0) * torch.arange(15, dtype=torch.float32).reshape(SHAPE)


def test_pixel_streams_are_written_as_logged_and_committed_by_end_epoch(tmp_path):
    led = ll.create(tmp_path / "p.ll", n_samples=N)
    with led.run("r", stream_dtypes={"pix": "float16"}) as run, Recorder(run, pixel_streams={"pix": SHAPE}) as rec:
        for t in range(3):
            for batch in torch.arange(N).split(5):  # an uneven last batch
                rec.log(batch, _maps(t, batch).mean((1, 2)), pix=_maps(t, batch))
            assert rec.end_epoch() == t
            assert ll.open(led.path).ticks("r").num_rows == t + 1  # committed before end_epoch returns
        with pytest.raises(ShapeMismatchError, match=r"element shape \(3, 5\)"):
            rec.log(torch.arange(2), torch.zeros(2), pix=torch.zeros(2, 5, 3))
    reader = ll.open(led.path)
    stored = reader.trajectories("r", "pix")
    want = torch.stack([_maps(t, torch.arange(N)) for t in range(3)], 1).to(torch.float16)
    np.testing.assert_array_equal(stored, want.numpy())
    np.testing.assert_allclose(reader.trajectories("r"), want.float().mean((2, 3)).numpy(), rtol=1e-3)
    assert reader.ticks("r")["step"].to_pylist() == [3, 6, 9]
    assert [_chunk_files(led.path, t) for t in range(3)] == [N] * 3
    led.close()


def test_a_failed_chunk_write_drops_the_whole_tick_and_close_discards_written_chunks(tmp_path):
    led = ll.create(tmp_path / "f.ll", n_samples=N)
    run = led.run("r")
    rec = Recorder(run, pixel_streams={"pix": SHAPE})
    rec.log(torch.arange(4), torch.ones(4), pix=_maps(0, range(4)))
    rec.log(torch.tensor([4, 99]), torch.ones(2), pix=_maps(0, [4, 99]))  # 99 is no sample: refused in the thread
    with pytest.raises(UnknownSampleError, match="99"):
        rec.end_epoch()
    assert _chunk_files(led.path, 0) == 0  # the 4 chunks written before the error were deleted
    rec.log(torch.arange(2), torch.ones(2), pix=_maps(1, range(2)))
    assert rec.end_epoch() == 0  # the next tick is fine; the dropped one left nothing behind
    rec.log(torch.arange(3), torch.ones(3), pix=_maps(2, range(3)))
    rec.flush()  # written, not committed
    assert _chunk_files(led.path, 1) == 3
    with pytest.warns(LedgerWarning, match="3 value"):
        rec.close()
    assert _chunk_files(led.path, 1) == 0
    with pytest.warns(LedgerWarning, match="3 value"):
        run.close()  # the losses flushed into the run
    stored = ll.open(led.path).trajectories("r", "pix")
    assert stored.shape == (N, 1, *SHAPE)
    np.testing.assert_array_equal(stored[:2, 0], _maps(1, range(2)).numpy())
    assert np.isnan(stored[2:]).all()
    np.testing.assert_array_equal(ll.open(led.path).trajectories("r")[:, 0], [1, 1] + [np.nan] * (N - 2))
    led.close()


def test_a_commit_refused_by_the_run_deletes_the_chunks_and_records_nothing_of_the_tick(tmp_path):
    led = ll.create(tmp_path / "c.ll", n_samples=N)
    with led.run("r") as run, Recorder(run, pixel_streams={"pix": SHAPE}) as rec:
        rec.log(torch.arange(3), torch.ones(3), pix=_maps(0, range(3)))  # chunks written, losses gathered
        rec.log(torch.tensor([99]), other=torch.ones(1))  # refused by the run when rank 0 logs the tick
        with pytest.raises(UnknownSampleError, match="99"):
            rec.end_epoch()
        assert _chunk_files(led.path, 0) == 0
        rec.log(torch.tensor([5]), torch.full((1,), 2.0), pix=_maps(1, [5]))
        assert rec.end_epoch() == 0
    reader = ll.open(led.path)
    np.testing.assert_array_equal(reader.trajectories("r")[:, 0], [np.nan] * 5 + [2.0] + [np.nan] * (N - 6))
    assert np.isnan(reader.trajectories("r", "pix")[[0, 1, 2, 6]]).all()
    led.close()


def _chunk_files(path, tick: int) -> int:
    """Chunk files of stream "pix" of run "r" at ``tick`` (deleting a chunk leaves its empty folders)."""
    return sum(f.is_file() for f in (path / "runs/r/streams/pix/c" / str(tick)).rglob("*"))


@pytest.mark.parametrize("n", [1, 5, 12, 13, 37])
@pytest.mark.parametrize("ranks", [2, 3, 4, 8])
@pytest.mark.parametrize("shuffle", [True, False])
def test_padding_ids_are_exactly_the_samplers_repeats(n, ranks, shuffle):
    sample_ids = np.arange(n, dtype=np.int64) * 3 + 1000
    data = IndexedDataset(TensorDataset(torch.zeros(n)), sample_ids=sample_ids)
    for epoch in (0, 1):
        kept = []
        for rank in range(ranks):
            sampler = DistributedSampler(data, num_replicas=ranks, rank=rank, shuffle=shuffle, seed=3)
            sampler.set_epoch(epoch)
            given = sample_ids[list(sampler)]
            dropped = padding_ids(sampler)
            assert np.isin(dropped, given).all()
            remaining = list(given)
            for i in dropped.tolist():
                remaining.remove(i)  # one occurrence each (a tiny dataset may repeat a sample on one rank)
            kept += remaining
        assert sorted(kept) == sorted(sample_ids.tolist())  # every sample exactly once over the ranks
    truncating = DistributedSampler(data, num_replicas=ranks, rank=0, drop_last=True)
    assert padding_ids(truncating).size == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pixel_maps_are_copied_without_a_sync_and_stored_exactly(tmp_path):
    led = ll.create(tmp_path / "c.ll", n_samples=N)
    with led.run("r") as run, Recorder(run, pixel_streams={"pix": SHAPE}) as rec:
        for batch in torch.arange(N).split(5):
            rec.log(batch.cuda(), torch.ones(len(batch), device="cuda"), pix=_maps(0, batch).cuda())
        rec.end_epoch()
    np.testing.assert_array_equal(ll.open(led.path).trajectories("r", "pix")[:, 0], _maps(0, range(N)).numpy())
    led.close()
