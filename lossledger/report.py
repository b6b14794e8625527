"""``lossledger report``: one self-contained HTML file that shows what a ledger found.

Sections (each figure captioned with the figure of Arriaga, Palacio & Valdenegro-Toro, "Difficulty Estimation
with Action Scores for Computer Vision Tasks", that it mirrors):

1. summary: samples, classes, splits, runs, ticks and streams;
2. per-class distributions of the action (paper Fig 6a);
3. hardest and easiest samples (Figs 1 and 4), with thumbnails when images are given;
4. loss curves of the hardest samples (Fig 3);
5. loss-curve clusters (Fig 2), from ``lossledger.analysis.clusters.cluster_curves`` when installed;
6. nearest neighbours of the hardest samples in the logged features (Fig 5), when the run logged ``embedding``;
7. noisy-label candidates from :func:`lossledger.analysis.flag_noisy` (Fig 12);
8. the memorization window of :func:`lossledger.analysis.memorization_window`;
9. action vs predictive entropy and accuracy against thresholds (Figs 6b, 6c, 7), when the run logged ``probs``;
10. correlations of the action between runs (Table 1 and Fig 14), when there are at least two runs.

Sections 6 and 9 (:mod:`lossledger._report_predictions`) are left out when their stream is missing. A section
that cannot be computed says why in a note. Figures are PNGs drawn with matplotlib's Agg canvas and
embedded as base64 ``data:`` URIs; the CSS is inline and there is no script: the file opens offline and loads
nothing.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import _figures
from ._report_predictions import class_name, entropy_section, has_stream, label_of, neighbour_table, neighbours_section
from ._version import __version__
from .analysis import NoisyLabels, Window, flag_noisy, memorization_window
from .analysis.window import VALIDATION_SPLITS, _split_mask
from .errors import LedgerError, OutputPathError, ShapeMismatchError, UnknownStreamError
from .ledger import Ledger
from .ledger import open as open_ledger

_PAPER = "Arriaga et al., Difficulty Estimation with Action Scores"
_MAX_CLASSES_SHOWN = 30
_QUANTILES = (0.05, 0.1, 0.25, 0.5, 1.0)


def write_report(
    ledger: Ledger | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    run: str | None = None,
    runs: Sequence[str] | None = None,
    images: Any = None,
    stream: str = "loss",
    top: int = 16,
    neighbour_rows: int = 8,
    neighbour_k: int = 8,
    probs: str = "probs",
    embedding: str = "embedding",
) -> Path:
    """Write one self-contained HTML report of ``run`` to ``out`` and return its path.

    Parameters
    ----------
    ledger
        An open :class:`Ledger`, or the path of one (opened read-only).
    out
        The ``.html`` file to write, in an existing folder. It is written to a temp file beside it and renamed
        into place: it appears whole or not at all, and a failed report leaves an existing file untouched.
    run
        The run to report on; default the ledger's only run, or the first in sorted order (the summary says so).
    runs
        The runs whose actions are correlated (Table 1, Fig 14); default every run that logged ``stream``.
        With fewer than two, the section holds a note instead.
    images
        Optional pictures of the samples, one per ledger row (``ledger.sample_ids`` order): an array (N, H, W),
        (N, H, W, C) with C in 1, 3, 4, or (N, D) with D a square number (flattened grey images such as
        scikit-learn's digits); or the path of an ``.npy`` file (memory-mapped: only the shown rows are read)
        or of an ``.npz`` file with key ``x`` (read whole). Thumbnails are upscaled with nearest neighbour.
    stream
        The stream to report (default ``"loss"``); an element stream's curves are averaged over elements.
    top
        How many samples each gallery, curve grid and candidate table shows.
    neighbour_rows, neighbour_k
        The nearest-neighbour section shows the ``neighbour_rows`` hardest samples that have features, each
        with its ``neighbour_k`` nearest neighbours (:func:`lossledger.analysis.neighbours`).
    probs, embedding
        The run's class-probability stream (element shape (C,)) for the action-vs-entropy section, and its
        feature stream (element shape (D,), read at the last tick) for the nearest-neighbour section; a section
        whose stream the run did not log is left out.

    Memory: the run's score tables (O(N) floats each; all-tick scores come from the ledger's cache), one scan
    slab for the window and the noisy-label threshold, trajectories only of the at most ``2·top + 9`` samples
    whose curves are drawn, and images only of the shown samples (except from an ``.npz``). Never N × T. With
    ``probs``: O(N) entropies and one block of probabilities; with ``embedding``: one scan slab of features.
    Raises :class:`UnknownRunError`, :class:`UnknownStreamError`, :class:`ShapeMismatchError` (bad ``top``,
    ``neighbour_rows``, ``neighbour_k`` or images), :class:`OutputPathError`, and ``ImportError`` naming the ``[report]`` extra without matplotlib.

    >>> write_report(ll.open("runs/digits.ll"), "report.html", images=load_digits().images)
    PosixPath('report.html')
    """
    _figures.require()
    for name, value in (("top", top), ("neighbour_rows", neighbour_rows), ("neighbour_k", neighbour_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ShapeMismatchError(f"{name} must be a positive integer number of samples to show, got {value!r}")
    target = Path(out)
    if target.is_dir() or not target.parent.is_dir():
        where = "it is a folder" if target.is_dir() else f"folder {target.parent} does not exist"
        raise OutputPathError(f"cannot write {target}: {where}; pass a file path in an existing folder, e.g. report.html")
    options = _Options(stream, top, neighbour_rows, neighbour_k, probs, embedding)
    if isinstance(ledger, Ledger):
        page = _render(ledger, run, runs, images, options)
    else:
        with open_ledger(ledger) as opened:
            page = _render(opened, run, runs, images, options)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


@dataclass(frozen=True)
class _Options:
    """The choices of :func:`write_report` beyond which run and images."""

    stream: str
    top: int
    neighbour_rows: int
    neighbour_k: int
    probs: str
    embedding: str


@dataclass
class _Context:
    """What every section reads: the run's all-tick scores, its rankings, window and noisy-label result."""

    ledger: Ledger
    run: str
    stream: str
    top: int
    scores: pa.Table
    hard: pa.Table
    easy: pa.Table
    window: Window | LedgerError
    noisy: NoisyLabels | LedgerError
    x: np.ndarray  # the tick axis: epochs when they increase, else tick indices
    xlabel: str
    images: _figures.Images | None

    @property
    def flagged(self) -> set[int]:
        return set(self.noisy.flagged_ids.tolist()) if isinstance(self.noisy, NoisyLabels) else set()


def _render(ledger: Ledger, run: str | None, runs: Sequence[str] | None, images: Any, options: _Options) -> str:
    stream, top = options.stream, options.top
    all_runs = ledger.runs
    if not all_runs:
        raise ShapeMismatchError(f"ledger {ledger.path} has no runs to report on; log one with ledger.run(...)")
    chosen = run if run is not None else all_runs[0]
    logged = ledger.streams(chosen)["stream"].to_pylist()
    if stream not in logged:
        raise UnknownStreamError(f"run {chosen!r} has no committed stream {stream!r}; pass stream= one of {logged}")
    ticks = ledger.ticks(chosen)
    if ticks.num_rows == 0:
        raise ShapeMismatchError(f"run {chosen!r} has no committed ticks yet; report on it after run.end_epoch()")
    pictures = _figures.Images(images, ledger.n_samples) if images is not None else None
    epochs = ticks["epoch"].to_numpy()
    by_epoch = bool(np.all(np.diff(epochs) > 0))
    window: Window | LedgerError
    noisy: NoisyLabels | LedgerError
    try:
        window = memorization_window(ledger, chosen, stream)
    except LedgerError as err:  # e.g. an element stream: shown as a note in its section
        window = err
    try:
        noisy = flag_noisy(ledger, chosen, stream, ticks=window.ticks if isinstance(window, Window) else None)
    except LedgerError as err:
        noisy = err
    ctx = _Context(
        ledger, chosen, stream, top, ledger.scores(chosen, stream), ledger.top(top, chosen, stream),
        ledger.top(top, chosen, stream, hardest=False), window, noisy,
        epochs if by_epoch else ticks["tick"].to_numpy(), "epoch" if by_epoch else "tick", pictures,
    )
    near = (neighbour_table(ledger, chosen, stream, options.embedding, options.neighbour_rows, options.neighbour_k)
            if has_stream(ledger, chosen, options.embedding) else None)
    if pictures is not None:
        shown = [ctx.hard["sample_id"].to_numpy(), ctx.easy["sample_id"].to_numpy()]
        if isinstance(noisy, NoisyLabels):
            shown.append(noisy.table["sample_id"].to_numpy()[:top])
        if isinstance(near, pa.Table):
            shown += [near["query_id"].to_numpy(), near["neighbour_id"].to_numpy()]
        pictures.set_range(ledger._index.rows(np.concatenate(shown)))
    correlated = list(runs) if runs is not None else [r for r in all_runs if stream in ledger.streams(r)["stream"].to_pylist()]
    sections = [
        ("summary", "Summary", _summary(ctx, all_runs, run is None)),
        ("classes", "Per-class difficulty", _per_class(ctx)),
        ("hardest", "Hardest samples", _gallery(ctx, ctx.hard, hardest=True)),
        ("easiest", "Easiest samples", _gallery(ctx, ctx.easy, hardest=False)),
        ("curves", "Loss curves of the hardest samples", _curves(ctx)),
        ("clusters", "Loss-curve clusters", _clusters(ctx)),
    ]
    if near is not None:
        sections.append(("neighbours", "Nearest neighbours of the hardest samples", neighbours_section(
            ledger, near, stream=stream, embedding=options.embedding, tick=ticks.num_rows - 1,
            action=ctx.scores["action"].to_numpy(zero_copy_only=False), images=pictures)))
    sections += [("noisy", "Noisy-label candidates", _noisy(ctx)), ("window", "Memorization window", _window(ctx))]
    if has_stream(ledger, chosen, options.probs):
        sections.append(("entropy", "Action vs entropy", entropy_section(ledger, chosen, stream, options.probs)))
    sections.append(("correlations", "Run correlations", _correlations(ctx, correlated)))
    return _page(ctx, sections)


# --- sections -----------------------------------------------------------------------------------------------
def _summary(ctx: _Context, all_runs: list[str], defaulted: bool) -> str:
    ledger, s = ctx.ledger, ctx.ledger._samples
    action = ctx.scores["action"].to_numpy(zero_copy_only=False)
    ticks = ledger.ticks(ctx.run)
    rows: list[list[Any]] = [["ledger", str(ledger.path)], ["samples", f"{ledger.n_samples:,}"]]
    if s.classes is not None:
        rows.append(["classes", f"{len(s.classes)} ({', '.join(s.classes[:20])}{', ...' if len(s.classes) > 20 else ''})"])
    elif s.label is not None:
        rows.append(["classes", f"{len(np.unique(s.label))} labels (no class names)"])
    if s.split is not None and s.splits is not None:
        counts = np.bincount(s.split, minlength=len(s.splits))
        rows.append(["splits", ", ".join(f"{name} {c:,}" for name, c in zip(s.splits, counts))])
    rows.append(["runs", f"{len(all_runs)} ({', '.join(all_runs)})"])
    note = f" (the first of {len(all_runs)} runs; choose one with run= or --run)" if defaulted and len(all_runs) > 1 else ""
    rows.append(["reported run", ctx.run + note])
    rows.append(["ticks", (f"{ticks.num_rows} ({ctx.xlabel}s {ctx.x[0]}..{ctx.x[-1]}; {ticks['step'][-1].as_py():,} "
                           f"optimizer steps; {ticks['wall'][-1].as_py():.1f} s of training)")])
    streams = ledger.streams(ctx.run)
    rows.append(["streams", ", ".join(
        f"{n}{tuple(e) if e else ''} ({d})" for n, d, e in
        zip(streams["stream"].to_pylist(), streams["dtype"].to_pylist(), streams["element_shape"].to_pylist())
    )])
    rows.append(["reported stream", ctx.stream])
    rows.append(["observed samples", f"{int((ctx.scores['n_obs'].to_numpy() > 0).sum()):,} of {ledger.n_samples:,}"])
    if np.isfinite(action).any():
        lo, med, hi = np.nanquantile(action, [0.0, 0.5, 1.0])
        rows.append(["action (all ticks, Δt = 1)", f"min {lo:.4g}, median {med:.4g}, max {hi:.4g}"])
    rows += [[f"run attribute {k}", _short(v)] for k, v in ledger.run_attrs(ctx.run).items()]
    return _figures.table([], rows)


def _per_class(ctx: _Context) -> str:
    action = ctx.scores["action"].to_numpy(zero_copy_only=False)
    observed = ~np.isnan(action)
    if not observed.any():
        return _figures.note("No sample was observed in this run: nothing to show.")
    labels = ctx.ledger._samples.label
    if labels is None:
        groups = [("all", action[observed])]
    else:
        order = np.argsort(labels[observed], kind="stable")  # group by label in O(N log N), not O(N × classes)
        present, starts = np.unique(labels[observed][order], return_index=True)
        groups = [(class_name(ctx.ledger, int(c)), v) for c, v in zip(present, np.split(action[observed][order], starts[1:]))]
    medians = np.array([np.median(v) for _, v in groups])
    hardest_first = np.argsort(-medians, kind="stable")
    shown, selection = groups, ""
    if len(groups) > _MAX_CLASSES_SHOWN:
        half = _MAX_CLASSES_SHOWN // 2
        shown = [groups[i] for i in np.concatenate([hardest_first[:half], hardest_first[-half:]])]
        selection = f" Of {len(groups)} classes, the {half} with the highest and the {half} with the lowest median are shown."
    png = _figures.class_violins(shown, ylabel=f"action (Σ {ctx.stream} over ticks)")
    caption = (f"Distribution of the action (the {ctx.stream} summed over all {ctx.x.size} ticks, Δt = 1) of the "
               f"{int(observed.sum()):,} observed samples, by assigned label; white dot: median, black bar: "
               f"quartiles.{selection} Mirrors Fig 6a of {_PAPER} (relative difficulty of each class).")
    rows = [[groups[i][0], groups[i][1].size, float(np.mean(groups[i][1])), float(medians[i]),
             float(np.quantile(groups[i][1], 0.9))] for i in hardest_first[:100]]
    note = "" if labels is not None else _figures.note("The ledger has no labels: one distribution over all samples.")
    return (note + _figures.figure_html(png, caption, "per-class distributions of action")
            + _figures.table(["class (hardest first)", "n", "mean action", "median action", "90th percentile"], rows))


def _gallery(ctx: _Context, table: pa.Table, *, hardest: bool) -> str:
    if table.num_rows == 0:
        return _figures.note("No sample was observed in this run.")
    ids = table["sample_id"].to_numpy()
    rows = ctx.ledger._index.rows(ids)
    action = table["action"].to_numpy()
    flagged = ctx.flagged
    caption = (f"The {table.num_rows} samples with the {'highest' if hardest else 'lowest'} action (Σ {ctx.stream} "
               f"over all ticks), {'hardest' if hardest else 'easiest'} first, with id, assigned class, split and "
               f"action{'; flagged: a noisy-label candidate (below)' if isinstance(ctx.noisy, NoisyLabels) else ''}. "
               f"Mirrors Fig {1 if hardest else 4} of {_PAPER}.")
    if ctx.images is not None:
        cards = "".join(
            f'<div class="card">{ctx.images.tag(int(row), f"sample {sid}")}<div>#{rank} id {sid}</div>'
            f"<div>{html.escape(label_of(ctx.ledger, int(row)) + _split_of(ctx, int(row), ' · '))}</div>"
            f"<div>action {a:.4g}</div>{'<div class=flag>flagged</div>' if int(sid) in flagged else ''}</div>"
            for rank, (sid, row, a) in enumerate(zip(ids, rows, action), start=1)
        )
        return f'<figure><div class="gallery">{cards}</div><figcaption>{html.escape(caption)}</figcaption></figure>'
    body = [[rank, int(sid), label_of(ctx.ledger, int(row)), _split_of(ctx, int(row)), float(a), float(v), float(last),
             "yes" if int(sid) in flagged else ""]
            for rank, (sid, row, a, v, last) in enumerate(
                zip(ids, rows, action, table["variance"].to_numpy(), table["last"].to_numpy()), start=1)]
    return (_figures.table(["rank", "sample_id", "class", "split", "action", "variance", f"last {ctx.stream}", "flagged"], body)
            + _figures.caption(caption + " Pass images=... (or --images FILE.npz) to see thumbnails."))


def _curves(ctx: _Context) -> str:
    if ctx.hard.num_rows == 0:
        return _figures.note("No sample was observed in this run.")
    ids = ctx.hard["sample_id"].to_numpy()
    curves = _trajectories(ctx, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a tick where none of them was logged stays NaN
        reference = np.nanmean(_trajectories(ctx, ctx.easy["sample_id"].to_numpy()), axis=0)
    rows = ctx.ledger._index.rows(ids)
    titles = [f"id {sid} · {label_of(ctx.ledger, int(r))} · action {a:.3g}" + (" · flagged" if int(sid) in ctx.flagged else "")
              for sid, r, a in zip(ids, rows, ctx.hard["action"].to_numpy())]
    stop = ctx.window.stop if isinstance(ctx.window, Window) and ctx.window.stop < ctx.x.size else None
    png = _figures.curve_grid(
        ctx.x, curves, titles, ylabel=ctx.stream, xlabel=ctx.xlabel, reference=reference,
        reference_label=f"mean of the {ctx.easy.num_rows} easiest", window_stop=None if stop is None else ctx.x[stop - 1],
    )
    shade = f" Grey background: after the memorization window ({ctx.xlabel} {ctx.x[stop - 1]})." if stop else ""
    caption = (f"The {ctx.stream} of each of the {ctx.hard.num_rows} hardest samples at every {ctx.xlabel} (red), and "
               f"the mean curve of the {ctx.easy.num_rows} easiest (dashed grey); panel titles: sample id, assigned "
               f"class, action.{shade} Mirrors Fig 3 of {_PAPER}.")
    return _figures.figure_html(png, caption, "loss curves of the hardest samples")


def _clusters(ctx: _Context) -> str:
    try:
        from .analysis.clusters import cluster_curves
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}.analysis.clusters":
            raise
        return _figures.note("Not computed: this installation of lossledger has no lossledger.analysis.clusters module "
                     "(loss-curve clustering), so no clusters are shown.")
    try:
        result = cluster_curves(ctx.ledger, ctx.run, ctx.stream, k=3, normalize=True)
    except LedgerError as err:
        return _figures.note(f"Not computed: {err}")
    centres = np.asarray(result.centres, dtype=np.float64)
    members = result.members.sort_by([("cluster", "ascending"), ("rank", "ascending")])
    closest: list[tuple[int, int, float]] = []
    for c in range(centres.shape[0]):
        part = members.filter(pc.equal(members["cluster"], c)).slice(0, 3)
        closest += [(c, int(sid), float(d)) for sid, d in zip(part["sample_id"].to_pylist(), part["distance"].to_pylist())]
    ids = np.array([sid for _, sid, _ in closest], dtype=np.int64)
    x = ctx.x[np.asarray(result.ticks)]
    curves = _trajectories(ctx, ids)[:, np.asarray(result.ticks)] if ids.size else np.zeros((0, x.size))
    with np.errstate(invalid="ignore", divide="ignore"):  # as cluster_curves(normalize=True): a curve / its peak
        peak = np.nanmax(np.abs(curves), axis=1, keepdims=True) if ids.size else np.ones((0, 1))
        curves = np.where(peak > 0, curves / peak, curves)
    png = _figures.cluster_plot(x, centres, [(c, curve) for (c, _, _), curve in zip(closest, curves)],
                                ylabel=f"{ctx.stream} / its peak", xlabel=ctx.xlabel)
    sizes = np.bincount(result.assignments["cluster"].drop_null().to_numpy(), minlength=centres.shape[0])
    caption = (f"k-means (k = {centres.shape[0]}) of the per-sample {ctx.stream} curves, each divided by its own peak "
               "so that curves are compared by shape: the cluster centres (thick; numbered by their mean, so cluster 0 "
               f"falls fastest) and the three samples closest to each centre (thin, same colour). Mirrors Fig 2 of "
               f"{_PAPER}.")
    centre_rows = [[c, int(sizes[c]), float(v[0]), float(v[-1]), float(np.mean(v))] for c, v in enumerate(centres)]
    member_rows = [[c, sid, label_of(ctx.ledger, int(r)), d] for (c, sid, d), r in zip(closest, ctx.ledger._index.rows(ids))]
    return (_figures.figure_html(png, caption, "loss-curve clusters")
            + _figures.table(["cluster", "samples", "centre at first tick", "centre at last tick", "centre mean"], centre_rows)
            + _figures.table(["cluster", "sample_id", "class", "distance to centre"], member_rows))


def _noisy(ctx: _Context) -> str:
    if not isinstance(ctx.noisy, NoisyLabels):
        return _figures.note(f"Not computed: {ctx.noisy}")
    result, table, window = ctx.noisy, ctx.noisy.table, ctx.window
    span = f"ticks {window.start}..{window.stop - 1} (the memorization window)" if isinstance(window, Window) else "all ticks"
    groups = [("candidates" + (" (split train)" if _split_mask(ctx.ledger, ("train",)) is not None else ""),
               table["action"].to_numpy())]
    validation = _split_mask(ctx.ledger, VALIDATION_SPLITS)
    if validation is not None:
        windowed = ctx.ledger.scores(ctx.run, ctx.stream, ticks=window.ticks if isinstance(window, Window) else None)
        values = windowed["action"].to_numpy(zero_copy_only=False)
        if (held_out := values[validation & ~np.isnan(values)]).size:
            groups.append(("validation (not trained on)", held_out))
    png = _figures.action_histogram(groups, threshold=result.threshold, xlabel=f"action over {span}")
    caption = (f"Distribution of the action over {span} of the candidate samples"
               + (" and of the validation samples" if len(groups) > 1 else "")
               + f"; dashed: the {result.method} threshold {result.threshold:.4g}, above which a sample is flagged. "
               f"Mirrors Fig 12 of {_PAPER} (training samples with wrong labels accumulate more action).")
    n_flagged = len(ctx.flagged)
    facts = _figures.table([], [
        ["threshold", "two-component Gaussian mixture on log-action: the high component's posterior ≥ 0.5"
         if result.method == "mixture" else result.method],
        ["ticks summed", span],
        ["threshold (action)", f"{result.threshold:.6g}"],
        ["flagged", f"{n_flagged:,} of {table.num_rows:,} candidates ({n_flagged / max(table.num_rows, 1):.1%})"],
    ])
    shown = table.slice(0, ctx.top)
    ids = shown["sample_id"].to_numpy()
    body = []
    for rank, (sid, r, a, p, f) in enumerate(zip(ids, ctx.ledger._index.rows(ids), shown["action"].to_numpy(),
                                                 shown["p_noisy"].to_pylist(), shown["flagged"].to_pylist()), 1):
        image = [ctx.images.tag(int(r), f"sample {sid}")] if ctx.images is not None else []
        body.append([rank, int(sid), *image, label_of(ctx.ledger, int(r)), float(a), "" if p is None else float(p),
                     "yes" if f else ""])
    headers = ["rank", "sample_id", *(["image"] if ctx.images is not None else []), "class", "action", "p(noisy)",
               "flagged"]
    return (facts + _figures.figure_html(png, caption, "distribution of action with the noisy-label threshold")
            + f"<h3>The {shown.num_rows} candidates with the highest action</h3>" + _figures.table(headers, body))


def _window(ctx: _Context) -> str:
    window = ctx.window
    if not isinstance(window, Window):
        return _figures.note(f"Not computed: {window}")
    curve = window.curve
    validation = window.method == "validation"
    png = _figures.window_plot(
        curve["tick"].to_numpy(), curve["statistic"].to_numpy(zero_copy_only=False),
        curve["smoothed"].to_numpy(zero_copy_only=False), window.stop,
        ylabel="validation mean loss" if validation else "separability (Otsu ratio of log-losses)",
    )
    how = ("the smoothed mean loss of the validation split is lowest" if validation
           else "the smoothed per-tick distribution of training log-losses is most bimodal")
    end = (f"ends at tick {window.stop - 1}, where {how}: after it the network starts to memorize wrong labels and "
           "their losses fall" if window.stop < ctx.x.size else
           f"is the whole run: {how} at the last tick, so no onset of memorization was seen")
    caption = (f"The window of ticks {window.start}..{window.stop - 1} of {ctx.x.size} {end}. The noisy-label "
               "candidates above sum the action over this window. Not a figure of the paper: lossledger's choice "
               "of which ticks to sum (docs/api.md).")
    return _figures.figure_html(png, caption, "memorization window")


def _correlations(ctx: _Context, runs: list[str]) -> str:
    if len(runs) < 2:
        return _figures.note(f"Not computed: correlations need at least two runs that logged {ctx.stream}; there is "
                     f"{len(runs)} ({', '.join(runs)}).")
    table = ctx.ledger.correlate(runs, ctx.stream, quantiles=list(_QUANTILES))
    pairs = list(dict.fromkeys(zip(table["run_a"].to_pylist(), table["run_b"].to_pylist())))
    groups = list(dict.fromkeys(table["group"].to_pylist()))[: _MAX_CLASSES_SHOWN + 1]
    plain: dict[tuple[str, str, str], float] = {}
    curves: dict[tuple[str, str], dict[float, float]] = {}
    for a, b, g, q, r in zip(*(table[c].to_pylist() for c in ("run_a", "run_b", "group", "quantile", "r"))):
        if q is None:
            plain[(a, b, g)] = r
        elif g == "all":
            curves.setdefault((a, b), {})[q] = r
    body = [[f"{a} vs {b}", *[plain.get((a, b, g), float("nan")) for g in groups]] for a, b in pairs[:50]]
    lines = [(f"{a} vs {b}", np.array([curves[(a, b)][q] for q in _QUANTILES])) for a, b in pairs[:10]]
    png = _figures.correlation_plot(np.array(_QUANTILES), lines, ylabel="Pearson r of action")
    caption = (f"Pearson correlation of the action between pairs of runs over the samples whose mean action in the pair "
               f"is in the top fraction shown (1 = all samples). Mirrors Fig 14 of {_PAPER}.")
    more = f" The first 50 of {len(pairs)} pairs are shown." if len(pairs) > 50 else ""
    return (_figures.table(["pair", *["overall" if g == "all" else g for g in groups]], body)
            + _figures.caption(f"Pearson r of the per-sample action between runs, overall and per class.{more} Mirrors "
                       f"Table 1 of {_PAPER}.") + _figures.figure_html(png, caption, "correlation against the top fraction"))


# --- helpers ------------------------------------------------------------------------------------------------
def _trajectories(ctx: _Context, ids: np.ndarray) -> np.ndarray:
    """(len(ids), T) float64 curves; an element stream is averaged over the elements observed at the tick."""
    values = ctx.ledger.trajectories(ctx.run, ctx.stream, ids=ids).astype(np.float64)
    if values.ndim > 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # no element observed at a tick: NaN, as in scores
            values = np.nanmean(values.reshape(values.shape[0], values.shape[1], -1), axis=2)
    return values


def _split_of(ctx: _Context, row: int, prefix: str = "") -> str:
    s = ctx.ledger._samples
    return "" if s.split is None or s.splits is None else prefix + str(s.splits[int(s.split[row])])


def _short(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else f"{text[:limit]} ... ({len(text):,} characters)"


def _page(ctx: _Context, sections: list[tuple[str, str, str]]) -> str:
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{key}">{html.escape(title)}</a>' for key, title, _ in sections)
    body = "".join(f'<section id="{key}"><h2>{html.escape(title)}</h2>{content}</section>'
                   for key, title, content in sections)
    name = html.escape(ctx.ledger.path.name)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>lossledger report: {name}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_figures.CSS}</style></head><body>'
        f"<header><h1>lossledger report: {name}</h1><p>run <b>{html.escape(ctx.run)}</b> · stream "
        f"<b>{html.escape(ctx.stream)}</b> · {ctx.ledger.n_samples:,} samples · {ctx.x.size} ticks · written {when} by "
        f"lossledger {__version__}</p><nav>{nav}</nav></header><main>{body}</main></body></html>\n"
    )
