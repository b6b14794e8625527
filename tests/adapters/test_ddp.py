"""DDP on the gloo backend, 2 processes: each sample is stored exactly once per epoch, by rank 0 only."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: pip install 'lossledger[torch]'")
pytest.importorskip("sklearn", reason="scikit-learn is not installed (the test extra has it)")
dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("this torch build has no gloo backend for torch.distributed", allow_module_level=True)

import torch.multiprocessing as mp

import lossledger as ll

N = 101  # odd: DistributedSampler pads 2 ranks to 51 samples each by repeating one sample
PROBE_SPLIT = 70  # rank 0 probes samples 0..69, rank 1 the other 31: unequal lengths in the gather
EPOCHS, BATCH = 2, 16


def _worker(rank: int, world: int, init_file: str, ledger_path: str, out: str, x: np.ndarray, y: np.ndarray) -> None:
    """One DDP rank: trains the digits MLP, logs through one Recorder, saves what it computed for the parent."""
    from lossledger.adapters.torch import IndexedDataset, Recorder, evaluate
    from torch import nn
    from torch.nn import functional as F
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, Subset, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
        torch.manual_seed(0)
        model = DistributedDataParallel(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sampler: DistributedSampler = DistributedSampler(IndexedDataset(data), num_replicas=world, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(IndexedDataset(data), batch_size=BATCH, sampler=sampler)
        mine = range(PROBE_SPLIT) if rank == 0 else range(PROBE_SPLIT, N)
        probe = DataLoader(IndexedDataset(Subset(data, mine), sample_ids=mine), batch_size=32)
        run = ll.open(ledger_path, "a").run("ddp") if rank == 0 else None
        with Recorder(run) as rec:
            assert rec.distributed and (rec.run is None) == (rank != 0)
            for epoch in range(EPOCHS):
                sampler.set_epoch(epoch)
                ids_seen, losses_seen = [], []
                for ids, xb, yb in loader:
                    losses = F.cross_entropy(model(xb), yb, reduction="none")
                    rec.log(ids, losses)
                    ids_seen.append(ids.numpy())
                    losses_seen.append(losses.detach().numpy().copy())
                    opt.zero_grad()
                    losses.mean().backward()
                    opt.step()
                evaluate(rec, model.module, probe, nn.CrossEntropyLoss(reduction="none"), prefix="probe_", margin=True)
                with torch.no_grad():  # the probe recomputed by this rank, with the model at this point
                    logits = model.module(torch.from_numpy(x[list(mine)]))
                    target = torch.from_numpy(y[list(mine)])
                    probe_loss = F.cross_entropy(logits, target, reduction="none").numpy()
                    others = logits.scatter(1, target[:, None], float("-inf")).max(1).values
                    probe_margin = (logits.gather(1, target[:, None])[:, 0] - others).numpy()
                np.savez(
                    f"{out}/rank{rank}_epoch{epoch}.npz",
                    ids=np.concatenate(ids_seen),
                    losses=np.concatenate(losses_seen),
                    probe_ids=np.array(list(mine)),
                    probe_loss=probe_loss,
                    probe_margin=probe_margin,
                )
        if run is not None:
            run.close()
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_store_each_sample_once_per_epoch(tmp_path):
    from sklearn.datasets import load_digits  # here, so that the spawned ranks do not import it

    x, y = load_digits(return_X_y=True)
    x, y = (x[:N] / 16.0).astype(np.float32), y[:N].astype(np.int64)
    path = tmp_path / "ddp.ll"
    ll.create(path, n_samples=N, labels=y).close()
    ctx = mp.spawn(
        _worker, args=(2, str(tmp_path / "rendezvous"), str(path), str(tmp_path), x, y), nprocs=2, join=False
    )
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2 DDP ranks did not finish within 180 s (a collective hung)")

    reader = ll.open(path)
    ticks = reader.ticks("ddp")
    batches = math.ceil(math.ceil(N / 2) / BATCH)  # 51 samples per rank in batches of 16: 4 steps per epoch
    assert ticks["epoch"].to_pylist() == [0, 1]
    assert ticks["step"].to_pylist() == [batches, 2 * batches]
    stored, probe_loss, probe_margin = (reader.trajectories("ddp", s) for s in ("loss", "probe_loss", "probe_margin"))
    for epoch in range(EPOCHS):
        ranks = [np.load(tmp_path / f"rank{r}_epoch{epoch}.npz") for r in range(2)]
        logged = np.concatenate([r["ids"] for r in ranks])
        assert len(logged) == 2 * 51 and np.array_equal(np.unique(logged), np.arange(N))
        padded = [i for i in range(N) if (logged == i).sum() == 2]
        assert len(padded) == 1 and all(padded[0] in r["ids"] for r in ranks)  # the padding was on both ranks
        expected = np.full(N, np.nan, dtype=np.float32)
        for r in reversed(ranks):  # the lowest rank's value wins
            expected[r["ids"]] = r["losses"]
        np.testing.assert_array_equal(stored[:, epoch], expected)
        want_loss = np.concatenate([r["probe_loss"] for r in ranks])
        want_margin = np.concatenate([r["probe_margin"] for r in ranks])
        assert np.array_equal(np.concatenate([r["probe_ids"] for r in ranks]), np.arange(N))
        np.testing.assert_allclose(probe_loss[:, epoch], want_loss, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(probe_margin[:, epoch], want_margin, rtol=1e-5, atol=1e-5)
