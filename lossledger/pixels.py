"""Dense streams: per-pixel action maps, per-sample and per-class summaries, PCA embeddings, out of core.

A dense stream has element shape (H, W) (or any non-empty shape: (C, H, W) per-class losses work wherever no
label mask is involved): ``runs/<run>/streams/<name>`` is (T, N, H, W), chunked one tick by ``S`` samples
(``S`` ≈ 1 MiB / sample size). For pixel ``p`` of sample ``i`` with loss ``L[t, i, p]`` at the scanned ticks
where it is not NaN:

- ``action[i, p]``   = Σ_t L[t, i, p] · Δt[t]   (Δt as in :mod:`lossledger.scores`: 1 per tick for
  ``dt="epoch"``, the tick's optimizer steps for ``"step"``, its seconds for ``"wall"``);
- ``mean[i, p]`` and ``variance[i, p]``: mean and population variance (ddof=0) over the observed ticks;
- ``n_obs[i, p]``: the number of observed ticks.

**NaN is "not a loss".** Ignored pixels (``ignore_index``, void masks) must be stored as NaN, never 0: a loss
computed with ``ignore_index`` returns 0 there, so pass it through :func:`mask_ignored` before ``run.log``
(and open the run with ``allow_nonfinite=True``, which lets NaN through the writer's checks). NaN pixels are
skipped; a pixel never observed has ``n_obs = 0`` and NaN action, mean and variance, and is left out of every
per-sample or per-class statistic. Heatmap files and PCA embeddings of the maps: :mod:`lossledger.heatmaps`.

Memory: values are read as slabs of whole stored chunks of at most ``PIXEL_BUDGET_BYTES`` (64 MB) of float32,
over blocks of at most ``budget / (64 B x pixels)`` samples (at least one chunk), whose float64 state
(about 36 B per pixel) is kept between slabs; never the (N, H, W) maps of all samples unless asked for them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ._arrays import as_ids, tick_positions, to_numpy
from ._commit import open_stream, read_run_attrs, read_ticks
from ._pixel_stats import ClassStats, PixelMoments
from ._scan import contiguous_runs, read_zarr, scan
from .errors import InvalidDTypeError, ShapeMismatchError, UnknownStreamError
from .scores import DT_MODES, Dt, tick_durations

if TYPE_CHECKING:
    import zarr

    from .ledger import Ledger

__all__ = [
    "DEFAULT_THRESHOLD",
    "PixelMaps",
    "iter_pixel_action",
    "mask_ignored",
    "pixel_action",
    "pixel_class_action",
    "pixel_summary",
]

#: Bytes of float32 values read at once (one slab), and the scale of a block's state.
PIXEL_BUDGET_BYTES = 64 << 20
#: Bytes of state and per-tick temporaries per pixel of a block (n_obs, action, mean, m2, a float64 tick).
_STATE_BYTES = 64
#: Default ``threshold`` of ``frac_above``: a pixel whose mean cross-entropy exceeds ln 2 had, on geometric
#: average over the observed ticks, less than even odds on its true class.
DEFAULT_THRESHOLD = math.log(2.0)


@dataclass(frozen=True)
class PixelMaps:
    """Per-pixel maps of samples of a dense stream (from :func:`pixel_action`).

    ``sample_id`` (k,) int64; ``action``, ``mean``, ``variance`` (k, *element_shape) float32, NaN where a pixel
    was never observed; ``n_obs`` (k, *element_shape) int32. The statistics are accumulated in float64 and
    rounded to float32 once (relative error ≤ 6e-8).
    """

    run: str
    stream: str
    dt: str
    ticks: np.ndarray  # (t,) int64 tick indices scanned
    sample_id: np.ndarray
    action: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    n_obs: np.ndarray

    def __len__(self) -> int:
        return int(self.sample_id.shape[0])


# --- public functions ---------------------------------------------------------------------------------------
def mask_ignored(loss: Any, target: Any, ignore_index: int = 255) -> np.ndarray:
    """Per-pixel losses with NaN where ``target == ignore_index``, ready for ``run.log(ids, pixel=...)``.

    ``loss``: (B, H, W) per-pixel losses (``F.cross_entropy(logits, y, reduction="none", ignore_index=255)``
    gives 0 at ignored pixels, which would read as "learned perfectly"); ``target``: the (B, H, W) integer labels
    it was computed from. Accepts numpy arrays and CPU tensors (anything with ``__array__`` or ``__dlpack__``;
    tensors that require grad are detached); no framework is imported. Returns a new float32 array of
    ``loss``'s shape; NaN already in ``loss`` stays NaN.

    >>> mask_ignored(np.ones((1, 2, 2)), np.array([[[0, 255], [1, 1]]]))[0]
    array([[ 1., nan],
           [ 1.,  1.]], dtype=float32)
    """
    values = to_numpy(loss, "loss")
    labels = to_numpy(target, "target")
    if values.dtype.kind not in "fiu":
        raise InvalidDTypeError(f"loss must hold real numbers, got dtype {values.dtype}")
    if values.shape != labels.shape:
        raise ShapeMismatchError(
            f"loss has shape {values.shape} but target has {labels.shape}; pass the per-pixel loss "
            "(reduction='none') and the label map it was computed from"
        )
    out = np.array(values, dtype=np.float32)
    out[labels == ignore_index] = np.nan
    return out


def pixel_action(
    ledger: Ledger, run: str, stream: str = "pixel", *, ids: Any = None, dt: Dt = "epoch", ticks: Any = None
) -> PixelMaps:
    """Action, mean and variance maps of the samples ``ids`` (default: every sample) of a dense stream.

    ``ids`` may be in any order and repeat; the maps come back in that order. ``dt``: Δt per tick
    (``"epoch"``, ``"step"``, ``"wall"``); ``ticks``: a window (slice or tick indices), default every committed
    tick. NaN pixels are skipped; a pixel never observed is NaN (``n_obs`` 0).

    Memory: the result, 16 B per pixel of each requested sample (``ids=None`` over a large ledger is
    N x H x W x 16 B: use :func:`iter_pixel_action` or :func:`pixel_summary` there), plus one block
    (``PIXEL_BUDGET_BYTES``). Only the chunks holding the requested samples are read.

    >>> maps = pixel_action(ledger, "unet", ids=[3, 7])
    >>> maps.action.shape             # (2, H, W)
    """
    src = _source(ledger, run, stream, dt, ticks, need_element=True)
    if ids is None:
        rows = np.arange(ledger.n_samples, dtype=np.int64)
    else:
        rows = ledger._index.rows(as_ids(ids))
    unique, inverse = np.unique(rows, return_inverse=True)
    parts = [state.maps() for _, state in _moments(src, unique)]
    maps = {
        name: np.concatenate([p[name] for p in parts]) if parts else np.empty((0, *src.element_shape), dtype)
        for name, dtype in (("action", np.float32), ("mean", np.float32), ("variance", np.float32),
                            ("n_obs", np.int32))
    }
    if not np.array_equal(unique, rows):  # np.unique sorted the rows: back to the caller's order and repeats
        maps = {name: values[inverse] for name, values in maps.items()}
    return PixelMaps(run, stream, dt, src.tick_index, ledger._samples.sample_id[rows], **maps)


def iter_pixel_action(
    ledger: Ledger, run: str, stream: str = "pixel", *, dt: Dt = "epoch", ticks: Any = None
) -> Iterator[PixelMaps]:
    """The maps of :func:`pixel_action` for every sample, block by block in ledger row order.

    Each item holds the maps of a block of consecutive samples (whole stored chunks, at most
    ``PIXEL_BUDGET_BYTES / (64 B x pixels)`` samples). Memory: one block, never all samples' maps.

    >>> for block in iter_pixel_action(ledger, "unet"):
    ...     np.save(f"action_{block.sample_id[0]}.npy", block.action)
    """
    src = _source(ledger, run, stream, dt, ticks, need_element=True)
    for rows, state in _moments(src, None):
        m = state.maps()
        yield PixelMaps(run, stream, dt, src.tick_index, ledger._samples.sample_id[rows],
                        m["action"], m["mean"], m["variance"], m["n_obs"])


def pixel_summary(
    ledger: Ledger,
    run: str,
    stream: str = "pixel",
    *,
    ids: Any = None,
    threshold: float = DEFAULT_THRESHOLD,
    dt: Dt = "epoch",
    ticks: Any = None,
) -> pa.Table:
    """One row per sample summarising its pixel maps; joins ``ledger.scores(run)`` on ``sample_id``.

    Columns: ``sample_id`` (int64); ``action_mean`` (float64), the mean over observed pixels of the pixel
    action (equal to ``ledger.scores(run, stream).action``); ``action_max``; ``variance_mean``, the mean
    per-pixel variance (equal to ``scores.variance``); ``frac_above``, the fraction of observed pixels whose
    mean loss over the observed ticks exceeds ``threshold`` (loss units, independent of ``dt``; default ln 2:
    for cross-entropy, a pixel whose true class had on (geometric) average less than even odds);
    ``n_valid_pixels`` (int64), pixels observed at least once. A sample with no observed pixel has NaN
    statistics and 0 valid pixels. Rows: ``ids`` order, or every sample in ledger row order.

    Memory: one block (``PIXEL_BUDGET_BYTES``) plus the O(N) result; never N x H x W.

    >>> ledger.scores("unet", "loss").join(pixel_summary(ledger, "unet"), "sample_id")
    """
    src = _source(ledger, run, stream, dt, ticks, need_element=True)
    rows_all = None if ids is None else ledger._index.rows(as_ids(ids))
    unique = None if rows_all is None else np.unique(rows_all)
    names = ("action_mean", "action_max", "variance_mean", "frac_above", "n_valid_pixels")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    order: list[np.ndarray] = []
    for rows, state in _moments(src, unique):
        stats = state.summary(float(threshold))
        for name in names:
            parts[name].append(stats[name])
        order.append(rows)
    stats = {name: np.concatenate(p) if p else np.zeros(0) for name, p in parts.items()}
    rows = np.concatenate(order) if order else np.zeros(0, np.int64)
    if rows_all is not None:
        pos = np.searchsorted(rows, rows_all)
        stats = {name: values[pos] for name, values in stats.items()}
        rows = rows_all
    columns = {"sample_id": pa.array(ledger._samples.sample_id[rows], pa.int64())}
    for name in names[:-1]:
        columns[name] = pa.array(stats[name], pa.float64())
    columns["n_valid_pixels"] = pa.array(stats["n_valid_pixels"].astype(np.int64), pa.int64())
    return pa.table(columns)


def pixel_class_action(
    ledger: Ledger,
    run: str,
    stream: str = "pixel",
    *,
    labels: str | Any,
    ids: Any = None,
    ignore_index: int = 255,
    classes: list[str] | tuple[str, ...] | None = None,
    dt: Dt = "epoch",
    ticks: Any = None,
) -> pa.Table:
    """Difficulty per ground-truth class of pixel: the action of the pixels of each class, as a table.

    ``labels``: the label masks, either the name of a stream of ``run`` with the stream's element shape (each
    sample's mask as logged at the last committed tick that logged it; NaN = void), or an (N, H, W) integer array in
    ledger row order (row i is ``ledger.sample_ids[i]``; an ``np.load(..., mmap_mode="r")`` memmap keeps it on
    disk). A pixel counts when its label is a class (>= 0, not ``ignore_index``, not NaN) and it was observed
    at least once. ``classes``: class names (labels must then be < len(classes); every class gets a row).
    ``ids``: restrict to these samples.

    Returns one row per class, sorted: ``class`` (int32), ``name`` (when ``classes`` is given), ``n_pixels``,
    ``n_samples`` (samples with at least one counted pixel of the class), ``action_mean``, ``action_std``
    (population), ``action_max``, ``variance_mean`` (mean per-pixel variance over ticks), ``action_share``
    (the class's share of the total action of all counted pixels). A class with no counted pixel has NaN.
    Memory: one block plus its labels; O(classes) state.

    >>> pixel_class_action(ledger, "unet", labels=np.load("val_labels.npy", mmap_mode="r"),
    ...                    classes=CITYSCAPES_CLASSES).sort_by([("action_mean", "descending")])
    """
    src = _source(ledger, run, stream, dt, ticks, need_element=True)
    if len(src.element_shape) != 2:
        raise ShapeMismatchError(
            f"stream {stream!r} has element shape {src.element_shape}; per-class difficulty needs (H, W) pixel "
            "maps and (H, W) label masks"
        )
    label_source = _labels_source(ledger, run, labels, src.element_shape, "labels")
    rows = None if ids is None else np.unique(ledger._index.rows(as_ids(ids)))
    acc = ClassStats()
    for block_rows, state in _moments(src, rows):
        lab = label_source(block_rows)
        action, variance = state.action_variance()
        valid = (state.n > 0) & ~np.isnan(lab) & (lab >= 0) & (lab != ignore_index)
        codes = lab[valid].astype(np.int64)
        if classes is not None and codes.size and codes.max() >= len(classes):
            raise ShapeMismatchError(
                f"labels hold class {int(codes.max())} but classes= names {len(classes)}; pass every class name "
                f"or mark the pixel ignored with ignore_index={ignore_index}"
            )
        sample_of = np.broadcast_to(np.arange(len(block_rows))[:, None, None], valid.shape)[valid]
        acc.update(codes, action[valid], variance[valid], sample_of)
    return acc.table(classes)


# --- reading ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    array: zarr.Array
    element_shape: tuple[int, ...]
    tick_index: np.ndarray  # (t,) sorted unique tick positions
    dts: np.ndarray  # (t,) Δt of those ticks
    n: int
    per_chunk: int


def _source(ledger: Ledger, run: str, stream: str, dt: str, ticks: Any, *, need_element: bool) -> _Source:
    if dt not in DT_MODES:
        raise ShapeMismatchError(f"dt must be one of {list(DT_MODES)} (Δt per tick), got {dt!r}")
    commit = read_run_attrs(ledger._io, run)["commit"]
    streams = commit["streams"]
    if stream not in streams:
        raise UnknownStreamError(
            f"run {run!r} has no committed stream {stream!r}; its streams are {sorted(streams)} (log per-pixel "
            f"losses with run.log(ids, {stream}=loss_maps))"
        )
    element_shape = tuple(int(d) for d in streams[stream]["element_shape"])
    if need_element and not element_shape:
        raise ShapeMismatchError(
            f"stream {stream!r} of run {run!r} holds one value per sample; pixel maps need a dense stream with "
            "element shape (H, W) (for per-sample scores use ledger.scores)"
        )
    n_ticks = commit["ticks"]
    tick_index = np.unique(tick_positions(ticks, n_ticks))
    rows = read_ticks(ledger._io, run, commit)
    dts = tick_durations(dt, rows["step"], rows["wall"])[tick_index] if n_ticks else np.zeros(0)
    array = open_stream(ledger._io, run, stream, commit, ledger.n_samples)
    return _Source(array, element_shape, tick_index, dts, int(array.shape[1]), int(array.chunks[1]))


def _block_width(src: _Source) -> int:
    """Samples per block: whole chunks whose state fits the budget (at least one chunk)."""
    fit = PIXEL_BUDGET_BYTES // max(1, _STATE_BYTES * _size(src.element_shape))
    return max(src.per_chunk, fit // src.per_chunk * src.per_chunk)


def _size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def _slabs(src: _Source, rows: np.ndarray | None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, bool]]:
    """``(block_rows, positions, values, block_end)``: values (g, b, *element) float32 of the sample rows
    ``block_rows`` (sorted) at the tick positions ``positions``; every block's slabs come in tick order.

    ``rows=None`` (every sample) goes through the package's scan engine (:func:`lossledger._scan.scan`, two
    slabs in memory at most), with a budget that keeps a block at most :func:`_block_width` samples wide; a
    subset reads only the chunks holding its rows, one block of whole chunks at a time.
    """
    element_bytes = 4 * _size(src.element_shape)
    n_ticks = int(src.tick_index.size)
    width = _block_width(src)
    if n_ticks == 0:
        return
    if rows is None:
        budget = max(2 * element_bytes, min(PIXEL_BUDGET_BYTES, 2 * n_ticks * width * element_bytes))
        for slab in scan(src.array, src.tick_index, budget_bytes=budget):
            yield np.arange(slab.lo, slab.hi, dtype=np.int64), slab.ticks, slab.values, slab.block_end
        return
    runs = contiguous_runs(src.tick_index)
    for lo, hi, sel in _plan(src, rows, width):
        assert sel is not None  # a subset of rows
        per_slab = max(1, min(n_ticks, PIXEL_BUDGET_BYTES // max(1, (hi - lo) * element_bytes)))
        for start in range(0, n_ticks, per_slab):
            stop = min(n_ticks, start + per_slab)
            values = read_zarr(src.array, src.tick_index, runs, start, stop, lo, hi)
            if sel.size != hi - lo:
                values = values[:, sel]
            yield sel + lo, np.arange(start, stop), values, stop == n_ticks


def _plan(src: _Source, rows: np.ndarray | None, width: int) -> Iterator[tuple[int, int, np.ndarray | None]]:
    """Blocks ``(lo, hi, sel)``: read rows lo..hi (whole chunks), keep offsets ``sel`` (sorted), or all if None."""
    per_chunk, n = src.per_chunk, src.n
    if rows is None:
        for lo in range(0, n, width):
            yield lo, min(n, lo + width), None
        return
    i = 0
    while i < rows.size:
        lo = int(rows[i]) // per_chunk * per_chunk
        j = int(np.searchsorted(rows, lo + width, side="left"))
        hi = min(n, (int(rows[j - 1]) // per_chunk + 1) * per_chunk)
        yield lo, hi, rows[i:j] - lo
        i = j


def _moments(src: _Source, rows: np.ndarray | None) -> Iterator[tuple[np.ndarray, PixelMoments]]:
    """``(rows, state)`` per block: the block's sample rows (sorted) and its accumulated per-pixel state."""
    if src.tick_index.size == 0:  # nothing to read: every sample still gets a (never observed) state
        for lo, hi, sel in _plan(src, rows, _block_width(src)):
            block_rows = np.arange(lo, hi, dtype=np.int64) if sel is None else sel + lo
            yield block_rows, PixelMoments((block_rows.size, *src.element_shape))
        return
    state: PixelMoments | None = None
    for block_rows, positions, values, block_end in _slabs(src, rows):
        if state is None:
            state = PixelMoments((block_rows.size, *src.element_shape))
        state.update(values, src.dts[positions])
        if block_end:
            yield block_rows, state
            state = None


def _labels_source(ledger: Ledger, run: str, labels: Any, element_shape: tuple[int, ...], what: str):
    """A function: sample rows (sorted) -> their (b, H, W) float64 label masks (NaN = void)."""
    if isinstance(labels, str):
        src = _source(ledger, run, labels, "epoch", None, need_element=True)
        if src.element_shape != element_shape:
            raise ShapeMismatchError(
                f"{what} stream {labels!r} has element shape {src.element_shape}, the maps {element_shape}"
            )
        return lambda rows: _last_observed(src, rows)
    array: np.ndarray = labels if isinstance(labels, np.ndarray) else to_numpy(labels, what)
    if array.dtype.kind not in "iuf":
        raise InvalidDTypeError(f"{what} must be integer class indices, got dtype {array.dtype}")
    if array.shape != (ledger.n_samples, *element_shape):
        raise ShapeMismatchError(
            f"{what} must have shape {(ledger.n_samples, *element_shape)} (one mask per sample of the ledger, in "
            f"ledger row order), got {array.shape}"
        )
    return lambda rows: np.asarray(array[rows], dtype=np.float64)


def _last_observed(src: _Source, rows: np.ndarray) -> np.ndarray:
    """(b, *element) float64: each sample's values at the last tick it was logged (any element not NaN)."""
    out = np.full((rows.size, *src.element_shape), np.nan)
    axes = tuple(range(1, 1 + len(src.element_shape)))
    for block_rows, _, values, _ in _slabs(src, rows):
        at = np.searchsorted(rows, block_rows)
        for g in range(values.shape[0]):  # ticks in increasing order: the newest logged mask wins
            logged = ~np.isnan(values[g]).all(axis=axes)
            out[at[logged]] = values[g][logged]
    return out
