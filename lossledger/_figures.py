"""The building blocks of the HTML report: matplotlib figures, each returned as PNG bytes (Agg canvas, no pyplot,
no global state), the user's sample images as thumbnails, and the HTML fragments (tables, figures, notes, CSS).

These functions draw numpy data handed to them by :mod:`lossledger.report`; they never read a ledger.
matplotlib is imported lazily, on the first call of :func:`require`, so that lossledger imports without it.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import InputPathError, MissingDependencyError, ShapeMismatchError

#: Colours of clusters, runs and splits (matplotlib's tab10, written out so that nothing is looked up).
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_DPI = 100


def require() -> Any:
    """The ``matplotlib`` module, or ``ImportError`` saying which extra installs it."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(
            "the HTML report draws its figures with matplotlib, which is not installed: "
            "pip install 'lossledger[report]' (or pip install matplotlib)"
        ) from err
    return matplotlib


def _figure(width: float, height: float, *, layout: Literal["constrained"] | None = "constrained") -> Any:
    require()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def use_log(values: np.ndarray) -> bool:
    """Whether to show positive, heavy-tailed values on a log axis (all finite values > 0, span > 100x)."""
    finite = values[np.isfinite(values)]
    return finite.size > 0 and bool(finite.min() > 0) and float(finite.max() / finite.min()) > 100.0


def _log_ticks(ax: Any, axis: str) -> None:
    """Label a log10-valued axis with the values themselves (10^k shown as 0.01, 1, 100 ...)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_locator(MaxNLocator(integer=True))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{10.0 ** v:g}"))


def class_violins(groups: Sequence[tuple[str, np.ndarray]], *, ylabel: str, max_points: int = 20_000) -> bytes:
    """One violin per (name, values) group, with its median (white dot) and quartiles (black bar).

    Values are drawn on a log axis when :func:`use_log` holds for all of them together. The violin's density
    is estimated from at most ``max_points`` values per group (a seeded random subset); medians and quartiles
    use every value.
    """
    everything = np.concatenate([v for _, v in groups]) if groups else np.zeros(0)
    log = use_log(everything)
    rng = np.random.default_rng(0)
    data = []
    for _, values in groups:
        v = np.log10(values) if log else values
        data.append(v)
    fig = _figure(max(6.0, 0.55 * len(groups) + 2.0), 4.0)
    ax = fig.add_subplot()
    positions = np.arange(1, len(groups) + 1)
    shapes = [v if v.size <= max_points else rng.choice(v, max_points, replace=False) for v in data]
    drawable = [i for i, v in enumerate(shapes) if v.size > 1 and np.ptp(v) > 0]
    if drawable:
        parts = ax.violinplot([shapes[i] for i in drawable], positions=positions[drawable], widths=0.8,
                              showextrema=False)
        for body in parts["bodies"]:
            body.set_facecolor(PALETTE[0])
            body.set_edgecolor("#0b3d62")
            body.set_alpha(0.55)
    for pos, v in zip(positions, data):
        if v.size == 0:
            continue
        q1, median, q3 = np.quantile(v, [0.25, 0.5, 0.75])
        ax.vlines(pos, q1, q3, color="black", linewidth=4)
        ax.scatter([pos], [median], color="white", edgecolor="black", zorder=3, s=22)
    ax.set_xticks(positions, [name for name, _ in groups], rotation=45 if len(groups) > 12 else 0,
                  ha="right" if len(groups) > 12 else "center")
    ax.set_xlabel("class (assigned label)")
    ax.set_ylabel(ylabel + (" (log scale)" if log else ""))
    if log:
        _log_ticks(ax, "y")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def curve_grid(
    x: np.ndarray, curves: np.ndarray, titles: Sequence[str], *, ylabel: str, xlabel: str,
    reference: np.ndarray | None = None, reference_label: str = "", window_stop: float | None = None,
    columns: int = 4,
) -> bytes:
    """Small multiples: one panel per curve (row of ``curves``, (k, T)), shared axes, titles under the panels.

    ``reference`` (T,) is drawn dashed grey in every panel; ``window_stop`` shades the ticks after it.
    """
    k = curves.shape[0]
    rows = max(1, math.ceil(k / columns))
    height = 2.0 * rows + 0.7
    # Fixed margins: constrained layout costs ~0.2 s per panel here.
    fig = _figure(2.6 * columns + 0.6, height, layout=None)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.45 / height, top=1 - 0.3 / height, wspace=0.12, hspace=0.32)
    axes = fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)
    log = use_log(curves.ravel()) and (reference is None or use_log(np.concatenate([curves.ravel(), reference])))
    for i, ax in enumerate(axes.ravel()):
        if i >= k:
            ax.set_axis_off()
            continue
        if reference is not None:
            ax.plot(x, reference, color="#888888", linestyle="--", linewidth=1,
                    label=reference_label if i == 0 else None)
        ax.plot(x, curves[i], color=PALETTE[1], linewidth=1.6)
        if window_stop is not None:
            ax.axvspan(window_stop, x[-1], color="#999999", alpha=0.12, linewidth=0)
        if log:
            ax.set_yscale("log")
        if x.size > 1:
            ax.set_xlim(x[0], x[-1])
        ax.set_title(titles[i], fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel(xlabel, fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel, fontsize=8)
    if reference is not None and reference_label:
        axes[0, 0].legend(fontsize=7, loc="best")
    return _png(fig)


def cluster_plot(x: np.ndarray, centres: np.ndarray, members: Sequence[tuple[int, np.ndarray]], *,
                 ylabel: str, xlabel: str) -> bytes:
    """Cluster centres (k, T) as thick lines, and the given members (cluster, curve) thin, in the same colour."""
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot()
    for c, centre in enumerate(centres):
        ax.plot(x, centre, color=PALETTE[c % len(PALETTE)], linewidth=3, label=f"cluster {c} centre")
    for c, curve in members:
        ax.plot(x, curve, color=PALETTE[c % len(PALETTE)], linewidth=1, alpha=0.55)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def action_histogram(
    groups: Sequence[tuple[str, np.ndarray]], *, threshold: float | None, xlabel: str, bins: int = 50,
) -> bytes:
    """Density histograms of (name, action) groups on one axis (log10 when :func:`use_log` holds for all
    values), and a vertical line at ``threshold``."""
    everything = np.concatenate([v for _, v in groups])
    log = use_log(everything)
    transform = np.log10 if log else (lambda v: v)
    edges = np.histogram_bin_edges(transform(everything), bins=bins)
    fig = _figure(7.5, 3.8)
    ax = fig.add_subplot()
    for i, (name, values) in enumerate(groups):
        ax.hist(transform(values), bins=edges, density=True, histtype="stepfilled", alpha=0.45,
                color=PALETTE[i % len(PALETTE)], edgecolor=PALETTE[i % len(PALETTE)], label=f"{name} (n={values.size:,})")
    if threshold is not None and np.isfinite(threshold) and (not log or threshold > 0):
        ax.axvline(transform(threshold), color="black", linestyle="--", linewidth=1.5,
                   label=f"threshold {threshold:.4g}")
    ax.set_xlabel(xlabel + (" (log scale)" if log else ""))
    ax.set_ylabel("density")
    if log:
        _log_ticks(ax, "x")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def window_plot(ticks: np.ndarray, statistic: np.ndarray, smoothed: np.ndarray, stop: int, *, ylabel: str) -> bytes:
    """The per-tick statistic of the memorization window, smoothed, and the window's last tick."""
    fig = _figure(7.5, 3.4)
    ax = fig.add_subplot()
    ax.plot(ticks, statistic, color="#999999", linewidth=1, marker=".", label="per tick")
    ax.plot(ticks, smoothed, color=PALETTE[0], linewidth=2, label="smoothed")
    ax.axvline(stop - 1, color="black", linestyle="--", linewidth=1.2, label=f"window ends (tick {stop - 1})")
    ax.axvspan(ticks[0] if ticks.size else 0, stop - 1, color=PALETTE[2], alpha=0.08, linewidth=0)
    ax.set_xlabel("tick")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def correlation_plot(quantiles: np.ndarray, lines: Sequence[tuple[str, np.ndarray]], *, ylabel: str) -> bytes:
    """Correlation against the top fraction of samples kept, one line per pair of runs."""
    fig = _figure(7.5, 3.6)
    ax = fig.add_subplot()
    for i, (name, r) in enumerate(lines):
        ax.plot(quantiles, r, marker="o", color=PALETTE[i % len(PALETTE)], label=name)
    ax.set_xscale("log")
    ax.set_xticks(quantiles, [f"{q:g}" for q in quantiles])
    ax.minorticks_off()
    ax.set_xlabel("top fraction of samples kept (by the pair's mean score)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def region_scatter(
    x: np.ndarray, y: np.ndarray, region: np.ndarray, names: Sequence[str],
    boxes: Sequence[tuple[float, float, float, float]], *, xlabel: str, ylabel: str, max_points: int = 20_000,
) -> bytes:
    """One point per sample, coloured by ``region`` (index into ``names``; 0 grey, drawn first), with the
    rectangles ``boxes`` (x0, x1, y0, y1) of regions 1, 2, ... shaded in their colour and their edges dashed.

    At most ``max_points`` points are drawn (a seeded random subset); the legend counts all of them."""
    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot()
    shown = np.arange(x.size)
    if x.size > max_points:
        shown = np.sort(np.random.default_rng(0).choice(x.size, max_points, replace=False))
    colours = ["#9aa5b1", *PALETTE[1:]]
    for code, name in enumerate(names):
        mine = shown[region[shown] == code]
        ax.scatter(x[mine], y[mine], s=7 if code == 0 else 12, alpha=0.45 if code == 0 else 0.8, linewidths=0,
                   color=colours[code % len(colours)], label=f"{name} (n={int((region == code).sum()):,})")
    for code, (x0, x1, y0, y1) in enumerate(boxes, start=1):
        colour = colours[code % len(colours)]
        ax.add_patch(_rectangle((x0, y0), x1 - x0, y1 - y0, colour))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", markerscale=2)
    return _png(fig)


def _rectangle(corner: tuple[float, float], width: float, height: float, colour: str) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle(corner, width, height, facecolor=colour, alpha=0.10, edgecolor=colour, linestyle="--",
                     linewidth=1.2)


def accuracy_curves(lines: Sequence[tuple[str, np.ndarray, np.ndarray]], *, xlabel: str, ylabel: str) -> bytes:
    """Accuracy (y, fraction) against a threshold (x), one (name, thresholds, accuracy) line per score."""
    fig = _figure(7.5, 3.6)
    ax = fig.add_subplot()
    for i, (name, threshold, accuracy) in enumerate(lines):
        ax.plot(threshold, accuracy, marker="o", markersize=3, color=PALETTE[i % len(PALETTE)], label=name)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def thumbnail(image: np.ndarray, *, vmin: float, vmax: float, size: int = 96) -> bytes:
    """One image as a PNG, upscaled by an integer factor with nearest neighbour to about ``size`` px (large
    images are subsampled by striding). ``image``: (H, W) grey, or (H, W, 3|4) colour; values in
    [``vmin``, ``vmax``] map to black..white."""
    require()
    import matplotlib.image

    h, w = image.shape[:2]
    step = max(1, math.ceil(max(h, w) / (2 * size)))
    small = np.asarray(image[::step, ::step], dtype=np.float64)
    factor = max(1, size // max(small.shape[0], small.shape[1]))
    big = np.repeat(np.repeat(small, factor, axis=0), factor, axis=1)
    span = vmax - vmin if vmax > vmin else 1.0
    scaled = np.clip((np.nan_to_num(big, nan=vmin) - vmin) / span, 0.0, 1.0)
    buffer = io.BytesIO()
    if scaled.ndim == 2:
        matplotlib.image.imsave(buffer, scaled, cmap="gray", vmin=0.0, vmax=1.0, format="png")
    else:
        matplotlib.image.imsave(buffer, scaled, format="png")
    return buffer.getvalue()


class Images:
    """The user's images, one per ledger row; only the rows asked for are read (an ``.npz`` is read whole).

    ``images``: an array (N, H, W), (N, H, W, C) with C in 1, 3, 4, or (N, D) with D a square number (flattened
    grey images); or the path of an ``.npy`` (memory-mapped) or ``.npz`` (key ``x``) file.
    """

    def __init__(self, images: Any, n_samples: int) -> None:
        if isinstance(images, (str, os.PathLike)):
            path = Path(images)
            if not path.is_file():
                raise InputPathError(f"no images file at {path}; pass an .npy or .npz (key 'x') file, or an array")
            if path.suffix == ".npz":
                with np.load(path) as npz:
                    if "x" not in npz:
                        raise ShapeMismatchError(f"{path} has no array 'x' (it has {list(npz.keys())}); store the "
                                                 "images under the key x")
                    images = npz["x"]
            else:
                images = np.load(path, mmap_mode="r")
        elif not (hasattr(images, "shape") and hasattr(images, "__getitem__")):
            images = np.asarray(images)
        shape = tuple(images.shape)
        if shape[0] != n_samples:
            raise ShapeMismatchError(
                f"images has {shape[0]} rows but the ledger has {n_samples} samples; pass one image per sample, in "
                "ledger row order (ledger.sample_ids)"
            )
        self._square = 0
        if len(shape) == 2:
            self._square = math.isqrt(int(shape[1]))
            if self._square**2 != shape[1]:
                raise ShapeMismatchError(f"images of shape {shape} are flat with {shape[1]} values, not a square "
                                         "number; pass (N, H, W) or (N, H, W, C) images")
        elif len(shape) == 4 and shape[3] not in (1, 3, 4):
            raise ShapeMismatchError(f"images of shape {shape} have {shape[3]} channels; pass 1, 3 or 4 (grey, RGB, RGBA)")
        elif len(shape) not in (3, 4):
            raise ShapeMismatchError(f"images must be (N, H, W), (N, H, W, C) or (N, H*W), got shape {shape}")
        self._array = images
        self.vmin, self.vmax = 0.0, 1.0

    def set_range(self, rows: np.ndarray) -> None:
        """Map values to grey levels from the images of ``rows`` (those shown): uint8 0..255; values within
        [0, 1] as they are; anything else from its minimum (black) to its maximum (white)."""
        picked = self._read(np.unique(rows))
        if picked.dtype == np.uint8:
            self.vmin, self.vmax = 0.0, 255.0
            return
        finite = picked[np.isfinite(picked)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        self.vmin, self.vmax = (0.0, 1.0) if lo >= 0.0 and hi <= 1.0 else (lo, hi)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        out = np.asarray(self._array[rows])
        return out.astype(np.float64) if out.dtype == bool else out

    def tag(self, row: int, alt: str) -> Html:
        """An ``<img>`` of the sample at ``row``, its PNG inline as a base64 ``data:`` URI."""
        image = self._read(np.array([row]))[0]
        if self._square:
            image = image.reshape(self._square, self._square)
        elif image.ndim == 3 and image.shape[2] == 1:
            image = image[..., 0]
        png = thumbnail(image, vmin=self.vmin, vmax=self.vmax)
        return Html(f'<img class="thumb" src="data:image/png;base64,{base64.b64encode(png).decode()}" '
                    f'alt="{html.escape(alt)}">')


# --- HTML fragments -----------------------------------------------------------------------------------------
class Html(str):
    """Markup that :func:`table` puts in a cell as it is (everything else is escaped)."""


def _cell(value: Any) -> str:
    if isinstance(value, Html):
        return f"<td>{value}</td>"
    if isinstance(value, float):
        return f'<td class="num">{"NaN" if np.isnan(value) else f"{value:.4g}"}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A data table, or (no headers) a two-column facts table; cells escaped unless :class:`Html`."""
    head = "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr></thead>" if headers else ""
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f'<table class="{"data" if headers else "facts"}">{head}<tbody>{body}</tbody></table>'


def figure_html(png: bytes, caption: str, alt: str) -> str:
    return (f'<figure><img class="plot" src="data:image/png;base64,{base64.b64encode(png).decode()}" '
            f'alt="{html.escape(alt)}"><figcaption>{html.escape(caption)}</figcaption></figure>')


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def caption(text: str) -> str:
    return f'<p class="caption">{html.escape(text)}</p>'


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2329;background:#f6f7f9}
header{background:#1d2b3a;color:#fff;padding:18px 32px}header h1{margin:0 0 4px;font-size:24px}
header p{margin:0;color:#c8d3de;font-size:14px}nav{margin-top:10px}nav a{color:#9fd0ff;margin-right:14px;font-size:14px}
main{max-width:1180px;margin:0 auto;padding:8px 24px 40px}
section{background:#fff;border:1px solid #e1e5ea;border-radius:8px;margin:18px 0;padding:8px 22px 16px}
h2{font-size:20px;border-bottom:1px solid #e1e5ea;padding-bottom:6px}h3{font-size:15px}
figure{margin:12px 0}img.plot{max-width:100%;height:auto;display:block}
figcaption,.caption{font-size:13px;color:#4a5561;margin-top:6px;max-width:1000px}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:8px 12px;font-size:14px}
table{border-collapse:collapse;font-size:13px;margin:10px 0}td,th{padding:3px 10px;border-bottom:1px solid #eceff2}
th{text-align:left;background:#f0f3f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.facts td:first-child{font-weight:600;color:#4a5561;white-space:nowrap}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.card{width:112px;font-size:12px;text-align:center;line-height:1.3}
img.thumb{image-rendering:pixelated;width:96px;height:96px;object-fit:contain;border:1px solid #ccd3da;background:#000}
td img.thumb{width:48px;height:48px}.flag{color:#b00020;font-weight:600}
.gallery.nn{flex-wrap:nowrap;overflow-x:auto;padding:6px 0;border-bottom:1px solid #eceff2}
.card.query{border-right:2px solid #1d2b3a;padding-right:8px}
"""
