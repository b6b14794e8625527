"""Heatmap export of pixel action maps: side-by-side PNG panels like Fig 11 of the action-score paper, and .npy.

Arriaga & Valdenegro-Toro, "Unsupervised Difficulty Estimation with Action Scores", Fig 11: for the hardest
Cityscapes images, the input, the label mask, the predicted mask and the per-pixel action. matplotlib (the
``[report]`` extra) is imported only when PNGs are drawn; ``.npy`` maps need numpy only.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from ._arrays import as_ids, to_numpy
from .errors import OutputPathError, ShapeMismatchError
from .pixels import PixelMaps, _labels_source, pixel_action
from .scores import Dt

if TYPE_CHECKING:
    from .ledger import Ledger

__all__ = ["write_maps"]

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
            action_npy = _atomic(out / f"sample{sample_id}_action.npy", lambda p, a=maps.action[j]: _save(p, a))
            variance_npy = _atomic(out / f"sample{sample_id}_variance.npy", lambda p, a=maps.variance[j]: _save(p, a))
        if plt is not None:
            fig = _figure(plt, [_row(panels, maps, j, ignore_index)], vmax, n_classes,
                          [f"sample {sample_id} (rank {rank})"])
            png_path = _atomic(out / f"{rank:02d}_sample{sample_id}.png", lambda p, f=fig: f.savefig(p, format="png"))
        for key, value in (("rank", rank), ("sample_id", sample_id), (by, float(score[j])), ("png", png_path),
                           ("action_npy", action_npy), ("variance_npy", variance_npy)):
            records[key].append(value)
    if plt is not None and len(maps):
        rows_drawn = [_row(panels, maps, j, ignore_index) for j in range(len(maps))]
        titles = [f"sample {i} (rank {r + 1})" for r, i in enumerate(maps.sample_id.tolist())]
        fig = _figure(plt, rows_drawn, vmax, n_classes, titles)
        _atomic(out / "top.png", lambda p: fig.savefig(p, format="png"))
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
        raise ImportError(
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


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def _atomic(path: Path, write: Callable[[Path], None]) -> str:
    """Write ``path`` through a temp file in the same folder and rename it into place; return the path."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return str(path)
