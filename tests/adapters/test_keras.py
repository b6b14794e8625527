"""Keras 3 adapter: real ``model.fit`` on sklearn digits, on the torch and on the jax backend.

Keras picks its backend once, at import, so each backend runs in a child process with ``KERAS_BACKEND`` set:
``python tests/adapters/test_keras.py <backend> <dir>`` runs every scenario and prints ``ok <scenario>`` or
``FAIL <scenario>`` with its traceback. The stored losses are compared with per-sample losses recomputed in
numpy from the predictions a second callback snapshots after each epoch, keyed by sample id (the probe rows
and their ids are shuffled, so a wrong id mapping fails).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest

BACKENDS = ["torch", "jax"]
SCENARIOS = ["single_output", "multi_output", "early_stop_and_resume", "api"]
EXTRA_IDS = [1, 2, 3]  # in the ledger, in no probe: must stay NaN (no padded rows stored)


@pytest.fixture(scope="module", params=BACKENDS)
def backend_run(request, tmp_path_factory) -> tuple[str, str]:
    backend = request.param
    for module, extra in (("keras", "keras"), (backend, backend), ("sklearn", "test")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install 'lossledger[{extra}]')")
    root = tmp_path_factory.mktemp(f"keras-{backend}")
    # One torch thread: tiny models train faster, and a busy machine cannot stall its thread pool.
    env = {**os.environ, "KERAS_BACKEND": backend, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, backend, str(root)], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    return backend, proc.stdout + proc.stderr


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_keras_callback(backend_run: tuple[str, str], scenario: str) -> None:
    backend, output = backend_run
    assert f"ok {scenario}\n" in output, f"scenario {scenario!r} on the {backend} backend:\n{output}"


# --- the child process --------------------------------------------------------------------------------------


def _data():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = (x / 16.0).astype(np.float32), y.astype(np.int32)
    rng = np.random.default_rng(0)
    ids = 7000 + rng.permutation(len(y))  # ledger ids unrelated to row order
    rows = rng.permutation(len(y))
    test, train = rows[:450], rows[450:]  # shuffled rows: the probes are in no particular id order
    return x, y, ids.astype(np.int64), train, test


def _ledger(root: Path, name: str, ids: np.ndarray, y: np.ndarray):
    import lossledger as ll

    return ll.create(root / f"{name}.ll", sample_ids=np.concatenate([ids, EXTRA_IDS]),
                     labels=np.concatenate([y, [0, 0, 0]]))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _snapshot(fn):
    """A callback that, after each epoch, stores ``fn(model)`` (reference values computed in numpy)."""
    import keras

    class Snapshot(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.values: list = []

        def on_epoch_end(self, epoch, logs=None):
            self.values.append(fn(self.model))

    return Snapshot()


def _assert_stored(ledger, run: str, stream: str, ids, expected: np.ndarray, rtol: float = 1e-4) -> None:
    stored = ledger.trajectories(run, stream, ids=ids)
    assert stored.shape == expected.shape, (stored.shape, expected.shape)
    np.testing.assert_allclose(stored, expected, rtol=rtol, atol=1e-5, err_msg=f"{run}/{stream}")
    assert np.isnan(ledger.trajectories(run, stream, ids=EXTRA_IDS)).all(), "rows for padding were stored"


def _single_output(root: Path) -> None:
    import keras
    from lossledger.adapters.keras import LossLedgerCallback

    x, y, ids, train, test = _data()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def reference(model):  # per-sample CE from the model's logits, keyed by the ledger id
        out = {}
        for rows in (test, train):
            logp = _log_softmax(model.predict(x[rows], batch_size=2000, verbose=0))
            out.update(zip(ids[rows].tolist(), -logp[np.arange(len(rows)), y[rows]]))
        return out

    snap = _snapshot(reference)
    ledger = _ledger(root, "single", ids, y)
    with ledger.run("mlp") as run:
        callback = LossLedgerCallback(run, probe=(x[test], y[test], ids[test]),
                                      train_probe=(x[train], y[train], ids[train]), batch_size=100)
        history = model.fit(x[train], y[train], epochs=3, batch_size=64, verbose=0, callbacks=[callback, snap])
    assert len(history.history["loss"]) == 3
    ticks = ledger.ticks("mlp").to_pydict()
    steps = -(-len(train) // 64)
    assert ticks["epoch"] == [0, 1, 2] and ticks["step"] == [steps, 2 * steps, 3 * steps], ticks
    all_ids = ids[np.concatenate([test, train])]
    expected = np.array([[snap.values[t][i] for t in range(3)] for i in all_ids.tolist()])
    _assert_stored(ledger, "mlp", "loss", all_ids, expected)
    assert ledger.streams("mlp").column("stream").to_pylist() == ["loss"]
    # The losses changed between epochs (the model trained), so each tick holds that epoch's weights.
    assert (np.abs(np.diff(expected, axis=1)) > 1e-4).mean() > 0.5


def _multi_output(root: Path) -> None:
    import keras
    from lossledger.adapters.keras import LossLedgerCallback

    x, y, ids, train, test = _data()
    odd = (y % 2).astype(np.float32)[:, None]
    for structure in ("dict", "list"):
        keras.utils.set_random_seed(1)
        inp = keras.Input((64,))
        h = keras.layers.Dense(32, activation="relu")(inp)
        digit = keras.layers.Dense(10, activation="softmax", name="digit")(h)
        parity = keras.layers.Dense(1, activation="sigmoid", name="odd")(h)
        if structure == "dict":
            model = keras.Model(inp, {"digit": digit, "odd": parity})
            losses = {"digit": "sparse_categorical_crossentropy", "odd": keras.losses.BinaryCrossentropy()}
            weights = {"digit": 1.0, "odd": 0.5}

            def targets(rows):
                return {"digit": y[rows], "odd": odd[rows]}

            def correct(y_true, y_pred):
                return y_pred["digit"].argmax(axis=1) == y_true["digit"]
        else:
            model = keras.Model(inp, [digit, parity])
            losses = ["sparse_categorical_crossentropy", keras.losses.BinaryCrossentropy()]
            weights = [1.0, 0.5]

            def targets(rows):
                return [y[rows], odd[rows]]

            def correct(y_true, y_pred):
                return y_pred[0].argmax(axis=1) == y_true[0]
        model.compile("adam", loss=losses, loss_weights=weights)

        def reference(model):
            pred = model.predict(x[test], batch_size=2000, verbose=0)
            p_digit, p_odd = (pred["digit"], pred["odd"]) if isinstance(pred, dict) else pred
            eps = 1e-7  # Keras clips probabilities to [eps, 1 - eps] before the log
            p = np.clip(p_digit / p_digit.sum(axis=1, keepdims=True), eps, 1 - eps).astype(np.float64)
            ce = -np.log(p[np.arange(len(test)), y[test]])
            q = np.clip(p_odd.astype(np.float64), eps, 1 - eps)
            bce = -(odd[test] * np.log(q) + (1 - odd[test]) * np.log(1 - q)).mean(axis=1)
            return ce, bce, p_digit.argmax(axis=1) == y[test]

        snap = _snapshot(reference)
        ledger = _ledger(root, f"multi-{structure}", ids, y)
        with ledger.run("two-heads") as run:
            callback = LossLedgerCallback(run, probe=(x[test], targets(test), ids[test]), batch_size=128,
                                          streams={"correct": correct})
            model.fit(x[train], targets(train), epochs=2, batch_size=64, verbose=0, callbacks=[callback, snap])
        names = sorted(ledger.streams("two-heads").column("stream").to_pylist())
        assert names == ["correct", "loss", "loss_digit", "loss_odd"], names
        ce, bce, hit = (np.stack([s[k] for s in snap.values], axis=1) for k in range(3))
        _assert_stored(ledger, "two-heads", "loss_digit", ids[test], ce)
        _assert_stored(ledger, "two-heads", "loss_odd", ids[test], bce)
        _assert_stored(ledger, "two-heads", "loss", ids[test], ce + 0.5 * bce)
        _assert_stored(ledger, "two-heads", "correct", ids[test], hit.astype(np.float32))
        # Keras' own weighted loss on the probe is the mean of the per-sample total.
        keras_loss = model.evaluate(x[test], targets(test), batch_size=len(test), verbose=0, return_dict=True)["loss"]
        stored_last = ledger.trajectories("two-heads", "loss", ids=ids[test])[:, -1]
        np.testing.assert_allclose(stored_last.mean(), keras_loss, rtol=1e-4)


def _early_stop_and_resume(root: Path) -> None:
    import keras
    from lossledger.adapters.keras import LossLedgerCallback

    x, y, ids, train, test = _data()
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy")

    def reference(model):
        p = model.predict(x[test], verbose=0).astype(np.float64)
        return -np.log(np.clip(p / p.sum(1, keepdims=True), 1e-7, 1 - 1e-7)[np.arange(len(test)), y[test]])

    snap = _snapshot(reference)
    stop = keras.callbacks.EarlyStopping(monitor="loss", min_delta=1e9, patience=1)  # stops after epoch 1
    ledger = _ledger(root, "early", ids, y)
    probe = (x[test], y[test], ids[test])
    with ledger.run("es") as run:
        history = model.fit(x[train], y[train], epochs=10, batch_size=128, verbose=0,
                            callbacks=[LossLedgerCallback(run, probe), snap, stop])
    assert len(history.history["loss"]) == 2, history.history
    assert ledger.ticks("es").num_rows == 2  # the 8 epochs not run are not in the ledger (never 0)
    stored = ledger.trajectories("es", "loss", ids=ids[test])
    assert stored.shape == (len(test), 2) and np.isfinite(stored).all() and (stored > 0).all()

    with ledger.run("es") as run:  # resume: fit continues at epoch 2, the run after its tick 1
        model.fit(x[train], y[train], initial_epoch=2, epochs=4, batch_size=128, verbose=0,
                  callbacks=[LossLedgerCallback(run, probe), snap])
    ticks = ledger.ticks("es").to_pydict()
    steps = -(-len(train) // 128)
    assert ticks["epoch"] == [0, 1, 2, 3] and ticks["step"] == [steps * (t + 1) for t in range(4)], ticks
    _assert_stored(ledger, "es", "loss", ids[test], np.stack(snap.values, axis=1))


def _api(root: Path) -> None:
    import keras
    from keras import ops
    from lossledger.adapters.keras import LossLedgerCallback, probe_losses

    import lossledger as ll

    x, y, ids, _, test = _data()
    ledger = _ledger(root, "api", ids, y)
    with ledger.run("api") as run:
        for bad, message in (
            ((x[test], y[test], ids[test][:-1]), "one target and one sample id per input row"),
            ((x[test], y[test][:10], ids[test]), "one target and one sample id per input row"),
            ((x[test], y[test]), "must be a tuple (x, y, ids)"),
        ):
            try:
                LossLedgerCallback(run, probe=bad)
            except ll.errors.ShapeMismatchError as err:
                assert message in str(err), str(err)
            else:
                raise AssertionError(f"probe {len(bad)} accepted")
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(4)])
    target = np.random.default_rng(0).normal(size=(len(y), 4)).astype(np.float32)
    try:
        probe_losses(model, x, target)
    except ll.errors.ShapeMismatchError as err:
        assert "pass loss=" in str(err)
    else:
        raise AssertionError("an uncompiled model without loss= was accepted")
    try:
        probe_losses(model, x, target, loss=lambda t, p: ops.mean(ops.square(t - p)))
    except ll.errors.ShapeMismatchError as err:
        assert "one value per sample" in str(err)
    else:
        raise AssertionError("a loss reduced over the batch was accepted")
    try:
        probe_losses(model, x, [target, target], loss="mse")
    except ll.errors.ShapeMismatchError as err:
        assert "one target per output" in str(err)
    else:
        raise AssertionError("two targets for a single-output model were accepted")
    # Element-wise losses: averaged per sample, or kept whole with per_element=True; batches never padded.
    pred = model.predict(x, verbose=0).astype(np.float64)
    squared = (target - pred) ** 2
    per_sample = probe_losses(model, x, target, loss=lambda t, p: ops.square(t - p), batch_size=500)
    np.testing.assert_allclose(per_sample["loss"], squared.mean(axis=1), rtol=1e-5, atol=1e-6)
    whole = probe_losses(model, x, target, loss=lambda t, p: ops.square(t - p), batch_size=500, per_element=True)
    assert whole["loss"].shape == (len(y), 4) and whole["loss"].dtype == np.float32
    np.testing.assert_allclose(whole["loss"], squared, rtol=1e-5, atol=1e-6)
    mse = probe_losses(model, x, target, loss="mse", batch_size=1000)["loss"]
    np.testing.assert_allclose(mse, squared.mean(axis=1), rtol=1e-5, atol=1e-6)


def main(backend: str, root: str) -> None:
    import warnings

    import keras

    from lossledger.errors import LedgerWarning

    warnings.simplefilter("error", LedgerWarning)
    assert keras.backend.backend() == backend, (keras.backend.backend(), backend)
    for scenario in SCENARIOS:
        path = Path(root) / scenario
        path.mkdir()
        try:
            globals()[f"_{scenario}"](path)
        except BaseException:  # noqa: BLE001 - report every scenario, not only the first failure
            print(f"FAIL {scenario}\n{traceback.format_exc()}", flush=True)
        else:
            print(f"ok {scenario}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
