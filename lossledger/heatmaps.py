"""Views of pixel action maps: heatmap files (PNG panels like Fig 11, and .npy) and PCA embeddings.

Arriaga, Palacio & Valdenegro-Toro, "Difficulty Estimation with Action Scores for Computer Vision Tasks",
Fig 11: for the hardest Cityscapes images, the input, the label mask, the predicted mask and the per-pixel
action; its supplementary material reduces the per-pixel maps with PCA. matplotlib (the ``[report]`` extra)
is imported only when PNGs are drawn; ``.npy`` maps and embeddings need numpy only.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from . import pixels
from ._arrays import as_ids, to_numpy
from .errors import MissingDependencyError, OutputPathError, ShapeMismatchError
from .pixels import PixelMaps, _labels_source, _moments, _slabs, _source, pixel_action
from .scores import Dt

if TYPE_CHECKING:
    from .ledger import Ledger

__all__ = ["pca_embedding", "write_maps"]

#: Largest number of PCA features (the covariance matrix holds features² float64 values).
_MAX_PCA_FEATURES = 8192
#: Colour of pixels with no value: void / ignored labels, never-observed pixels of the action map.
_VOID = (0.55, 0.55, 0.55, 1.0)


def write_maps(
    ledger: Ledger,
    run: str,
    out_dir: str | os.PathLike[str],
    *,
    stream: str = "pixel",
    top: int = 10,
    ids: Any = None,
    by: str = "action",
    hardest: bool = True,
    dt: Dt = "epoch",
    ticks: Any = None,
    images: Any = None,
    labels: str | Any = None,
    prediction: str | Any = None,
    ignore_index: int = 255,
    classes: list[str] | tuple[str, ...] | None = None,
    png: bool = True,
    npy: bool = True,
) -> pa.Table:
    """Write the pixel maps of the ``top`` hardest samples (or of ``ids``) to ``out_dir``, and an index.

    Samples: ``ids`` in that order, else the ``top`` samples of ``ledger.top(top, run, stream, by=by,
    hardest=hardest, dt=dt, ticks=ticks)`` (``by="action"`` ranks by the mean pixel action). For the sample of
    rank r and id i it writes

    - ``{r:02d}_sample{i}.png``: side-by-side panels, as available: input image, label mask, predicted mask,
      action map (one colour scale shared by all samples, with a colour bar), and the action over the input;
      void pixels (NaN, ``ignore_index``, never observed) in grey;
    - ``sample{i}_action.npy``, ``sample{i}_variance.npy``: the (H, W) float32 maps of :func:`pixel_action`;

    plus ``top.png`` (all samples, one row each, like Fig 11) and ``maps.csv`` (the returned table).

    ``images``: (N, H, W) or (N, H, W, 3|4) array in ledger row order (row i is ``ledger.sample_ids[i]``);
    ``labels`` / ``prediction``: the name of a stream of ``run`` holding class indices (each sample's mask as
    logged at the last tick that logged it; NaN = void), or an (N, H, W) integer array in ledger row order. Arrays may be memmaps:
    only the drawn rows are read. ``classes``: names of the label classes (sets the colour scale).
    ``png=False`` writes the ``.npy`` maps only, without matplotlib.

    ``out_dir`` is created if missing (its parent must exist); files are written to a temp name and renamed.
    Returns a table: ``rank``, ``sample_id``, the ``by`` score, ``png``, ``action_npy``,
    ``variance_npy`` (paths as strings; null when not written). Memory: the maps of the drawn samples.

    >>> write_maps(ledger, "unet", "maps/", top=10, images=val_images, labels="label")
    """
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise ShapeMismatchError(f"top must be a positive integer, got {top!r}")
    plt = _matplotlib() if png else None
    out = _out_dir(out_dir)
    if ids is None:
        ranked = ledger.top(top, run, stream, by=by, dt=dt, hardest=hardest, ticks=ticks)
        sample_ids = ranked["sample_id"].to_numpy()
        score = ranked[by].to_numpy()
    else:
        sample_ids = as_ids(ids)
        scores = ledger.scores(run, stream, dt=dt, ticks=ticks)
        score = scores[by].to_numpy()[ledger._index.rows(sample_ids)] if by in scores.column_names else None
        if score is None:
            raise ShapeMismatchError(f"cannot report by {by!r}; choose a column of ledger.scores: {scores.column_names}")
    maps = pixel_action(ledger, run, stream, ids=sample_ids, dt=dt, ticks=ticks)
    if len(maps) and maps.action.ndim != 3:
        raise ShapeMismatchError(f"stream {stream!r} has element shape {maps.action.shape[1:]}; maps need (H, W)")
    rows = ledger._index.rows(sample_ids)
    panels = {
        "input": _rows_of(ledger, run, images, maps, rows, "images", image=True),
        "label": _rows_of(ledger, run, labels, maps, rows, "labels"),
        "prediction": _rows_of(ledger, run, prediction, maps, rows, "prediction"),
    }
    records: dict[str, list[Any]] = {k: [] for k in ("rank", "sample_id", by, "png", "action_npy", "variance_npy")}
    finite = maps.action[np.isfinite(maps.action)]
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    n_classes = _n_classes(classes, panels)
    for j, sample_id in enumerate(maps.sample_id.tolist()):
        rank = j + 1
        action_npy = variance_npy = png_path = None
        if npy:
            action_npy = _atomic(out / f"sample{sample_id}_action.npy", partial(_save, array=maps.action[j]))
            variance_npy = _atomic(out / f"sample{sample_id}_variance.npy", partial(_save, array=maps.variance[j]))
        if plt is not None:
            fig = _figure(plt, [_row(panels, maps, j, ignore_index)], vmax, n_classes,
                          [f"sample {sample_id} (rank {rank})"])
            png_path = _atomic(out / f"{rank:02d}_sample{sample_id}.png", partial(_savefig, fig=fig))
        for key, value in (("rank", rank), ("sample_id", sample_id), (by, float(score[j])), ("png", png_path),
                           ("action_npy", action_npy), ("variance_npy", variance_npy)):
            records[key].append(value)
    if plt is not None and len(maps):
        rows_drawn = [_row(panels, maps, j, ignore_index) for j in range(len(maps))]
        titles = [f"sample {i} (rank {r + 1})" for r, i in enumerate(maps.sample_id.tolist())]
        _atomic(out / "top.png", partial(_savefig, fig=_figure(plt, rows_drawn, vmax, n_classes, titles)))
    table = pa.table({
        "rank": pa.array(records["rank"], pa.int64()),
        "sample_id": pa.array(records["sample_id"], pa.int64()),
        by: pa.array(records[by], pa.float64()),
        "png": pa.array(records["png"], pa.string()),
        "action_npy": pa.array(records["action_npy"], pa.string()),
        "variance_npy": pa.array(records["variance_npy"], pa.string()),
    })
    _atomic(out / "maps.csv", lambda p: pacsv.write_csv(table, p))
    return table


def pca_embedding(
    ledger: Ledger,
    run: str,
    stream: str = "pixel",
    *,
    n_components: int = 2,
    of: Literal["map", "curve"] = "map",
    grid: tuple[int, int] | None = None,
    max_features: int = 1024,
    dt: Dt = "epoch",
    ticks: Any = None,
) -> pa.Table:
    """PCA of per-sample action maps (``of="map"``) or loss curves (``of="curve"``), one row per sample.

    Features: ``"map"``, the sample's pixel action map averaged over the cells of a ``grid`` (default: the
    finest grid with the map's aspect and at most ``max_features`` cells; cells with no observed pixel are
    missing); ``"curve"``, the loss at each scanned tick (scalar streams) or its mean over the observed pixels
    (dense streams; ``dt`` is then unused). Missing features are replaced by the feature's mean (mean
    imputation); samples with no observed feature are left out of the fit.

    Returns ``sample_id``, ``pc1`` ... ``pc{n_components}`` (float64, NaN for samples left out), in ledger row
    order. Each component's sign makes its largest loading positive. Schema metadata ``lossledger`` (JSON):
    ``explained_variance``, ``explained_variance_ratio``, ``n_fit``, ``n_features``, ``of``, ``grid``.

    Out of core: one pass over the ledger writes the (N, features) float32 matrix to a temporary file (RAM if
    under 64 MB), then its exact covariance is accumulated block by block (numpy, float64) and diagonalised.
    Memory: one block, plus features² x 8 B for the covariance (8 MB at 1024 features).

    >>> emb = pca_embedding(ledger, "unet", n_components=2)
    >>> ledger.scores("unet", "pixel").join(emb, "sample_id")
    """
    if not isinstance(n_components, int) or isinstance(n_components, bool) or n_components < 1:
        raise ShapeMismatchError(f"n_components must be a positive integer, got {n_components!r}")
    if of not in ("map", "curve"):
        raise ShapeMismatchError(f"of must be 'map' (pixel action maps) or 'curve' (loss per tick), got {of!r}")
    src = _source(ledger, run, stream, dt, ticks, need_element=False)
    n = ledger.n_samples
    cells: tuple[int, int] | None = None
    if of == "map":
        if len(src.element_shape) != 2:
            raise ShapeMismatchError(
                f"of='map' pools (H, W) maps but stream {stream!r} has element shape {src.element_shape}; use "
                "of='curve'"
            )
        cells = _grid(src.element_shape, grid, max_features)
        n_features = cells[0] * cells[1]
    else:
        n_features = int(src.tick_index.size)
    if n_features == 0:
        raise ShapeMismatchError(f"no features to embed: the window holds {src.tick_index.size} tick(s)")
    if n_features > _MAX_PCA_FEATURES:
        raise ShapeMismatchError(
            f"{n_features} features exceed {_MAX_PCA_FEATURES}; choose a coarser grid= or a shorter window"
        )
    with tempfile.TemporaryDirectory(prefix="lossledger-pca-") as tmp:
        if n * n_features * 4 <= pixels.PIXEL_BUDGET_BYTES:
            features = np.empty((n, n_features), np.float32)
        else:
            features = np.lib.format.open_memmap(f"{tmp}/features.npy", "w+", np.float32, (n, n_features))
        if cells is not None:
            for rows, state in _moments(src, None):
                features[rows] = _pool(state.action_variance()[0], cells)
        else:
            for block_rows, positions, values, _ in _slabs(src, None):
                if values.ndim > 2:
                    values = _nanmean_elements(values)
                features[block_rows[:, None], positions[None, :]] = values.T
        scores, variance, ratio, n_fit = _pca(features, n_components)
        del features
    columns = {"sample_id": pa.array(ledger._samples.sample_id, pa.int64())}
    for j in range(n_components):
        columns[f"pc{j + 1}"] = pa.array(scores[:, j], pa.float64())
    meta = {"explained_variance": variance.tolist(), "explained_variance_ratio": ratio.tolist(), "n_fit": n_fit,
            "n_features": n_features, "of": of, "grid": list(cells) if cells else None}
    return pa.table(columns).replace_schema_metadata({b"lossledger": json.dumps(meta).encode()})


# --- inputs -------------------------------------------------------------------------------------------------
def _rows_of(
    ledger: Ledger, run: str, source: Any, maps: PixelMaps, rows: np.ndarray, what: str, *, image: bool = False
) -> np.ndarray | None:
    """The drawn samples' rows of an image array, or of a label/prediction stream or array (float, NaN void)."""
    if source is None:
        return None
    shape = maps.action.shape[1:]
    if image:
        array = source if isinstance(source, np.ndarray) else to_numpy(source, what)
        if array.shape[:3] != (ledger.n_samples, *shape) or array.ndim not in (3, 4) or (
            array.ndim == 4 and array.shape[3] not in (3, 4)
        ):
            raise ShapeMismatchError(
                f"{what} must have shape {(ledger.n_samples, *shape)} or {(ledger.n_samples, *shape, 3)} (one image "
                f"per sample, in ledger row order), got {array.shape}"
            )
        return np.asarray(array[rows])
    unique, inverse = np.unique(rows, return_inverse=True)
    return _labels_source(ledger, run, source, shape, what)(unique)[inverse]


def _n_classes(classes: Any, panels: dict[str, np.ndarray | None]) -> int:
    if classes is not None:
        return len(classes)
    top = [np.nanmax(np.where(p < 0, np.nan, p)) for k, p in panels.items()
           if k != "input" and p is not None and np.isfinite(p).any()]
    return int(max(top)) + 1 if top else 1


def _row(panels: dict[str, np.ndarray | None], maps: PixelMaps, j: int, ignore_index: int) -> list[tuple[str, Any]]:
    """The panels of sample j: (kind, data), kind in input/label/prediction/action/overlay."""
    row: list[tuple[str, Any]] = []
    if panels["input"] is not None:
        row.append(("input", panels["input"][j]))
    for kind in ("label", "prediction"):
        mask = panels[kind]
        if mask is not None:
            m = mask[j].astype(np.float64)
            m[(m == ignore_index) | (m < 0)] = np.nan
            row.append((kind, m))
    row.append(("action", maps.action[j]))
    if panels["input"] is not None:
        row.append(("overlay", (panels["input"][j], maps.action[j])))
    return row


# --- drawing ------------------------------------------------------------------------------------------------
def _matplotlib() -> Any:
    try:
        import matplotlib
        import matplotlib.colors
        from matplotlib.figure import Figure
    except ImportError as err:
        raise MissingDependencyError(
            "drawing heatmaps needs matplotlib: pip install 'lossledger[report]' (or pass png=False to write "
            "the .npy maps only)"
        ) from err
    return matplotlib, Figure


def _figure(plt: Any, rows: list[list[tuple[str, Any]]], vmax: float, n_classes: int, titles: list[str]) -> Any:
    matplotlib, Figure = plt
    n_cols = max(len(r) for r in rows)
    h, w = np.shape(rows[0][-1][1][1] if rows[0][-1][0] == "overlay" else rows[0][-1][1])[:2]
    panel_w = 3.2
    panel_h = max(1.0, panel_w * h / max(1, w))
    fig = Figure(figsize=(panel_w * n_cols + 0.8, panel_h * len(rows) + 0.4), dpi=100, layout="constrained")
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    heat = matplotlib.colormaps["inferno"].with_extremes(bad=_VOID)
    qual = _class_colormap(matplotlib, n_classes).with_extremes(bad=_VOID)
    names = {"input": "input", "label": "label", "prediction": "prediction", "action": "pixel action",
             "overlay": "action over input"}
    image = None
    for i, row in enumerate(rows):
        for k in range(n_cols):
            ax = axes[i, k]
            ax.set_axis_off()
            if k >= len(row):
                continue
            kind, data = row[k]
            if kind == "input":
                ax.imshow(_displayable(data), cmap="gray" if np.ndim(data) == 2 else None, interpolation="nearest")
            elif kind in ("label", "prediction"):
                ax.imshow(np.ma.masked_invalid(data), cmap=qual, vmin=-0.5, vmax=max(n_classes, 2) - 0.5,
                          interpolation="nearest")
            elif kind == "action":
                image = ax.imshow(np.ma.masked_invalid(data), cmap=heat, vmin=0.0, vmax=vmax, interpolation="nearest")
            else:
                background, action = data
                ax.imshow(_displayable(background), cmap="gray" if np.ndim(background) == 2 else None,
                          interpolation="nearest")
                ax.imshow(np.ma.masked_invalid(action), cmap=heat, vmin=0.0, vmax=vmax, alpha=0.6,
                          interpolation="nearest")
            ax.set_title(f"{names[kind]}" if i == 0 else "", fontsize=9)
            if k == 0:
                ax.text(-0.02, 0.5, titles[i], transform=ax.transAxes, rotation=90, ha="right", va="center",
                        fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes[:, -1].tolist(), shrink=0.8, label="action (Σ loss · Δt)")
    return fig


def _class_colormap(matplotlib: Any, n_classes: int) -> Any:
    """Distinct colours for class indices 0..n_classes-1 (tab10, tab20, else turbo sampled)."""
    n = max(n_classes, 2)
    if n <= 20:
        base = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
        return matplotlib.colors.ListedColormap(base.colors[:n])
    return matplotlib.colormaps["turbo"].resampled(n)


def _displayable(image: np.ndarray) -> np.ndarray:
    """An image as floats in [0, 1] (any numeric range is rescaled; NaN kept)."""
    data = np.asarray(image, dtype=np.float64)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return data
    lo, hi = float(finite.min()), float(finite.max())
    return (data - lo) / (hi - lo) if hi > lo else np.zeros_like(data)


# --- files --------------------------------------------------------------------------------------------------
def _out_dir(out_dir: str | os.PathLike[str]) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{out} is a file; pass a folder for the maps (it is created if missing)")
    if not out.exists():
        if not out.parent.is_dir():
            raise OutputPathError(f"cannot create {out}: folder {out.parent} does not exist; create it first")
        out.mkdir(exist_ok=True)
    return out


def _save(path: Path, *, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def _savefig(path: Path, *, fig: Any) -> None:
    fig.savefig(path, format="png")


def _atomic(path: Path, write: Callable[[Path], None]) -> str:
    """Write ``path`` through a temp file in the same folder and rename it into place; return the path."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return str(path)


# --- PCA ----------------------------------------------------------------------------------------------------
def _grid(shape: tuple[int, ...], grid: tuple[int, int] | None, max_features: int) -> tuple[int, int]:
    h, w = shape
    if grid is None:
        if max_features < 1:
            raise ShapeMismatchError(f"max_features must be positive, got {max_features}")
        f = max(1, math.ceil(math.sqrt(h * w / max_features)))
        return max(1, h // f), max(1, w // f)
    gh, gw = (int(g) for g in grid)
    if not (1 <= gh <= h and 1 <= gw <= w):
        raise ShapeMismatchError(f"grid {grid} must lie between (1, 1) and the map shape {(h, w)}")
    return gh, gw


def _pool(maps: np.ndarray, cells: tuple[int, int]) -> np.ndarray:
    """(b, H, W) maps with NaN -> (b, gh * gw): the mean of the observed pixels of each cell, NaN if none."""
    b, h, w = maps.shape
    eh = np.linspace(0, h, cells[0] + 1).astype(np.int64)[:-1]
    ew = np.linspace(0, w, cells[1] + 1).astype(np.int64)[:-1]
    seen = ~np.isnan(maps)
    sums = np.add.reduceat(np.add.reduceat(np.where(seen, maps, 0.0), eh, axis=1), ew, axis=2)
    counts = np.add.reduceat(np.add.reduceat(seen.astype(np.int64), eh, axis=1), ew, axis=2)
    return np.divide(sums, counts, out=np.full(sums.shape, np.nan), where=counts > 0).reshape(b, -1)


def _nanmean_elements(values: np.ndarray) -> np.ndarray:
    """(g, b, *element) -> (g, b): mean over each element's observed values, NaN if none."""
    flat = values.reshape(values.shape[0], values.shape[1], -1)
    seen = ~np.isnan(flat)
    count = seen.sum(axis=2)
    total = np.where(seen, flat, 0.0).sum(axis=2, dtype=np.float64)
    return np.divide(total, count, out=np.full(count.shape, np.nan), where=count > 0)


def _pca(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Mean-imputed PCA of the rows of ``features`` (N, D) with NaN, block by block.

    Returns scores (N, k) (NaN rows for samples without any feature), explained variance (k,) and its
    ratio (k,), and the number of samples fitted.
    """
    n, d = features.shape
    step = max(1, pixels.PIXEL_BUDGET_BYTES // (8 * d * 4))
    count = np.zeros(d, np.int64)
    total = np.zeros(d)
    fitted = np.zeros(n, bool)
    for lo in range(0, n, step):
        block = np.asarray(features[lo : lo + step], dtype=np.float64)
        seen = ~np.isnan(block)
        fitted[lo : lo + step] = seen.any(axis=1)
        count += seen.sum(axis=0)
        total += np.where(seen, block, 0.0).sum(axis=0)
    mean = np.divide(total, count, out=np.zeros(d), where=count > 0)
    n_fit = int(fitted.sum())
    cov = np.zeros((d, d))
    for lo in range(0, n, step):
        centered = _centered(features[lo : lo + step], mean, fitted[lo : lo + step])
        cov += centered.T @ centered
    cov /= max(1, n_fit - 1)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1][:k]
    eigval, eigvec = np.maximum(eigval[order], 0.0), eigvec[:, order]
    flip = np.sign(eigvec[np.abs(eigvec).argmax(axis=0), np.arange(eigvec.shape[1])])
    eigvec = eigvec * np.where(flip == 0, 1.0, flip)
    trace = float(np.trace(cov))
    ratio = eigval / trace if trace > 0 else np.full(eigval.shape, np.nan)
    scores = np.full((n, k), np.nan)
    for lo in range(0, n, step):
        rows = fitted[lo : lo + step]
        centered = _centered(features[lo : lo + step], mean, rows)
        part = np.full((rows.size, k), np.nan)
        part[:, : eigvec.shape[1]] = centered @ eigvec
        part[~rows] = np.nan
        scores[lo : lo + step] = part
    if eigvec.shape[1] < k:  # more components asked than features: the extra ones are missing
        eigval = np.concatenate([eigval, np.full(k - eigval.size, np.nan)])
        ratio = np.concatenate([ratio, np.full(k - ratio.size, np.nan)])
    return scores, eigval, ratio, n_fit


def _centered(block: np.ndarray, mean: np.ndarray, fitted: np.ndarray) -> np.ndarray:
    """Rows minus the feature means, missing features 0 (mean imputation), rows not fitted all 0."""
    out = np.asarray(block, dtype=np.float64) - mean
    out[np.isnan(out)] = 0.0
    out[~fitted] = 0.0
    return out
