"""Dense streams: pixel maps, summaries, per-class tables, PCA and heatmaps equal plain numpy references."""

from __future__ import annotations

import json
import sys
import tracemalloc
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

import lossledger as ll
from lossledger import errors as E
from lossledger.heatmaps import pca_embedding, write_maps
from lossledger.pixels import (
    iter_pixel_action,
    mask_ignored,
    pixel_action,
    pixel_class_action,
    pixel_summary,
)

H, W = 6, 10


# --- references -----------------------------------------------------------------------------------------------
def ref_maps(values: np.ndarray, dts: np.ndarray) -> dict[str, np.ndarray]:
    """Plain numpy: values (T, k, *element) with NaN = not observed; dts (T,)."""
    v = values.astype(np.float64)
    n = (~np.isnan(v)).sum(0)
    weights = dts.reshape((-1,) + (1,) * (v.ndim - 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels
        out = {"action": np.nansum(v * weights, 0), "mean": np.nanmean(v, 0), "variance": np.nanvar(v, 0)}
    out = {name: np.where(n > 0, a, np.nan) for name, a in out.items()}
    out["n_obs"] = n
    return out


def build(tmp_path, *, n=12, ticks=5, dtype="float32", seed=0, name="p.ll", labels=None, shape=(H, W)):
    """A ledger whose run "r" has a pixel stream with void pixels, unlogged samples and a step count per tick.

    Returns (ledger, values (T, N, *shape) as stored, NaN where missing, dts per dt mode).
    """
    rng = np.random.default_rng(seed)
    ledger = ll.create(tmp_path / name, sample_ids=np.arange(n) * 10 + 3, labels=labels)
    values = rng.exponential(1.0, (ticks, n, *shape)).astype(np.float32)
    values[rng.random(values.shape) < 0.1] = np.nan  # void pixels
    values[:, :, 0, :2] = np.nan  # a corner never observed
    values[:, n - 1] = np.nan  # a sample never logged
    with ledger.run("r", allow_nonfinite=True, stream_dtypes={"pixel": dtype}) as run:
        for t in range(ticks):
            logged = np.flatnonzero(rng.random(n) < 0.8)
            logged = logged[logged != n - 1]
            missing = np.setdiff1d(np.arange(n), logged)
            values[t, missing] = np.nan
            for chunk in np.array_split(rng.permutation(logged), 3):
                if chunk.size:
                    run.log(chunk * 10 + 3, pixel=values[t, chunk], loss=np.nanmean(values[t, chunk], axis=(1, 2)))
            run.end_epoch(step=int(7 * (t + 1) + t * t))
    stored = values.astype(dtype).astype(np.float32)
    table = ledger.ticks("r")
    dts = {
        "epoch": np.ones(ticks),
        "step": np.diff(table["step"].to_numpy().astype(np.float64), prepend=0.0),
        "wall": np.diff(table["wall"].to_numpy(), prepend=0.0),
    }
    return ledger, stored, dts


def assert_maps(maps, ref, rtol=1e-6):
    for name in ("action", "mean", "variance"):
        np.testing.assert_allclose(getattr(maps, name), ref[name], rtol=rtol, atol=1e-6, equal_nan=True, err_msg=name)
        assert getattr(maps, name).dtype == np.float32
    np.testing.assert_array_equal(maps.n_obs, ref["n_obs"])


@pytest.fixture(params=["one-block", "many-blocks"])
def small_blocks(request, monkeypatch):
    """Run a test with the default budgets, and with tiny chunks and budgets (many blocks and tick slabs)."""
    if request.param == "many-blocks":
        monkeypatch.setattr("lossledger.format.CHUNK_TARGET_BYTES", 2 * H * W * 4)  # 2 samples per chunk
        monkeypatch.setattr("lossledger.pixels.PIXEL_BUDGET_BYTES", 5 * H * W * 64)  # 4-sample blocks, 2-tick slabs
    return request.param


# --- maps -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dt", ["epoch", "step", "wall"])
def test_pixel_action_equals_numpy(tmp_path, small_blocks, dt):
    ledger, values, dts = build(tmp_path)
    maps = pixel_action(ledger, "r", dt=dt)
    assert_maps(maps, ref_maps(values, dts[dt]))
    np.testing.assert_array_equal(maps.sample_id, ledger.sample_ids)
    assert np.isnan(maps.action[:, 0, :2]).all() and (maps.n_obs[:, 0, :2] == 0).all()  # never observed: NaN
    assert np.isnan(maps.action[-1]).all()  # a sample never logged
    # ids in any order, repeated; a window of ticks
    ids = [73, 3, 73, 53]
    rows = [7, 0, 7, 5]
    sub = pixel_action(ledger, "r", ids=ids, dt=dt, ticks=[4, 1, 2])
    assert_maps(sub, ref_maps(values[[1, 2, 4]][:, rows], dts[dt][[1, 2, 4]]))
    np.testing.assert_array_equal(sub.sample_id, ids)
    np.testing.assert_array_equal(sub.ticks, [1, 2, 4])
    blocks = list(iter_pixel_action(ledger, "r", dt=dt))
    assert (len(blocks) > 1) == (small_blocks == "many-blocks")
    np.testing.assert_array_equal(np.concatenate([b.sample_id for b in blocks]), ledger.sample_ids)
    np.testing.assert_array_equal(np.concatenate([b.action for b in blocks]), maps.action)


def test_float16_stream_and_empty_window(tmp_path):
    ledger, values, dts = build(tmp_path, dtype="float16")
    assert ledger.streams("r").to_pylist()[1]["dtype"] == "float16"
    assert_maps(pixel_action(ledger, "r"), ref_maps(values, dts["epoch"]))  # values rounded to float16 as stored
    empty = pixel_action(ledger, "r", ids=[3, 13], ticks=[])
    assert empty.action.shape == (2, H, W) and np.isnan(empty.action).all() and (empty.n_obs == 0).all()
    none = pixel_action(ledger, "r", ids=[])
    assert none.action.shape == (0, H, W)


def test_summary_equals_numpy_and_joins_scores(tmp_path, small_blocks):
    ledger, values, dts = build(tmp_path)
    table = pixel_summary(ledger, "r", threshold=1.2)
    ref = ref_maps(values, dts["epoch"])
    seen = ref["n_obs"] > 0
    n_valid = seen.sum(axis=(1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = {
            "action_mean": np.nanmean(ref["action"], axis=(1, 2)),
            "action_max": np.nanmax(ref["action"], axis=(1, 2)),
            "variance_mean": np.nanmean(ref["variance"], axis=(1, 2)),
            "frac_above": (seen & (ref["mean"] > 1.2)).sum(axis=(1, 2)) / n_valid,
        }
    assert table.column_names == ["sample_id", *expected, "n_valid_pixels"]
    for name, want in expected.items():
        np.testing.assert_allclose(table[name].to_numpy(), want, rtol=1e-9, equal_nan=True, err_msg=name)
    np.testing.assert_array_equal(table["n_valid_pixels"].to_numpy(), n_valid)
    assert n_valid[-1] == 0 and np.isnan(table["action_mean"][-1].as_py())  # never observed: NaN, not 0
    # the mean pixel action and variance are what ledger.scores reports for an element stream
    joined = ledger.scores("r", "pixel").join(table, "sample_id").sort_by("sample_id")
    np.testing.assert_allclose(joined["action"].to_numpy(), joined["action_mean"].to_numpy(), rtol=1e-9, equal_nan=True)
    np.testing.assert_allclose(joined["variance"].to_numpy(), joined["variance_mean"].to_numpy(), rtol=1e-9,
                               equal_nan=True)
    assert ledger.scores("r", "loss").join(table, "sample_id").num_rows == ledger.n_samples
    sub = pixel_summary(ledger, "r", ids=[53, 3, 53], threshold=1.2)
    assert sub["sample_id"].to_pylist() == [53, 3, 53]
    assert sub["action_mean"].to_pylist() == [table["action_mean"][i].as_py() for i in (5, 0, 5)]


# --- ignored pixels -------------------------------------------------------------------------------------------
def test_mask_ignored_numpy_and_torch():
    loss = np.array([[[0.5, 0.0], [1.5, 2.0]]], np.float64)
    target = np.array([[[1, 255], [0, 255]]])
    out = mask_ignored(loss, target, 255)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[[0.5, np.nan], [1.5, np.nan]]])
    assert loss[0, 1, 1] == 2.0  # input untouched
    torch = pytest.importorskip("torch")
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    y = torch.randint(0, 3, (2, 4, 5))
    y[:, 0] = 255
    per_pixel = torch.nn.functional.cross_entropy(logits, y, reduction="none", ignore_index=255)
    assert (per_pixel[:, 0] == 0).all()  # what the loss gives ignored pixels
    masked = mask_ignored(per_pixel, y, ignore_index=255)
    assert np.isnan(masked[:, 0]).all() and np.isfinite(masked[:, 1:]).all()
    np.testing.assert_array_equal(masked[:, 1:], per_pixel.detach().numpy()[:, 1:])
    with pytest.raises(E.ShapeMismatchError, match="label map"):
        mask_ignored(np.zeros((2, 4, 5)), np.zeros((2, 4, 4), int))


def test_ignored_pixels_are_stored_as_nan_and_excluded(tmp_path):
    rng = np.random.default_rng(3)
    ledger = ll.create(tmp_path / "i.ll", n_samples=4)
    target = rng.integers(0, 3, (4, H, W))
    target[:, :, :3] = 255  # ignore border
    loss = np.where(target == 255, 0.0, rng.exponential(1.0, (4, H, W))).astype(np.float32)  # 0 at ignored pixels
    with ledger.run("r", allow_nonfinite=True) as run:
        for _ in range(3):
            run.log(np.arange(4), pixel=mask_ignored(loss, target, 255))
            run.end_epoch()
    stored = ledger.trajectories("r", "pixel")
    assert np.isnan(stored[:, :, :, :3]).all() and np.isfinite(stored[:, :, :, 3:]).all()
    maps = pixel_action(ledger, "r")
    assert np.isnan(maps.action[:, :, :3]).all() and (maps.n_obs[:, :, :3] == 0).all()
    np.testing.assert_allclose(maps.action[:, :, 3:], 3 * loss[:, :, 3:], rtol=1e-6)
    summary = pixel_summary(ledger, "r")
    assert summary["n_valid_pixels"].to_pylist() == [H * (W - 3)] * 4
    np.testing.assert_allclose(summary["action_mean"].to_numpy(), 3 * loss[:, :, 3:].mean(axis=(1, 2)), rtol=1e-6)


# --- classes --------------------------------------------------------------------------------------------------
def ref_classes(action: np.ndarray, variance: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, list]:
    ok = ~np.isnan(action) & (labels >= 0) & (labels != 255)
    out: dict[str, list] = {k: [] for k in ("n_pixels", "n_samples", "action_mean", "action_std", "action_max",
                                            "variance_mean", "action_share")}
    total = action[ok].sum()
    for c in range(n_classes):
        sel = ok & (labels == c)
        a = action[sel]
        out["n_pixels"].append(int(sel.sum()))
        out["n_samples"].append(int(sel.any(axis=(1, 2)).sum()))
        for key, f in (("action_mean", np.mean), ("action_std", np.std), ("action_max", np.max)):
            out[key].append(float(f(a)) if a.size else np.nan)
        out["variance_mean"].append(float(variance[sel].mean()) if a.size else np.nan)
        out["action_share"].append(float(a.sum() / total) if a.size else np.nan)
    return out


def test_class_table_equals_numpy(tmp_path, small_blocks):
    ledger, values, dts = build(tmp_path)
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, (ledger.n_samples, H, W))  # class 3 of 4 never occurs
    labels[:, -1] = 255
    ref = ref_maps(values, dts["epoch"])
    table = pixel_class_action(ledger, "r", labels=labels, classes=["road", "sidewalk", "person", "car"])
    assert table.column_names == ["class", "name", "n_pixels", "n_samples", "action_mean", "action_std",
                                  "action_max", "variance_mean", "action_share"]
    assert table["name"].to_pylist() == ["road", "sidewalk", "person", "car"]
    want = ref_classes(ref["action"], ref["variance"], labels, 4)
    for key, expected in want.items():
        np.testing.assert_allclose(table[key].to_numpy(), expected, rtol=1e-9, equal_nan=True, err_msg=key)
    assert table["n_pixels"][3].as_py() == 0 and np.isnan(table["action_mean"][3].as_py())
    # a subset of samples; classes without names: only those present
    sub = pixel_class_action(ledger, "r", labels=labels, ids=[13, 53])
    want = ref_classes(ref["action"][[1, 5]], ref["variance"][[1, 5]], labels[[1, 5]], 3)
    assert sub.column_names[:2] == ["class", "n_pixels"] and sub["class"].to_pylist() == [0, 1, 2]
    np.testing.assert_allclose(sub["action_mean"].to_numpy(), want["action_mean"], rtol=1e-9)
    with pytest.raises(E.ShapeMismatchError, match="classes"):
        pixel_class_action(ledger, "r", labels=labels, classes=["road", "sidewalk"])
    with pytest.raises(E.ShapeMismatchError, match="ledger row order"):
        pixel_class_action(ledger, "r", labels=labels[:3])


def test_class_table_from_a_label_stream(tmp_path):
    rng = np.random.default_rng(2)
    n = 6
    ledger = ll.create(tmp_path / "s.ll", n_samples=n)
    labels = rng.integers(0, 3, (n, H, W)).astype(np.float32)
    labels[:, 0] = np.nan  # void
    loss = rng.exponential(1.0, (2, n, H, W)).astype(np.float32)
    with ledger.run("r", allow_nonfinite=True) as run:
        run.log(np.arange(n), pixel=loss[0], label=np.zeros((n, H, W)))  # an outdated label, replaced next tick
        run.end_epoch()
        run.log(np.arange(n), pixel=loss[1])
        run.log(np.arange(n), label=labels)
        run.end_epoch()
    table = pixel_class_action(ledger, "r", labels="label")
    action = loss.astype(np.float64).sum(0)
    want = ref_classes(action, loss.astype(np.float64).var(0), np.nan_to_num(labels, nan=-1).astype(int), 3)
    np.testing.assert_allclose(table["action_mean"].to_numpy(), want["action_mean"], rtol=1e-9)
    assert table["n_pixels"].to_pylist() == want["n_pixels"]


# --- PCA ------------------------------------------------------------------------------------------------------
def ref_pca(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean-imputed PCA by SVD; rows without any feature are NaN. Returns scores (N, k), variance ratio (k,)."""
    fit = ~np.isnan(features).all(axis=1)
    x = features[fit]
    mean = np.nanmean(x, axis=0)
    centered = np.where(np.isnan(x), 0.0, x - mean)
    _, s, vt = np.linalg.svd(centered, full_matrices=False)
    scores = np.full((features.shape[0], k), np.nan)
    scores[fit] = centered @ vt[:k].T
    return scores, (s**2 / (s**2).sum())[:k]


def assert_same_up_to_sign(got: np.ndarray, want: np.ndarray):
    for j in range(want.shape[1]):
        ok = ~np.isnan(want[:, j])
        np.testing.assert_array_equal(np.isnan(got[:, j]), ~ok)
        sign = np.sign(got[ok, j] @ want[ok, j])
        np.testing.assert_allclose(sign * got[ok, j], want[ok, j], rtol=1e-4, atol=1e-4 * np.nanmax(np.abs(want)))


@pytest.mark.parametrize("of", ["map", "curve"])
def test_pca_equals_numpy(tmp_path, small_blocks, of):
    ledger, values, dts = build(tmp_path, n=30, ticks=6)
    table = pca_embedding(ledger, "r", n_components=3, of=of, grid=(3, 5))
    if of == "map":
        action = ref_maps(values, dts["epoch"])["action"]
        cells = action.reshape(30, 3, 2, 5, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            features = np.nanmean(cells, axis=(2, 4)).reshape(30, -1)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            features = np.nanmean(values.astype(np.float64), axis=(2, 3)).T
    want, ratio = ref_pca(features.astype(np.float32).astype(np.float64), 3)
    assert table.column_names == ["sample_id", "pc1", "pc2", "pc3"]
    got = np.stack([table[f"pc{j}"].to_numpy() for j in (1, 2, 3)], axis=1)
    assert_same_up_to_sign(got, want)
    meta = json.loads(table.schema.metadata[b"lossledger"])
    np.testing.assert_allclose(meta["explained_variance_ratio"], ratio, rtol=1e-4)
    assert meta["n_fit"] == 29 and meta["of"] == of  # the never-logged sample is left out (NaN row)


def test_pca_of_scalar_curves_through_a_file(tmp_path, monkeypatch):
    monkeypatch.setattr("lossledger.pixels.PIXEL_BUDGET_BYTES", 256)  # features go to a temporary .npy memmap
    ledger, _, _ = build(tmp_path, n=40, ticks=6)
    curves = ledger.trajectories("r", "loss")  # (N, T) float32, NaN where not logged
    table = pca_embedding(ledger, "r", "loss", of="curve", n_components=2)
    want, _ = ref_pca(curves.astype(np.float64), 2)
    assert_same_up_to_sign(np.stack([table["pc1"].to_numpy(), table["pc2"].to_numpy()], 1), want)
    with pytest.raises(E.ShapeMismatchError, match="of='curve'"):
        pca_embedding(ledger, "r", "loss", of="map")
    with pytest.raises(E.ShapeMismatchError, match="grid"):
        pca_embedding(ledger, "r", grid=(H + 1, 2))


# --- heatmaps -------------------------------------------------------------------------------------------------
def test_write_maps(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    ledger, _, _ = build(tmp_path, labels=np.arange(12) % 2)
    rng = np.random.default_rng(1)
    images = rng.random((12, H, W, 3))
    labels = rng.integers(0, 4, (12, H, W))
    out = tmp_path / "maps"
    table = write_maps(ledger, "r", out, top=3, images=images, labels=labels, prediction=labels[::-1].copy())
    top = ledger.top(3, "r", "pixel")
    assert table["sample_id"].to_pylist() == top["sample_id"].to_pylist()
    assert table["action"].to_pylist() == top["action"].to_pylist()
    maps = pixel_action(ledger, "r", ids=table["sample_id"].to_pylist())
    for j, row in enumerate(table.to_pylist()):
        np.testing.assert_array_equal(np.load(row["action_npy"]), maps.action[j])
        np.testing.assert_array_equal(np.load(row["variance_npy"]), maps.variance[j])
        assert row["png"].endswith(f"{j + 1:02d}_sample{row['sample_id']}.png")
        png = matplotlib.image.imread(row["png"])
        assert png.ndim == 3 and png.shape[1] > 3 * png.shape[0] * W / H / 2  # panels side by side
    grid = matplotlib.image.imread(out / "top.png")
    assert grid.shape[0] > 2 * png.shape[0] * 0.8  # three rows
    assert pacsv.read_csv(out / "maps.csv")["sample_id"].to_pylist() == table["sample_id"].to_pylist()
    assert not list(out.glob("*.partial"))
    # chosen ids, npy only
    plain = write_maps(ledger, "r", tmp_path / "plain", ids=[23, 3], png=False)
    assert plain["png"].null_count == 2 and plain["rank"].to_pylist() == [1, 2]
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == [
        "maps.csv", "sample23_action.npy", "sample23_variance.npy", "sample3_action.npy", "sample3_variance.npy"]
    with pytest.raises(E.OutputPathError, match="is a file"):
        write_maps(ledger, "r", out / "maps.csv")
    with pytest.raises(E.OutputPathError, match="does not exist"):
        write_maps(ledger, "r", tmp_path / "no" / "such")


def test_write_maps_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    ledger, _, _ = build(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ImportError, match=r"lossledger\[report\]"):
        write_maps(ledger, "r", tmp_path / "maps")
    assert write_maps(ledger, "r", tmp_path / "npy", png=False).num_rows == 10


# --- errors and memory ----------------------------------------------------------------------------------------
def test_errors(tmp_path):
    ledger, _, _ = build(tmp_path)
    with pytest.raises(E.ShapeMismatchError, match="ledger.scores"):
        pixel_action(ledger, "r", "loss")
    with pytest.raises(E.UnknownStreamError, match="streams are"):
        pixel_summary(ledger, "r", "pixels")
    with pytest.raises(E.UnknownRunError):
        pixel_action(ledger, "nope")
    with pytest.raises(E.UnknownSampleError):
        pixel_action(ledger, "r", ids=[4])
    with pytest.raises(E.ShapeMismatchError, match="dt must be"):
        pixel_action(ledger, "r", dt="epochs")
    with pytest.raises(E.ShapeMismatchError, match="n_components"):
        pca_embedding(ledger, "r", n_components=0)


def test_summary_memory_is_one_block(tmp_path, monkeypatch):
    """The traced peak of a summary over all samples is one block's, the same at N and 4 N samples, and far
    below the (N, H, W) maps it streams over."""
    monkeypatch.setattr("lossledger.format.CHUNK_TARGET_BYTES", 4 * 32 * 32 * 4)  # four samples per chunk
    peaks = {}
    for n in (128, 1024):
        ledger = ll.create(tmp_path / f"m{n}.ll", n_samples=n)
        rng = np.random.default_rng(0)
        with ledger.run("r") as run:
            for _ in range(6):
                run.log(np.arange(n), pixel=rng.exponential(1.0, (n, 32, 32)).astype(np.float32))
                run.end_epoch()
        monkeypatch.setattr("lossledger.pixels.PIXEL_BUDGET_BYTES", 8 * 32 * 32 * 64)  # 8-sample blocks
        pixel_summary(ledger, "r")  # warm up imports and caches
        tracemalloc.start()
        table = pixel_summary(ledger, "r")
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert table.num_rows == n
    all_maps = 1024 * 32 * 32 * 8  # one float64 map per sample: 8.4 MB; the stream itself is 25 MB
    assert peaks[1024] < all_maps / 2, peaks
    assert peaks[1024] < 1.3 * peaks[128], peaks


# --- a real segmentation run ----------------------------------------------------------------------------------
def test_unet_on_shapes_hard_pixels_are_at_boundaries(tmp_path):
    """A small U-Net learns circles and squares; the per-pixel action is highest in a band around the edges."""
    torch = pytest.importorskip("torch")
    ndimage = pytest.importorskip("scipy.ndimage")
    import torch.nn.functional as F
    from torch import nn

    n, size, batch, ignore = 96, 32, 16, 255
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    images, targets = [], []
    for _ in range(n):
        y = np.zeros((size, size), np.int64)
        for _ in range(rng.integers(1, 3)):
            kind, r = rng.integers(1, 3), rng.integers(5, 10)
            cy, cx = rng.integers(r + 2, size - r - 2, 2)
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r if kind == 1 else (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
            y[inside] = kind
        image = ndimage.gaussian_filter(np.array([0.0, 1.0, -1.0])[y], 1.0) + rng.normal(0, 0.5, y.shape)
        y[:2], y[-2:], y[:, :2], y[:, -2:] = ignore, ignore, ignore, ignore  # ignore border
        images.append(image.astype(np.float32))
        targets.append(y)
    x_all, y_all = torch.from_numpy(np.stack(images)[:, None]), torch.from_numpy(np.stack(targets))

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
            self.mid = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
            self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
            self.dec = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))

        def forward(self, x):
            a = self.enc(x)
            return self.dec(torch.cat([a, self.up(self.mid(F.max_pool2d(a, 2)))], 1))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads only contend on a shared machine
    try:
        torch.manual_seed(0)
        model = UNet()
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        ledger = ll.create(tmp_path / "unet.ll", n_samples=n)
        logged = np.full((12, n, size, size), np.nan, np.float32)
        with ledger.run("unet", allow_nonfinite=True, model="unet") as run:
            for epoch in range(12):
                for ids in torch.randperm(n).split(batch):
                    target = y_all[ids]
                    loss = F.cross_entropy(model(x_all[ids]), target, reduction="none", ignore_index=ignore)
                    maps = mask_ignored(loss, target, ignore)
                    run.log(ids, pixel=maps)
                    logged[epoch, ids.numpy()] = maps
                    (loss.sum() / (target != ignore).sum()).backward()
                    opt.step()
                    opt.zero_grad()
                run.end_epoch()
    finally:
        torch.set_num_threads(threads)

    result = pixel_action(ledger, "unet")
    assert_maps(result, ref_maps(logged, np.ones(12)))
    y = np.stack(targets)
    border = y == ignore
    assert np.isnan(result.action[border]).all() and np.isfinite(result.action[~border]).all()
    edges = np.zeros_like(border)
    for i in range(n):
        labels = np.where(border[i], 0, y[i])
        boundary = ndimage.grey_dilation(labels, size=3) != ndimage.grey_erosion(labels, size=3)
        edges[i] = ndimage.binary_dilation(boundary)
    band = result.action[edges & ~border].mean()
    interior = result.action[~edges & ~border & (y > 0)].mean()
    background = result.action[~edges & ~border & (y == 0)].mean()
    assert band > 1.2 * interior and band > 2 * background, (band, interior, background)
    # the samples with the most boundary are the hardest
    summary = pixel_summary(ledger, "unet")
    edge_share = (edges & ~border).sum(axis=(1, 2)) / (~border).sum(axis=(1, 2))
    corr = np.corrcoef(edge_share, summary["action_mean"].to_numpy())[0, 1]
    assert corr > 0.5, corr
    per_class = pixel_class_action(ledger, "unet", labels=y, classes=["background", "circle", "square"])
    assert per_class["n_pixels"].to_pylist() == [int(((y == c)).sum()) for c in range(3)]
    assert per_class["action_mean"][0].as_py() < min(per_class["action_mean"][1].as_py(),
                                                     per_class["action_mean"][2].as_py())
    embedding = pca_embedding(ledger, "unet", n_components=2)
    assert embedding.num_rows == n and not np.isnan(embedding["pc1"].to_numpy()).any()
    assert isinstance(embedding, pa.Table)
