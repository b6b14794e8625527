"""Hugging Face Trainer adapter: real ``Trainer.train()`` of tiny randomly initialised models (no download).

A forward hook on the model records every batch's inputs and logits; the reference per-sample losses are
computed from them in float64 numpy, and each row is matched to its sample through its (unique) token
sequence, not through the adapter's id column, so a wrong id mapping or a wrong epoch assignment fails.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'lossledger[torch]')")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate (pip install accelerate)")

from lossledger.adapters.transformers import IndexedDataset, LossLedgerTrainer, token_losses

import lossledger as ll

VOCAB, SEQ = 40, 8
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, input_ids: np.ndarray, labels: np.ndarray) -> None:
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": torch.as_tensor(self.input_ids[i]), "labels": torch.as_tensor(self.labels[i])}


def _sequences(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).integers(5, VOCAB, size=(n, SEQ))
    assert len({row.tobytes() for row in x}) == n  # each sample is recognisable from its tokens
    return x


def _args(tmp_path, **kw) -> transformers.TrainingArguments:
    defaults = {
        "output_dir": str(tmp_path / "out"), "use_cpu": True, "report_to": "none", "save_strategy": "no",
        "logging_strategy": "no", "per_device_train_batch_size": 16, "per_device_eval_batch_size": 12,
        "num_train_epochs": 3, "learning_rate": 3e-3, "seed": 0, "disable_tqdm": True, "dataloader_num_workers": 0,
    }
    return transformers.TrainingArguments(**{**defaults, **kw})


class Capture:
    """Forward hook + callback: (epoch, training?, input_ids, labels, logits) of every forward pass."""

    def __init__(self, model) -> None:
        self.epoch, self.rows = 0, []
        model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        self.rows.append((self.epoch, module.training, kwargs["input_ids"].numpy().copy(),
                          kwargs["labels"].numpy().copy(), output.logits.detach().double().numpy().copy()))

    def callback(self) -> transformers.TrainerCallback:
        capture = self

        class EpochCounter(transformers.TrainerCallback):
            def on_epoch_end(self, args, state, control, **kwargs):
                capture.epoch += 1  # the evaluation after epoch e runs with capture.epoch == e + 1

        return EpochCounter()


def _ce(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def _bert(seed: int = 0):
    transformers.set_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=SEQ, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def test_sequence_classification_train_and_eval_losses(tmp_path) -> None:
    x_train, x_eval = _sequences(96, 0), _sequences(30, 1)
    y_train, y_eval = x_train[:, 1] % 2, x_eval[:, 1] % 2
    rng = np.random.default_rng(2)
    ids_train, ids_eval = 500 + rng.permutation(96), 900 + rng.permutation(30)  # shuffled ledger ids
    token_to_id = {row.tobytes(): int(i) for rows, ids in ((x_train, ids_train), (x_eval, ids_eval))
                   for row, i in zip(rows, ids)}
    ledger = ll.create(tmp_path / "bert.ll", sample_ids=np.concatenate([ids_train, ids_eval, [1, 2]]),
                       labels=np.concatenate([y_train, y_eval, [0, 0]]))
    model = _bert()
    capture = Capture(model)
    with ledger.run("bert") as run:
        trainer = LossLedgerTrainer(
            model=model, run=run, log_eval=True, callbacks=[capture.callback()],
            args=_args(tmp_path, gradient_accumulation_steps=2, eval_strategy="epoch"),
            train_dataset=IndexedDataset(TokenDataset(x_train, y_train), ids_train),
            eval_dataset=IndexedDataset(TokenDataset(x_eval, y_eval), ids_eval),
        )
        trainer.train()
    ticks = ledger.ticks("bert").to_pydict()
    assert ticks["epoch"] == [0, 1, 2]
    assert ticks["step"] == [3, 6, 9]  # 6 batches of 16 per epoch, 2 per optimizer step

    reference = np.full((ledger.n_samples, 3), np.nan)
    row_of = {int(i): r for r, i in enumerate(ledger.sample_ids)}
    for epoch, training, input_ids, labels, logits in capture.rows:
        tick = epoch if training else epoch - 1  # evaluation of epoch e runs after its on_epoch_end
        for tokens, loss in zip(input_ids, _ce(logits, labels)):
            reference[row_of[token_to_id[tokens.tobytes()]], tick] = loss
    stored = ledger.trajectories("bert", "loss")
    assert np.isfinite(reference[:-2]).all()  # each train and eval sample seen once per epoch
    np.testing.assert_allclose(stored, reference, rtol=1e-5, atol=1e-6)  # ids 1, 2: NaN on both sides
    assert np.isnan(stored[-2:]).all()


def test_training_is_unchanged(tmp_path) -> None:
    """The adapter only reads the forward pass: the same seed gives the same weights as a plain Trainer."""
    x, y = _sequences(64, 3), _sequences(64, 3)[:, 2] % 2
    ledger = ll.create(tmp_path / "same.ll", n_samples=64)
    plain = transformers.Trainer(model=_bert(1), args=_args(tmp_path, num_train_epochs=2),
                                 train_dataset=TokenDataset(x, y))
    plain.train()
    with ledger.run("r") as run:
        logged = LossLedgerTrainer(model=_bert(1), args=_args(tmp_path, num_train_epochs=2), run=run,
                                   train_dataset=IndexedDataset(TokenDataset(x, y)))
        logged.train()
    for (name, a), (_, b) in zip(plain.model.named_parameters(), logged.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert ledger.ticks("r").num_rows == 2 and np.isfinite(ledger.trajectories("r", "loss")).all()


def test_causal_lm_token_losses(tmp_path) -> None:
    x = _sequences(48, 4)
    labels = x.copy()
    labels[:, :3] = -100  # prompt tokens carry no loss
    labels[5, 3:] = -100  # a sample with no labelled token at all: no loss, stays NaN (never 0)
    token_to_row = {row.tobytes(): r for r, row in enumerate(x)}
    transformers.set_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    capture = Capture(model)
    ledger = ll.create(tmp_path / "gpt.ll", n_samples=48)
    with ledger.run("gpt") as run:
        LossLedgerTrainer(model=model, args=_args(tmp_path, num_train_epochs=2), run=run,
                          callbacks=[capture.callback()],
                          train_dataset=IndexedDataset(TokenDataset(x, labels))).train()
    reference = np.full((48, 2), np.nan)
    for epoch, _, input_ids, batch_labels, logits in capture.rows:
        shifted = batch_labels[:, 1:]
        ce = _ce(logits[:, :-1], np.where(shifted == -100, 0, shifted))
        mask = shifted != -100
        with np.errstate(invalid="ignore"):
            per_sample = (ce * mask).sum(axis=1) / mask.sum(axis=1)
        for tokens, loss in zip(input_ids, per_sample):
            reference[token_to_row[tokens.tobytes()], epoch] = loss
    stored = ledger.trajectories("gpt", "loss")
    assert np.isnan(stored[5]).all() and np.isfinite(np.delete(stored, 5, axis=0)).all()
    np.testing.assert_allclose(stored, reference, rtol=1e-5, atol=1e-6)
    # token_losses without shift (token classification) on a hand-made case.
    logits = torch.zeros(2, 3, 4)
    logits[0, :, 1] = 2.0
    got = token_losses(logits, torch.tensor([[1, 1, -100], [-100, -100, -100]]), shift=False)
    expected = -np.log(np.exp(2) / (np.exp(2) + 3))
    assert got[0].item() == pytest.approx(expected, rel=1e-6) and torch.isnan(got[1])


def test_errors_say_what_to_do(tmp_path) -> None:
    x, y = _sequences(16, 5), _sequences(16, 5)[:, 1] % 2
    ledger = ll.create(tmp_path / "err.ll", n_samples=16)
    with ledger.run("r") as run:
        with pytest.raises(ll.errors.ShapeMismatchError, match="eval_strategy='epoch'"):
            LossLedgerTrainer(model=_bert(), args=_args(tmp_path), run=run, log_eval=True,
                              train_dataset=IndexedDataset(TokenDataset(x, y)))
        trainer = LossLedgerTrainer(model=_bert(), args=_args(tmp_path, num_train_epochs=1), run=run,
                                    train_dataset=TokenDataset(x, y))
        with pytest.raises(ll.errors.ShapeMismatchError, match="wrap the dataset in"):
            trainer.train()
        with pytest.raises(ll.errors.ShapeMismatchError, match="one id per item"):
            IndexedDataset(TokenDataset(x, y), ids=np.arange(3))
    assert ledger.ticks("r").num_rows == 0


# --- two processes (DDP on gloo): each rank runs `python tests/adapters/test_transformers.py DIR` ----------------


def test_ddp_two_processes(tmp_path) -> None:
    """Each rank logs its own batches; rank 0 gathers once per epoch and stores every sample exactly once."""
    import functools
    import signal
    import socket
    import subprocess
    import sys

    x = _sequences(51, 6)  # 51 samples, 2 ranks, batches of 8: the last batches are padded with repeats
    ids = 100 + np.random.default_rng(7).permutation(51)
    ledger = ll.create(tmp_path / "ddp.ll", sample_ids=ids, labels=x[:, 1] % 2)
    ledger.close()
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    # Both ranks in one new process group, so that a hang kills both.
    procs: list[subprocess.Popen] = []
    logs = [tmp_path / f"rank{rank}.log" for rank in (0, 1)]
    for rank in (0, 1):
        with open(logs[rank], "w") as log:  # files, not pipes: a full pipe could stall a collective
            procs.append(subprocess.Popen(
                [sys.executable, __file__, str(tmp_path)], env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=functools.partial(os.setpgid, 0, procs[0].pid if procs else 0),  # noqa: PLW1509
            ))
    try:
        codes = [p.wait(timeout=180) for p in procs]
    except subprocess.TimeoutExpired:
        os.killpg(procs[0].pid, signal.SIGKILL)
        codes = [p.wait() for p in procs]
    output = "\n".join(f"rank {rank}:\n{path.read_text()}" for rank, path in enumerate(logs))
    assert codes == [0, 0], f"exit codes {codes} (negative: killed after 180 s)\n{output}"
    token_to_id = {row.tobytes(): int(i) for row, i in zip(x, ids)}
    candidates: dict[tuple[int, int], list[float]] = {}
    for rank in (0, 1):
        saved = np.load(tmp_path / f"capture{rank}.npz")
        losses = _ce(saved["logits"], saved["labels"])
        for epoch, tokens, loss in zip(saved["epoch"], saved["input_ids"], losses):
            candidates.setdefault((token_to_id[tokens.tobytes()], int(epoch)), []).append(float(loss))
    ledger = ll.open(tmp_path / "ddp.ll")
    ticks = ledger.ticks("ddp").to_pydict()
    assert ticks["epoch"] == [0, 1] and ticks["step"] == [4, 8], ticks  # 26 samples per rank, batches of 8
    stored = ledger.trajectories("ddp", "loss", ids=ids)
    assert np.isfinite(stored).all()  # every sample logged in every epoch, across both ranks
    # Accelerate pads each rank's last batch to full size by repeating samples: repeats reach the gather.
    assert sum(len(v) > 1 for v in candidates.values()) > 0
    for (sample, epoch), values in candidates.items():
        row = int(np.flatnonzero(ids == sample)[0])
        assert np.isclose(values, stored[row, epoch], rtol=1e-5, atol=1e-6).any(), (sample, epoch, values)


def _ddp_child(root: str) -> None:
    from pathlib import Path

    rank = int(os.environ["RANK"])
    path = Path(root)
    x = _sequences(51, 6)
    ids = 100 + np.random.default_rng(7).permutation(51)
    model = _bert(0)
    capture = Capture(model)
    run = ll.open(path / "ddp.ll", mode="a").run("ddp") if rank == 0 else None
    trainer = LossLedgerTrainer(
        model=model, run=run, callbacks=[capture.callback()],
        args=_args(path, per_device_train_batch_size=8, num_train_epochs=2, ddp_backend="gloo"),
        train_dataset=IndexedDataset(TokenDataset(x, x[:, 1] % 2), ids),
    )
    trainer.train()
    assert trainer.args.world_size == 2
    rows = [r for r in capture.rows if r[1]]
    np.savez(path / f"capture{rank}.npz", epoch=np.concatenate([np.full(len(r[2]), r[0]) for r in rows]),
             input_ids=np.concatenate([r[2] for r in rows]), labels=np.concatenate([r[3] for r in rows]),
             logits=np.concatenate([r[4] for r in rows]))
    if run is not None:
        run.close()
    torch.distributed.barrier()  # both ranks done before either tears down gloo (else: abort at exit)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    import sys

    _ddp_child(sys.argv[1])
