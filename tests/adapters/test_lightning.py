"""Lightning callback: Trainer.fit on digits, values checked against what training_step computed; resume."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: pip install 'lossledger[torch]'")
pytest.importorskip("lightning.pytorch", reason="lightning is not installed: pip install 'lossledger[lightning]'")
pytest.importorskip("sklearn", reason="scikit-learn is not installed (the test extra has it)")

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lossledger.adapters.lightning import LossLedgerCallback
from lossledger.adapters.torch import AdapterError, IndexedDataset
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lossledger as ll
from lossledger.errors import LedgerWarning

N, BATCH = 320, 32  # 10 optimizer steps per epoch


class Digits(pl.LightningModule):
    """An MLP whose training_step returns per-sample losses and ids, and keeps its own copy of them."""

    def __init__(self, *, with_ids: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.with_ids = with_ids
        self.seen: dict[int, dict[int, float]] = {}

    def training_step(self, batch, batch_idx):
        ids, x, y = batch
        logits = self.net(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        self.seen.setdefault(self.current_epoch, {}).update(zip(ids.tolist(), losses.tolist(), strict=True))
        out = {"loss": losses.mean(), "per_sample_loss": losses, "correct": logits.argmax(1) == y}
        if self.with_ids:
            out["ids"] = ids
        return out

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class AssertDetached(pl.Callback):
    """Runs after the ledger callback: what it holds must not keep an autograd graph alive."""

    def __init__(self, ledger_cb: LossLedgerCallback) -> None:
        self.ledger_cb, self.checked = ledger_cb, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        assert outputs["per_sample_loss"].requires_grad  # Lightning itself does not detach it
        pending = self.ledger_cb.recorder._pending
        assert pending and not any(t.requires_grad for e in pending for t in e.streams.values())
        self.checked += 1


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_torch_thread):
    """Every test of this module runs with one torch thread (fixture in tests/adapters/conftest.py)."""


@pytest.fixture(scope="module")
def loader():
    x, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(x[:N] / 16.0, dtype=torch.float32), torch.tensor(y[:N]))
    return DataLoader(IndexedDataset(data), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))


def fit(tmp_path, loader, callback, max_epochs: int, ckpt: str | None = None, extra=()) -> Digits:
    module = Digits()
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, *extra, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")],
    )
    trainer.fit(module, loader, ckpt_path=None if ckpt is None else str(tmp_path / "ckpt" / ckpt))
    return module


def assert_stored(path, run: str, module: Digits, ticks: list[int], epochs: list[int]) -> None:
    stored = ll.open(path).trajectories(run, "loss")
    for tick, epoch in zip(ticks, epochs, strict=True):
        seen = module.seen[epoch]
        assert sorted(seen) == list(range(N))
        np.testing.assert_array_equal(stored[:N, tick], np.array([seen[i] for i in range(N)], dtype=np.float32))


def test_fit_and_resume_continue_the_run(tmp_path, loader):
    ledger = ll.create(tmp_path / "pl.ll", n_samples=N + 5)
    cb = LossLedgerCallback(lambda: ledger.run("mlp"), streams=["correct"])
    check = AssertDetached(cb)
    first = fit(tmp_path, loader, cb, max_epochs=2, extra=[check])
    assert check.checked == 20
    reader = ll.open(ledger.path)
    ticks = reader.ticks("mlp")
    assert ticks["epoch"].to_pylist() == [0, 1] and ticks["step"].to_pylist() == [10, 20]
    assert_stored(ledger.path, "mlp", first, [0, 1], [0, 1])
    assert np.isnan(reader.trajectories("mlp", "loss")[N:]).all()  # never in a batch: NaN
    correct = reader.trajectories("mlp", "correct")[:N]
    assert set(np.unique(correct)) <= {0.0, 1.0}

    # The callback opened the run, so it closed it: a resumed fit can open it again, and continues it.
    # from_path's opener pickles (strategy="ddp_spawn" pickles the callbacks to its processes).
    reopen = pickle.loads(pickle.dumps(LossLedgerCallback.from_path(ledger.path, "mlp", on_mismatch="error")))
    resumed = fit(tmp_path, loader, reopen, max_epochs=4, ckpt="epoch=1.ckpt")
    ticks = reader.ticks("mlp")
    assert ticks["epoch"].to_pylist() == [0, 1, 2, 3] and ticks["step"].to_pylist() == [10, 20, 30, 40]
    assert_stored(ledger.path, "mlp", resumed, [2, 3], [2, 3])
    ledger.close()


def test_resume_from_an_older_checkpoint_warns_or_raises(tmp_path, loader):
    ledger = ll.create(tmp_path / "pl.ll", n_samples=N)
    with ledger.run("mlp") as run:
        fit(tmp_path, loader, LossLedgerCallback(run), max_epochs=3)
        assert run.ticks == 3
        with pytest.raises(AdapterError, match=r"ticks up to epoch 2.*starts at epoch 1.*on_mismatch='error'"):
            fit(tmp_path, loader, LossLedgerCallback(run, on_mismatch="error"), max_epochs=2, ckpt="epoch=0.ckpt")
        assert run.ticks == 3
        with pytest.warns(LedgerWarning, match=r"epochs 1\.\.2 came from training after this checkpoint"):
            again = fit(tmp_path, loader, LossLedgerCallback(run), max_epochs=2, ckpt="epoch=0.ckpt")
    ticks = ll.open(ledger.path).ticks("mlp")
    assert ticks["epoch"].to_pylist() == [0, 1, 2, 1]  # the repeated epoch is appended, in training order
    assert ticks["step"].to_pylist() == [10, 20, 30, 20]
    assert_stored(ledger.path, "mlp", again, [3], [1])

    with ledger.run("late") as late, pytest.warns(LedgerWarning, match=r"epochs 0\.\.1 were trained without"):
        fit(tmp_path, loader, LossLedgerCallback(late), max_epochs=3, ckpt="epoch=1.ckpt")
    assert ll.open(ledger.path).ticks("late")["epoch"].to_pylist() == [2]
    ledger.close()


def test_training_step_without_ids_is_refused_with_the_keys_to_return(tmp_path, loader):
    ledger = ll.create(tmp_path / "pl.ll", n_samples=N)
    with ledger.run("mlp") as run:
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False,
                             callbacks=[LossLedgerCallback(run)])
        with pytest.raises(AdapterError, match=r"'per_sample_loss'.*'ids'.*got \['correct', 'loss', 'per_sample"):
            trainer.fit(Digits(with_ids=False), loader, ckpt_path=None)
        assert run.ticks == 0
    ledger.close()
