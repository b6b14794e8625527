"""PyTorch adapter: real training on sklearn digits and synthetic 32x32 images, checked against manual loops and numpy."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: pip install 'lossledger[torch]'")
pytest.importorskip("sklearn", reason="scikit-learn is not installed (the test extra has it)")

from lossledger.adapters.torch import AdapterError, IndexedDataset, Recorder, evaluate
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

import lossledger as ll
from lossledger.errors import (
    InvalidDTypeError,
    LedgerWarning,
    NonFiniteValueError,
    RunClosedError,
    ShapeMismatchError,
    UnknownSampleError,
)

N_TRAIN = 1200  # digits rows 0..1199 are the training split, the other 597 the probe (test) split


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_torch_thread):
    """Every test of this module runs with one torch thread (fixture in tests/adapters/conftest.py)."""


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)


@pytest.fixture
def digits_ledger(tmp_path, digits):
    _, y = digits
    splits = np.where(np.arange(len(y)) < N_TRAIN, "train", "test")
    led = ll.create(tmp_path / "digits.ll", n_samples=len(y), labels=y.numpy(), splits=splits)
    yield led
    led.close()


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(hidden=nn.Linear(64, 32), act=nn.ReLU(), out=nn.Linear(32, 10)))


def train_digits(digits, epochs: int, log, end_epoch, *, batch_size: int = 32) -> nn.Module:
    """Train an MLP on the digits training split; ``log(epoch, ids, losses)`` sees every batch's (B,) losses."""
    x, y = digits
    model = mlp(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = DataLoader(
        IndexedDataset(Subset(TensorDataset(x, y), range(N_TRAIN))),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(1),
    )
    for epoch in range(epochs):
        for ids, xb, yb in loader:
            losses = F.cross_entropy(model(xb), yb, reduction="none")
            log(epoch, ids, losses)
            opt.zero_grad()
            losses.mean().backward()
            opt.step()
        end_epoch()
    return model


# --- IndexedDataset ---------------------------------------------------------------------------------------
def test_indexed_dataset_puts_the_sample_id_first(digits):
    x, y = digits
    ds = IndexedDataset(TensorDataset(x[:10], y[:10]))
    sid, xi, yi = ds[3]
    assert sid == 3 and torch.equal(xi, x[3]) and yi == y[3]
    ids, xb, _ = next(iter(DataLoader(ds, batch_size=4)))
    assert ids.dtype == torch.int64 and ids.tolist() == [0, 1, 2, 3] and torch.equal(xb, x[:4])
    custom = IndexedDataset(TensorDataset(x[:3], y[:3]), sample_ids=[10**12, 7, 42])
    assert custom[0][0] == 10**12 and custom[2][0] == 42
    assert IndexedDataset([{"a": 1}])[0] == {"sample_id": 0, "a": 1}
    assert IndexedDataset(["img"])[0] == (0, "img")
    with pytest.raises(ShapeMismatchError, match="one id per item"):
        IndexedDataset(TensorDataset(x[:3], y[:3]), sample_ids=[1, 2])


# --- Recorder -------------------------------------------------------------------------------------------
def test_recorder_stores_what_a_manual_loop_computes_on_digits(digits, digits_ledger):
    with digits_ledger.run("mlp") as run, Recorder(run) as rec:
        train_digits(digits, 3, lambda _e, ids, losses: rec.log(ids, losses), rec.end_epoch)

    # The same training again, without lossledger: a plain loop keeping each epoch's losses in numpy.
    manual = np.full((3, len(digits[1])), np.nan, dtype=np.float32)

    def keep(epoch, ids, losses):
        manual[epoch, ids.numpy()] = losses.detach().numpy()

    train_digits(digits, 3, keep, lambda: None)

    reader = ll.open(digits_ledger.path)
    stored = reader.trajectories("mlp", "loss")  # (samples, ticks)
    assert stored.dtype == np.float32 and stored.shape == (len(digits[1]), 3)
    np.testing.assert_array_equal(stored.T, manual)  # bit-identical: the recorder does not perturb training
    assert np.isnan(stored[N_TRAIN:]).all()  # the test split was never logged: NaN, never 0
    assert not np.isnan(stored[:N_TRAIN]).any()
    ticks = reader.ticks("mlp")
    batches = -(-N_TRAIN // 32)
    assert ticks["epoch"].to_pylist() == [0, 1, 2]
    assert ticks["step"].to_pylist() == [batches, 2 * batches, 3 * batches]


def test_amp_bfloat16_and_float16_losses_are_stored_as_float32(digits, digits_ledger):
    x, y = digits
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = {}
    with digits_ledger.run("amp") as run, Recorder(run) as rec:
        loader = DataLoader(IndexedDataset(Subset(TensorDataset(x, y), range(256))), batch_size=64, shuffle=True)
        for ids, xb, yb in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(xb)
                assert logits.dtype == torch.bfloat16  # autocast really ran the layers in bfloat16
                per_sample = -logits.log_softmax(1).gather(1, yb[:, None])[:, 0]
            half = per_sample.to(torch.bfloat16)
            rec.log(ids, half, loss_fp16=per_sample.detach().to(torch.float16))
            for name, t in (("loss", half), ("loss_fp16", per_sample.detach().to(torch.float16))):
                expected.setdefault(name, {}).update(zip(ids.tolist(), t.detach().float().tolist(), strict=True))
            opt.zero_grad()
            per_sample.float().mean().backward()
            opt.step()
        rec.end_epoch()
    reader = ll.open(digits_ledger.path)
    assert set(reader.streams("amp")["dtype"].to_pylist()) == {"float32"}
    for name, want in expected.items():
        ids = np.array(sorted(want))
        got = reader.trajectories("amp", name, ids=ids)[:, 0]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, np.array([want[i] for i in ids], dtype=np.float32))
    assert len(expected["loss"]) == 256


def test_many_small_batches_and_mixed_streams_keep_logging_order(tmp_path):
    # 300 calls (compacted every 128), a stream logged only in some calls, and repeated ids: with
    # on_duplicate="first"/"last" the run must see each stream's values in the order they were logged.
    rng = np.random.default_rng(0)
    n = 50
    for mode in ("first", "last"):
        led = ll.create(tmp_path / f"{mode}.ll", n_samples=n)
        want = {"loss": {}, "margin": {}}
        with led.run("r", on_duplicate=mode) as run, Recorder(run) as rec:
            for call in range(300):
                ids = torch.from_numpy(rng.choice(n, 4, replace=False))
                loss = torch.from_numpy(rng.random(4).astype(np.float32))
                streams = {"margin": -loss} if call % 3 == 0 else {}
                rec.log(ids, loss, **streams)
                for name, t in {"loss": loss, **streams}.items():
                    for i, v in zip(ids.tolist(), t.tolist(), strict=True):
                        if mode == "last" or i not in want[name]:
                            want[name][i] = v
            assert len(rec._pending) < 100  # merged in blocks along the way
            rec.end_epoch()
        reader = ll.open(led.path)
        for name, values in want.items():
            expected = np.full(n, np.nan, dtype=np.float32)
            expected[list(values)] = list(values.values())
            np.testing.assert_array_equal(reader.trajectories("r", name)[:, 0], expected)
        assert reader.ticks("r")["step"].to_pylist() == [300]
        led.close()


def test_resumed_run_continues_epochs_and_steps(tmp_path):
    led = ll.create(tmp_path / "r.ll", n_samples=20)
    with led.run("r") as run, Recorder(run) as rec:
        for _ in range(2):
            for b in range(5):
                rec.log(torch.arange(4 * b, 4 * b + 4), torch.rand(4))
            rec.end_epoch()
    with led.run("r") as run, Recorder(run) as rec:
        for b in range(3):
            rec.log(torch.arange(4 * b, 4 * b + 4), torch.rand(4))
        assert rec.end_epoch() == 2
    ticks = ll.open(led.path).ticks("r")
    assert ticks["epoch"].to_pylist() == [0, 1, 2] and ticks["step"].to_pylist() == [5, 10, 13]
    led.close()


def test_closing_the_run_waits_for_the_background_commit(tmp_path):
    # A tick of a million samples takes a while to commit; closing the run (the with block) right after
    # end_epoch must not cut it off, even though the recorder itself is never closed.
    n = 1_000_000
    led = ll.create(tmp_path / "big.ll", n_samples=n)
    values = torch.rand(n)
    with led.run("r") as run:
        rec = Recorder(run)
        rec.log(torch.arange(n), values)
        assert rec.end_epoch() == 0
    reader = ll.open(led.path)
    assert reader.ticks("r").num_rows == 1
    np.testing.assert_array_equal(reader.trajectories("r", ids=[0, n - 1])[:, 0], values[[0, n - 1]].numpy())
    led.close()


def test_value_errors_surface_at_the_next_recorder_call_and_drop_only_that_tick(tmp_path):
    led = ll.create(tmp_path / "e.ll", n_samples=8)
    with led.run("r") as run:
        rec = Recorder(run)
        rec.log(torch.arange(4), torch.tensor([0.1, float("nan"), 0.3, 0.4]))
        rec.end_epoch()  # handed to the writer thread
        with pytest.raises(NonFiniteValueError, match="allow_nonfinite"):
            rec.wait()
        rec.log(torch.tensor([5, 99]), torch.rand(2))
        rec.end_epoch()
        with pytest.raises(UnknownSampleError):
            rec.log(torch.arange(2), torch.rand(2))  # logging does not touch the run: no error yet
            rec.end_epoch()  # waits for the previous commit, which failed
        rec.end_epoch()  # the tick logged just above still commits
        rec.close()
        assert run.ticks == 1
    assert np.isfinite(ll.open(led.path).trajectories("r")[:2, 0]).all()
    led.close()


def test_recorder_input_errors_say_what_to_do(digits_ledger):
    with digits_ledger.run("bad") as run:
        with pytest.raises(AdapterError, match="run=None"):
            Recorder(None)
        with Recorder(run, background=False) as rec:
            with pytest.raises(AdapterError, match="already has an open Recorder"):
                Recorder(run)
            losses = torch.rand(4, requires_grad=True)
            with pytest.raises(ShapeMismatchError, match="reduction='none'"):
                rec.log(torch.arange(4), losses.mean())
            with pytest.raises(ShapeMismatchError, match="one value per sample"):
                rec.log(torch.arange(3), losses)
            with pytest.raises(InvalidDTypeError, match="integers"):
                rec.log(torch.arange(4.0), losses)
            with pytest.raises(ShapeMismatchError, match="pass it once"):
                rec.log(torch.arange(4), losses, loss=losses)
            rec.log(torch.arange(4), emb=torch.rand(4, 3))
            with pytest.raises(ShapeMismatchError, match=r"element shape \(3,\) but got \(2,\)"):
                rec.log(torch.arange(4, 8), emb=torch.rand(4, 2))
            rec.log(torch.arange(4), losses)
            assert not any(t.requires_grad for e in rec._pending for t in e.streams.values())  # detached
            rec.end_epoch()
        with pytest.raises(RunClosedError, match="new Recorder"):
            rec.log(torch.arange(4), losses)
        with Recorder(run) as again:  # closed recorders release the run
            again.log(torch.arange(4), torch.rand(4))
            with pytest.warns(LedgerWarning, match="discarded"):
                again.close()


# --- evaluate -------------------------------------------------------------------------------------------
def numpy_probe(model: nn.Module, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Loss, margin, correct, prob and hidden activations of the digits MLP, computed in float64 numpy."""
    w = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    hidden = np.maximum(x @ w["hidden.weight"].T + w["hidden.bias"], 0.0)
    z = hidden @ w["out.weight"].T + w["out.bias"]
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    true = z[np.arange(len(y)), y]
    others = z.copy()
    others[np.arange(len(y)), y] = -np.inf
    return {
        "loss": lse - true,
        "margin": true - others.max(1),
        "correct": (z.argmax(1) == y).astype(np.float64),
        "prob": np.exp(true - lse),
        "probs": np.exp(z - lse[:, None]),
        "embedding": hidden,
    }


def test_evaluate_matches_numpy_on_the_digits_test_split(digits, digits_ledger):
    x, y = digits
    probe = DataLoader(IndexedDataset(TensorDataset(x[N_TRAIN:], y[N_TRAIN:]), sample_ids=range(N_TRAIN, len(y))),
                       batch_size=128)
    with digits_ledger.run("probe") as run, Recorder(run) as rec:
        model = train_digits(digits, 2, lambda _e, ids, losses: rec.log(ids, losses), rec.end_epoch)
        rec.wait()
        tick = evaluate(rec, model, probe, nn.CrossEntropyLoss(reduction="none"), prefix="test_", margin=True,
                        correct=True, prob=True, probs=True, embedding="act")
        assert tick == 2
        assert model.training and not model.act._forward_hooks  # train mode restored, hook removed
        want = numpy_probe(model, x[N_TRAIN:].double().numpy(), y[N_TRAIN:].numpy())
        # A functional loss and the run itself (its open recorder is used) work the same way.
        evaluate(run, model, probe, lambda z, t: F.cross_entropy(z, t, reduction="none"), prefix="again_")
    reader = ll.open(digits_ledger.path)
    assert reader.ticks("probe")["step"].to_pylist() == [38, 76, 76, 76]  # probe batches are not steps
    test_ids = np.arange(N_TRAIN, len(y))
    np.testing.assert_allclose(want["probs"].sum(1), 1.0, rtol=1e-12)
    for name, expected in want.items():
        got = reader.trajectories("probe", f"test_{name}", ids=test_ids, ticks=[2])[:, 0]
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=name)
        assert np.isnan(reader.trajectories("probe", f"test_{name}", ids=[0, 1])).all()  # train: never probed
    assert reader.trajectories("probe", "test_embedding", ids=test_ids).shape == (len(test_ids), 4, 32)
    assert 0.8 < want["correct"].mean()  # a trained model, so margins and probabilities are meaningful
    np.testing.assert_allclose(reader.trajectories("probe", "again_loss", ids=test_ids)[:, 3], want["loss"],
                               rtol=1e-5, atol=1e-5)


def test_evaluate_refuses_mean_losses_and_unknown_layers(digits, digits_ledger):
    x, y = digits
    probe = DataLoader(IndexedDataset(TensorDataset(x[:64], y[:64])), batch_size=32)
    model = mlp(0)
    with digits_ledger.run("bad-probe") as run:
        with pytest.raises(ShapeMismatchError, match=r"CrossEntropyLoss\(reduction='none'\)"):
            evaluate(run, model, probe, nn.CrossEntropyLoss())
        with pytest.raises(ShapeMismatchError, match="reduction='none'"):
            evaluate(run, model, probe, F.cross_entropy)
        with pytest.raises(AdapterError, match="no layer 'fc9'.*'hidden'"):
            evaluate(run, model, probe, nn.CrossEntropyLoss(reduction="none"), embedding="fc9")
        assert model.training and run.ticks == 0
        with Recorder(run) as rec:  # nothing was left holding the run
            assert evaluate(rec, model, probe, nn.CrossEntropyLoss(reduction="none")) == 0


def test_cnn_on_synthetic_images_with_the_probe_in_the_training_tick(tmp_path):
    g = torch.Generator().manual_seed(0)
    n_train, n_probe, classes = 256, 128, 4
    labels = torch.randint(0, classes, (n_train + n_probe,), generator=g)
    images = torch.randn(classes, 3, 32, 32, generator=g)[labels] + torch.randn(len(labels), 3, 32, 32, generator=g)
    data = TensorDataset(images, labels)
    led = ll.create(tmp_path / "img.ll", n_samples=len(labels), labels=labels.numpy())
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train = DataLoader(IndexedDataset(Subset(data, range(n_train))), batch_size=32, shuffle=True)
    probe_ids = range(n_train, n_train + n_probe)
    probe = DataLoader(IndexedDataset(Subset(data, probe_ids), sample_ids=probe_ids), batch_size=64)
    manual = np.full((2, len(labels)), np.nan, dtype=np.float32)
    with led.run("cnn") as run, Recorder(run) as rec:
        for epoch in range(2):
            for ids, xb, yb in train:
                losses = F.cross_entropy(model(xb), yb, reduction="none")
                rec.log(ids, losses)
                manual[epoch, ids.numpy()] = losses.detach().numpy()
                opt.zero_grad()
                losses.mean().backward()
                opt.step()
            # the probe joins the epoch's tick, in the same stream (other samples), and commits it
            assert evaluate(rec, model, probe, nn.CrossEntropyLoss(reduction="none"), correct=True) == epoch
            model.eval()
            with torch.no_grad():  # the model at this point, recomputed by a plain loop
                manual[epoch, n_train:] = F.cross_entropy(model(images[n_train:]), labels[n_train:], reduction="none")
            model.train()
    reader = ll.open(led.path)
    np.testing.assert_allclose(reader.trajectories("cnn", "loss").T, manual, rtol=1e-5, atol=1e-6)
    correct = reader.trajectories("cnn", "correct")
    assert np.isnan(correct[:n_train]).all() and set(np.unique(correct[n_train:])) <= {0.0, 1.0}
    assert reader.ticks("cnn")["step"].to_pylist() == [8, 16]
    led.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_copied_without_a_sync_and_stored_exactly(tmp_path):
    led = ll.create(tmp_path / "gpu.ll", n_samples=4096)
    expected = np.full(4096, np.nan, dtype=np.float32)
    with led.run("r") as run, Recorder(run) as rec:
        for b in range(16):
            ids = torch.arange(256 * b, 256 * b + 256, device="cuda")
            losses = torch.rand(256, device="cuda", dtype=torch.float16) * (b + 1)
            rec.log(ids, losses)
            expected[256 * b : 256 * b + 256] = losses.float().cpu().numpy()
        entry = rec._pending[-1]
        assert entry.streams["loss"].is_pinned() and entry.event is not None
        rec.end_epoch()
    np.testing.assert_array_equal(ll.open(led.path).trajectories("r")[:, 0], expected)
    led.close()

