"""JAX adapter: real jitted training on sklearn digits, on 4 CPU devices (sharded and pmapped batches).

XLA reads the device count once per process, so the scenarios run in a child process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``: ``python tests/adapters/test_jax.py <dir>`` runs every
scenario and prints ``ok <scenario>`` or ``FAIL <scenario>`` with its traceback.
Every stored loss is compared with a numpy reference computed from a host snapshot of the parameters taken
before each step, keyed by sample id (ids are shuffled, so a wrong id mapping fails).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

SCENARIOS = ["sharded", "replicated", "pmap", "non_blocking", "bfloat16_and_errors"]
N_DEVICES = 4
BATCH = 128  # fixed batch shape: the last batch is padded, its padding flagged with valid=False


@pytest.fixture(scope="module")
def child_output(tmp_path_factory) -> str:
    """Output of one child process that runs every scenario (jax starts once)."""
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (pip install 'lossledger[jax]')")
    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("scikit-learn is not installed (pip install 'lossledger[test]')")
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={N_DEVICES}", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path_factory.mktemp("jax"))], env=env, capture_output=True, text=True,
        timeout=600, check=False,
    )
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_jax_adapter(child_output: str, scenario: str) -> None:
    assert f"ok {scenario}\n" in child_output, f"scenario {scenario!r}:\n{child_output}"


# --- the child process --------------------------------------------------------------------------------------


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    ids = 5000 + np.random.default_rng(0).permutation(len(y))  # ledger ids unrelated to the row order
    return (x / 16.0).astype(np.float32), y.astype(np.int32), ids.astype(np.int64)


def _numpy_losses(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Reference per-sample cross-entropy of the MLP, in float64 numpy."""
    h = np.maximum(x @ params["w1"].astype(np.float64) + params["b1"], 0.0)
    logits = h @ params["w2"].astype(np.float64) + params["b2"]
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y]


def _model():
    import jax
    import jax.numpy as jnp

    def init(key):
        k1, k2 = jax.random.split(key)
        return {
            "w1": jax.random.normal(k1, (64, 32)) * 0.1, "b1": jnp.zeros(32),
            "w2": jax.random.normal(k2, (32, 10)) * 0.1, "b2": jnp.zeros(10),
        }

    def losses(params, x, y):
        h = jax.nn.relu(x @ params["w1"] + params["b1"])
        logp = jax.nn.log_softmax(h @ params["w2"] + params["b2"])
        return -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]

    return init, losses


def _batches(n: int, epoch: int):
    """Fixed-size batches of row indices, the last padded with row 0; (rows, valid)."""
    order = np.random.default_rng(100 + epoch).permutation(n)
    for lo in range(0, n, BATCH):
        rows = order[lo : lo + BATCH]
        valid = np.ones(BATCH, dtype=bool)
        valid[len(rows) :] = False
        yield np.concatenate([rows, np.zeros(BATCH - len(rows), dtype=rows.dtype)]), valid


def _ledger(root: Path, ids: np.ndarray, y: np.ndarray):
    import lossledger as ll

    extra = np.array([1, 2, 3])  # ids in the ledger that no step logs: must stay NaN (no padded rows stored)
    return ll.create(root / "jax.ll", sample_ids=np.concatenate([ids, extra]), labels=np.concatenate([y, [0, 0, 0]]))


def _check(ledger, run_name: str, ids: np.ndarray, reference: list[dict[int, float]], rtol: float = 2e-5) -> None:
    ticks = ledger.ticks(run_name)
    assert ticks.num_rows == len(reference), (ticks.num_rows, len(reference))
    stored = ledger.trajectories(run_name, "loss", ids=ids)
    assert stored.dtype == np.float32
    for t, ref in enumerate(reference):
        expected = np.array([ref[int(i)] for i in ids])
        np.testing.assert_allclose(stored[:, t], expected, rtol=rtol, atol=1e-6)
    assert np.isnan(ledger.trajectories(run_name, "loss", ids=[1, 2, 3])).all(), "padding rows were stored"
    steps_per_epoch = -(-len(ids) // BATCH)
    assert ticks.column("step").to_pylist() == [steps_per_epoch * (t + 1) for t in range(len(reference))]


def _train(root: Path, mode: str) -> None:
    """Train 3 epochs with SGD; mode "sharded" (batch split over a mesh), "replicated" (per-sample losses and
    ids all-gathered in the step, the multi-host pattern) or "pmap"."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from lossledger.adapters.jax import value_and_grad

    assert jax.device_count() == N_DEVICES, jax.devices()
    x, y, ids = _digits()
    init, losses_fn = _model()
    params = init(jax.random.key(0))

    def masked_loss(params, x, y, valid):
        return jnp.where(valid, losses_fn(params, x, y), 0.0)

    def masked_mean(losses):  # padded rows contribute 0; divide by the real batch size is folded into lr
        return losses.sum() / BATCH

    grad_fn = value_and_grad(masked_loss, reduce=masked_mean)

    def sgd(params, grads):
        return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)

    if mode == "pmap":
        def pstep(params, x, y, valid):
            (_, losses), grads = grad_fn(params, x, y, valid)
            return sgd(params, jax.lax.psum(grads, "d")), losses

        step = jax.pmap(pstep, axis_name="d")
        params = jax.tree.map(lambda a: jnp.stack([a] * N_DEVICES), params)  # one copy per device
    else:
        mesh = jax.make_mesh((N_DEVICES,), ("data",))
        data, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        out_losses = repl if mode == "replicated" else data

        def jstep(params, x, y, valid, batch_ids):
            (_, losses), grads = grad_fn(params, x, y, valid)
            return sgd(params, grads), losses, batch_ids

        step = jax.jit(jstep, out_shardings=(repl, out_losses, out_losses))
        params = jax.device_put(params, repl)

    from lossledger.adapters.jax import Recorder

    ledger = _ledger(root, ids, y)
    reference: list[dict[int, float]] = []
    with ledger.run(mode) as run:
        rec = Recorder(run, max_pending=4)
        for epoch in range(3):
            ref: dict[int, float] = {}
            for rows, valid in _batches(len(y), epoch):
                host = jax.tree.map(lambda a: np.asarray(a[0] if mode == "pmap" else a), params)
                for i, v in zip(ids[rows][valid], _numpy_losses(host, x[rows][valid], y[rows][valid])):
                    ref[int(i)] = float(v)
                batch_ids = np.where(valid, ids[rows], -1)  # padding ids are not in the ledger: dropped by valid
                if mode == "pmap":
                    shape = (N_DEVICES, BATCH // N_DEVICES)
                    params, losses = step(params, x[rows].reshape(*shape, 64), y[rows].reshape(shape),
                                          valid.reshape(shape))
                    rec.log(batch_ids.reshape(shape), loss=losses, valid=valid.reshape(shape))
                else:
                    args = [jax.device_put(a, data) for a in (x[rows], y[rows], valid, batch_ids)]
                    params, losses, out_ids = step(params, *args)
                    assert losses.sharding.is_fully_replicated == (mode == "replicated")
                    rec.log(out_ids, loss=losses, valid=valid)
            assert rec.end_epoch() == epoch
            assert rec.pending == 0
            reference.append(ref)
    _check(ledger, mode, ids, reference)


def _non_blocking(root: Path) -> None:
    """log() returns while the step that produces the losses is still running; entries drain lazily."""
    import jax
    import jax.numpy as jnp
    from lossledger.adapters.jax import Recorder

    ledger = _ledger(root, np.arange(10, 74), np.zeros(64, dtype=np.int32))

    @jax.jit
    def slow_losses(m, seed):
        def body(_, a):
            return jnp.tanh(a @ m) / 10
        a = jax.lax.fori_loop(0, 40, body, m + seed)
        return a[:64, 0] ** 2  # 64 per-sample "losses" that depend on the whole slow loop

    m = jax.random.normal(jax.random.key(1), (600, 600)) / 30
    warm = slow_losses(m, 0.0)  # compile the step and the slices outside the timed part
    warm[:32].block_until_ready(), warm[32:].block_until_ready()
    with ledger.run("nb") as run:
        rec = Recorder(run, max_pending=8)
        t0 = time.perf_counter()
        first = slow_losses(m, 0.0)
        head = first[:32]
        t1 = time.perf_counter()
        rec.log(np.arange(10, 42), loss=head)
        returned_after = time.perf_counter() - t1
        in_flight = not head.is_ready()
        head.block_until_ready()
        compute_time = time.perf_counter() - t0
        assert in_flight, f"the step had finished before log() returned ({returned_after:.3f} s of {compute_time:.3f} s)"
        assert rec.pending == 1
        second = slow_losses(m, 1.0)
        rec.log(np.arange(42, 74), loss=second[32:])  # the first entry is ready now: drained, the second is not
        assert rec.pending == 1, rec.pending
        assert rec.end_epoch() == 0 and rec.pending == 0
    stored = ledger.trajectories("nb", "loss", ids=np.arange(10, 74))[:, 0]
    np.testing.assert_allclose(stored, np.concatenate([np.asarray(first)[:32], np.asarray(second)[32:]]), rtol=1e-6)
    print(f"log() returned after {returned_after * 1e3:.1f} ms; the step took {compute_time * 1e3:.0f} ms")


def _bfloat16_and_errors(root: Path) -> None:
    import jax.numpy as jnp
    from lossledger.adapters.jax import Recorder

    import lossledger as ll

    ledger = _ledger(root, np.arange(10, 20), np.zeros(10, dtype=np.int32))
    with ledger.run("bf16") as run:
        rec = Recorder(run, max_pending=1)
        values = jnp.linspace(0.1, 2.0, 10, dtype=jnp.bfloat16)
        rec.log(jnp.arange(10, 20), loss=values, pixel=jnp.ones((10, 2, 2), jnp.bfloat16))
        try:
            rec.log(np.arange(10, 20), loss=jnp.ones(9))
        except ll.errors.ShapeMismatchError as err:
            assert "one value per id" in str(err)
        else:
            raise AssertionError("a stream of the wrong length was accepted")
        try:
            rec.log(np.arange(10, 20), loss=jnp.ones(10), valid=np.ones(3, bool))
        except ll.errors.ShapeMismatchError as err:
            assert "one flag per id" in str(err)
        else:
            raise AssertionError("a valid mask of the wrong length was accepted")
        try:
            Recorder(run, max_pending=0)
        except ll.errors.ShapeMismatchError as err:
            assert "at least 1" in str(err)
        else:
            raise AssertionError("max_pending=0 was accepted")
        assert rec.pending <= 1  # the refused calls queued nothing
        rec.end_epoch()
        # NaN from the device is caught by the run when the entry is drained (at the latest at end_epoch).
        try:
            rec.log(np.arange(10, 20), loss=jnp.full(10, jnp.nan))
            rec.end_epoch()
        except ll.errors.NonFiniteValueError:
            pass
        else:
            raise AssertionError("NaN losses were stored")
        rec.log(np.arange(10, 20), loss=jnp.ones(10))
        rec.end_epoch()
    streams = ledger.streams("bf16").to_pydict()
    assert streams["dtype"] == ["float32", "float32"], streams
    stored = ledger.trajectories("bf16", "loss", ids=np.arange(10, 20))
    np.testing.assert_array_equal(stored[:, 0], np.asarray(values).astype(np.float32))
    np.testing.assert_array_equal(stored[:, 1], np.ones(10, np.float32))
    assert ledger.trajectories("bf16", "pixel").shape == (13, 2, 2, 2)


def main(root: str) -> None:
    import warnings

    from lossledger.errors import LedgerWarning

    warnings.simplefilter("error", LedgerWarning)
    for scenario in SCENARIOS:
        path = Path(root) / scenario
        path.mkdir()
        try:
            if scenario == "non_blocking":
                _non_blocking(path)
            elif scenario == "bfloat16_and_errors":
                _bfloat16_and_errors(path)
            else:
                _train(path, scenario)
        except BaseException:  # noqa: BLE001 - report every scenario, not only the first failure
            print(f"FAIL {scenario}\n{traceback.format_exc()}", flush=True)
        else:
            print(f"ok {scenario}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
