"""DDP on the gloo backend, 2 and 4 processes (one spawn per world size, several epochs inside).

Each job trains two models with ``DistributedSampler`` (N not divisible by the ranks: the sampler pads; nor by
ranks x batch: an uneven last batch):

- an MLP on digits through one ``Recorder`` that gathers per-sample losses and probes to rank 0: each sample is
  stored exactly once per epoch, the lowest rank's value;
- a small conv net on synthetic images with per-pixel losses (``reduction="none"``) in ``pixel_streams``: every
  rank writes its own samples' maps, never gathered; each map stored equals a numpy recomputation, every sample is
  written exactly once per epoch (the sampler's padding repeats are left out), and no collective ever carried a
  map. After the committed epochs the whole group writes one more epoch's maps and is SIGKILLed before committing:
  readers never see those chunks, and resuming the run removes them.
"""

from __future__ import annotations

import math
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import time
import traceback

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: pip install 'lossledger[torch]'")
pytest.importorskip("sklearn", reason="scikit-learn is not installed (the test extra has it)")
dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("this torch build has no gloo backend for torch.distributed", allow_module_level=True)

import torch.multiprocessing as mp

import lossledger as ll
from lossledger.errors import LedgerWarning

N = 101  # digits: 2 ranks get 51 (1 padding repeat), 4 ranks 26 (3 repeats); batches of 16 end unevenly
PROBE_BOUNDS = {2: [0, 70, 101], 4: [0, 40, 70, 95, 101]}  # unequal probe shares: unequal lengths in the gather
EPOCHS, BATCH = 2, 16
N_IMG, H, W = 37, 12, 12  # images: 2 ranks get 19 (1 repeat), 4 ranks 10 (3 repeats); batches of 4 end unevenly
SEG_EPOCHS, SEG_BATCH = 3, 4  # committed epochs; then one more is written and the group is killed before its commit
COLLECTIVES = ("gather", "all_gather", "all_gather_object", "gather_object", "broadcast", "broadcast_object_list",
               "all_reduce", "reduce", "scatter", "scatter_object_list", "all_to_all", "all_gather_into_tensor",
               "reduce_scatter", "send", "recv", "isend", "irecv")


def _worker(rank: int, world: int, out: str, digits: tuple, images: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        _train_digits(rank, world, out, *digits)
        calls = _spy_on_collectives()
        _train_segmentation(rank, world, out, *images, calls)
    except BaseException:
        with open(f"{out}/rank{rank}.error", "w") as f:
            f.write(traceback.format_exc())
        raise


def _train_digits(rank: int, world: int, out: str, x: np.ndarray, y: np.ndarray) -> None:
    """Trains the digits MLP, logs through one gathering Recorder, saves what it computed for the parent."""
    from lossledger.adapters.torch import IndexedDataset, Recorder, evaluate
    from torch import nn
    from torch.nn import functional as F
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, Subset, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler: DistributedSampler = DistributedSampler(IndexedDataset(data), num_replicas=world, rank=rank, seed=0)
    loader = DataLoader(IndexedDataset(data), batch_size=BATCH, sampler=sampler)
    mine = range(PROBE_BOUNDS[world][rank], PROBE_BOUNDS[world][rank + 1])
    probe = DataLoader(IndexedDataset(Subset(data, mine), sample_ids=mine), batch_size=32)
    run = ll.open(f"{out}/digits.ll", "a").run("ddp") if rank == 0 else None
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


def _spy_on_collectives() -> list:
    """Record what every ``torch.distributed`` collective called through the module carries (the adapter calls them
    as ``dist.<name>``): the largest tensor (elements) among its arguments, and its other arguments' repr."""
    calls: list = []

    def sizes(obj):
        if isinstance(obj, torch.Tensor):
            return [obj.numel()]
        if isinstance(obj, list | tuple):
            return [n for o in obj for n in sizes(o)]
        return []

    for name in COLLECTIVES:
        real = getattr(dist, name, None)
        if real is None:
            continue

        def spy(*args, _real=real, _name=name, **kwargs):
            everything = [*args, *kwargs.values()]
            calls.append((_name, max(sizes(everything), default=0), repr([a for a in everything if not sizes(a)])))
            return _real(*args, **kwargs)

        setattr(dist, name, spy)
    return calls


def _train_segmentation(rank: int, world: int, out: str, imgs: np.ndarray, masks: np.ndarray, calls: list) -> None:
    """Trains a conv net on per-pixel losses, written by every rank itself; saves every step for the parent."""
    from lossledger.adapters.torch import IndexedDataset, Recorder
    from torch import nn
    from torch.nn import functional as F
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    from lossledger.shards import ShardWriter

    written: list = []  # (tick, ids) of every chunk write of this process
    write = ShardWriter.write

    def spy_write(self, tick, ids, /, **streams):
        written.append((tick, np.asarray(ids).copy()))
        return write(self, tick, ids, **streams)

    ShardWriter.write = spy_write
    data = IndexedDataset(TensorDataset(torch.from_numpy(imgs), torch.from_numpy(masks)))
    sampler: DistributedSampler = DistributedSampler(data, num_replicas=world, rank=rank, seed=1)
    loader = DataLoader(data, batch_size=SEG_BATCH, sampler=sampler)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model = DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    run = ll.open(f"{out}/seg.ll", "a").run("seg") if rank == 0 else None
    steps = []  # (epoch, ids, parameters before the step, the maps this rank computed)
    rec = Recorder(run, pixel_streams={"pixel": (H, W)}, sampler=sampler)
    for epoch in range(SEG_EPOCHS + 1):
        sampler.set_epoch(epoch)
        for ids, xb, yb in loader:
            params = [p.detach().numpy().copy() for p in net.parameters()]
            maps = F.cross_entropy(model(xb), yb, reduction="none")  # (B, H, W)
            rec.log(ids, maps.mean((1, 2)), pixel=maps)
            steps.append((epoch, ids.numpy(), params, maps.detach().numpy().copy()))
            opt.zero_grad()
            maps.mean().backward()
            opt.step()
        if epoch < SEG_EPOCHS:
            assert rec.end_epoch() == (epoch if rank == 0 else None)
    rec.flush()  # the last epoch's chunks are written by every rank (and the losses logged on rank 0), not committed
    with open(f"{out}/seg_rank{rank}.pkl", "wb") as f:
        pickle.dump({"steps": steps, "written": written, "calls": calls}, f)
    dist.barrier()
    os.kill(os.getpid(), signal.SIGKILL)  # the whole group dies before rank 0 commits the last epoch


def _synthetic_images() -> tuple[np.ndarray, np.ndarray]:
    """(N_IMG, 1, H, W) float32 images and (N_IMG, H, W) int64 masks: pixel class = smoothed image above 0."""
    rng = np.random.default_rng(0)
    imgs = rng.standard_normal((N_IMG, 1, H, W)).astype(np.float32)
    smooth = imgs[:, 0] + np.roll(imgs[:, 0], 1, axis=1) + np.roll(imgs[:, 0], 1, axis=2)
    return imgs, (smooth > 0).astype(np.int64)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda world: f"{world}ranks")
def job(request, tmp_path_factory):
    """One DDP job of ``world`` ranks: its output folder, after every rank finished (the segmentation ranks killed)."""
    from sklearn.datasets import load_digits  # here, so that the spawned ranks do not import it

    world = request.param
    out = tmp_path_factory.mktemp(f"ddp{world}")
    x, y = load_digits(return_X_y=True)
    x, y = (x[:N] / 16.0).astype(np.float32), y[:N].astype(np.int64)
    ll.create(out / "digits.ll", n_samples=N, labels=y).close()
    imgs, masks = _synthetic_images()
    ll.create(out / "seg.ll", n_samples=N_IMG).close()
    ctx = mp.spawn(_worker, args=(world, str(out), (x, y), (imgs, masks)), nprocs=world, join=False)
    deadline = time.monotonic() + 240
    procs = ctx.processes
    while any(p.is_alive() for p in procs):
        failed = [p for p in procs if p.exitcode not in (None, -signal.SIGKILL)]
        if failed or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            errors = "\n".join(f.read_text() for f in sorted(out.glob("rank*.error")))
            pytest.fail(f"the {world} DDP ranks failed or hung (exit codes {[p.exitcode for p in procs]}):\n{errors}")
        multiprocessing.connection.wait([p.sentinel for p in procs], timeout=1)
    assert [p.exitcode for p in procs] == [-signal.SIGKILL] * world, (out / "rank0.error").exists()
    return world, out, x, y, imgs, masks


def test_each_sample_is_stored_once_per_epoch_by_the_gather(job):
    world, out, *_ = job
    reader = ll.open(out / "digits.ll")
    ticks = reader.ticks("ddp")
    per_rank = math.ceil(N / world)
    batches = math.ceil(per_rank / BATCH)
    assert per_rank % BATCH and N % world  # an uneven last batch, and a padded sampler
    assert ticks["epoch"].to_pylist() == list(range(EPOCHS))
    assert ticks["step"].to_pylist() == [batches * (e + 1) for e in range(EPOCHS)]
    stored, probe_loss, probe_margin = (reader.trajectories("ddp", s) for s in ("loss", "probe_loss", "probe_margin"))
    for epoch in range(EPOCHS):
        ranks = [np.load(out / f"rank{r}_epoch{epoch}.npz") for r in range(world)]
        logged = np.concatenate([r["ids"] for r in ranks])
        assert len(logged) == world * per_rank and np.array_equal(np.unique(logged), np.arange(N))
        padded = [i for i in range(N) if (logged == i).sum() == 2]
        assert len(padded) == world * per_rank - N  # each repeat on two ranks, the original and the padding
        expected = np.full(N, np.nan, dtype=np.float32)
        for r in reversed(ranks):  # the lowest rank's value wins
            expected[r["ids"]] = r["losses"]
        np.testing.assert_array_equal(stored[:, epoch], expected)
        want_loss = np.concatenate([r["probe_loss"] for r in ranks])
        want_margin = np.concatenate([r["probe_margin"] for r in ranks])
        assert np.array_equal(np.concatenate([r["probe_ids"] for r in ranks]), np.arange(N))
        np.testing.assert_allclose(probe_loss[:, epoch], want_loss, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(probe_margin[:, epoch], want_margin, rtol=1e-5, atol=1e-5)


def _seg_ranks(out, world) -> list[dict]:
    ranks = []
    for r in range(world):
        with open(out / f"seg_rank{r}.pkl", "rb") as f:
            ranks.append(pickle.load(f))
    return ranks


def _reference_maps(params: list[np.ndarray], imgs: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per-pixel cross-entropy of the conv net (3x3 conv, ReLU, 1x1 conv) in float64 numpy: (B, H, W)."""
    w1, b1, w2, b2 = (p.astype(np.float64) for p in params)
    padded = np.pad(imgs.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    hidden = np.broadcast_to(b1[None, :, None, None], (len(imgs), 4, H, W)).copy()
    for di in range(3):
        for dj in range(3):
            hidden += np.einsum("bchw,oc->bohw", padded[:, :, di : di + H, dj : dj + W], w1[:, :, di, dj])
    logits = np.einsum("bchw,oc->bohw", np.maximum(hidden, 0), w2[:, :, 0, 0]) + b2[None, :, None, None]
    top = logits.max(1)
    logsumexp = top + np.log(np.exp(logits - top[:, None]).sum(1))
    return logsumexp - np.take_along_axis(logits, masks[:, None], 1)[:, 0]


def test_pixel_maps_are_written_by_the_ranks_once_per_epoch_and_equal_a_numpy_reference(job):
    from torch.utils.data.distributed import DistributedSampler

    world, out, _, _, imgs, masks = job
    ranks = _seg_ranks(out, world)
    reader = ll.open(out / "seg.ll")
    assert reader.ticks("seg").num_rows == SEG_EPOCHS  # the killed epoch never committed
    stored, loss = reader.trajectories("seg", "pixel"), reader.trajectories("seg", "loss")
    assert stored.shape == (N_IMG, SEG_EPOCHS, H, W) and stored.dtype == np.float32
    for epoch in range(SEG_EPOCHS + 1):
        # each sample written exactly once, over all ranks (the sampler's padding left out)
        written = np.concatenate([ids for r in ranks for tick, ids in r["written"] if tick == epoch])
        assert np.array_equal(np.sort(written), np.arange(N_IMG))
        if epoch == SEG_EPOCHS:
            continue
        originals = {}  # sample -> its map where the sampler placed it first (position < N_IMG), not its repeat
        for r, rank in enumerate(ranks):
            sampler = DistributedSampler(range(N_IMG), num_replicas=world, rank=r, seed=1)
            sampler.set_epoch(epoch)
            order = list(sampler)  # this rank's indices; position k is global position r + k * world
            k = 0
            for e, ids, params, maps in rank["steps"]:
                if e != epoch:
                    continue
                assert np.array_equal(ids, order[k : k + len(ids)])
                np.testing.assert_allclose(maps, _reference_maps(params, imgs[ids], masks[ids]), rtol=1e-5, atol=1e-6)
                for j, i in enumerate(ids.tolist()):
                    if r + (k + j) * world < N_IMG:
                        originals[i] = maps[j]
                    else:  # a padding repeat: a later step, another model: another map than the one stored
                        assert not np.array_equal(maps[j], stored[i, epoch])
                k += len(ids)
        assert sorted(originals) == list(range(N_IMG))
        want = np.stack([originals[i] for i in range(N_IMG)])
        np.testing.assert_array_equal(stored[:, epoch], want)
        # the gathered mean loss (lowest rank wins) is the mean of the same original map
        np.testing.assert_allclose(loss[:, epoch], want.mean((1, 2)), rtol=1e-5)


def test_no_collective_carried_a_pixel_map(job):
    world, out, *_ = job
    for rank in _seg_ranks(out, world):
        calls = rank["calls"]
        assert any(name == "gather" for name, _, _ in calls)  # the spy saw the gather of the scalar loss stream
        assert max(size for _, size, _ in calls) < H * W  # no tensor as large as one map went through a collective
        layouts = [objects for name, _, objects in calls if name == "all_gather_object"]
        assert layouts and not any("'pixel'" in objects for objects in layouts)  # never offered to the gather


def test_chunks_of_the_killed_epoch_are_invisible_and_removed_on_resume(job, tmp_path):
    _, out, *_ = job
    path = tmp_path / "seg.ll"
    shutil.copytree(out / "seg.ll", path)  # the other tests of this job read the original
    killed = path / "runs/seg/streams/pixel/c" / str(SEG_EPOCHS)
    assert len(list(killed.iterdir())) == N_IMG  # every rank wrote its chunks of the killed epoch
    before = ll.open(path).trajectories("seg", "pixel")
    with pytest.warns(LedgerWarning, match="removed"):
        run = ll.open(path, mode="a").run("seg")
    assert not killed.exists()
    assert run.ticks == SEG_EPOCHS
    run.close()
    np.testing.assert_array_equal(ll.open(path).trajectories("seg", "pixel"), before)
