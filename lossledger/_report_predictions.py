"""The sections of the HTML report drawn from what the model predicted and saw: action vs predictive entropy
(class probabilities, stream ``probs``) and the nearest neighbours of the hardest samples (features, stream
``embedding``). :mod:`lossledger.report` puts them on the page only when the run logged those streams.

Each ``*_section`` returns HTML; a computation that fails says why in a note, as the other sections do.
"""

from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from . import _figures
from .analysis import accuracy_vs_threshold, entropy_vs_action, neighbours
from .analysis.uncertainty import BY, HIGH_ACTION_LOW_ENTROPY, LOW_ACTION_HIGH_ENTROPY
from .analysis.window import VALIDATION_SPLITS
from .errors import LedgerError

if TYPE_CHECKING:
    from .ledger import Ledger

_PAPER = "Arriaga et al., Difficulty Estimation with Action Scores"
#: The stream of 0/1 correctness that the accuracy curves read (as the adapters and the demo log it).
CORRECT = "correct"
#: Thresholds of the accuracy curves (θ = 1/20 ... 1), and the ones listed in the table under them.
_GRID = 20
_TABLE_THRESHOLDS = (0.25, 0.5, 0.75, 1.0)
_NEITHER = "neither (between the thresholds)"
_MISSING = "no entropy or no action"


def has_stream(ledger: Ledger, run: str, stream: str) -> bool:
    """Whether ``run`` has a committed ``stream``."""
    return stream in ledger.streams(run)["stream"].to_pylist()


def class_name(ledger: Ledger, label: int) -> str:
    """The class name of ``label``, or the label itself when the ledger has no names for it."""
    classes = ledger.classes
    return str(classes[label]) if classes is not None and 0 <= label < len(classes) else str(label)


def label_of(ledger: Ledger, row: int) -> str:
    """The assigned class of the sample at ``row``; empty when the ledger has no labels."""
    labels = ledger._samples.label
    return "" if labels is None else class_name(ledger, int(labels[row]))


# --- action vs entropy (Fig 6b, 6c, 7) ------------------------------------------------------------------------
def entropy_section(ledger: Ledger, run: str, stream: str, probs: str) -> str:
    """The scatter of normalized action against predictive entropy with the regions of
    :func:`~lossledger.analysis.entropy_vs_action`, their counts, and :func:`accuracy_vs_threshold`'s curves.

    Memory: the analyses' O(N) tables (one run) and one block of probabilities; the scatter draws at most
    20,000 points."""
    try:
        joint = entropy_vs_action(ledger, [run], probs=probs, stream=stream)
    except LedgerError as err:
        return _figures.note(f"Not computed: {err}")
    limits = json.loads(joint.schema.metadata[b"lossledger"])
    action = joint["normalized_action"].to_numpy(zero_copy_only=False)
    entropy = joint["entropy"].to_numpy(zero_copy_only=False)
    if "action_high" not in limits:
        return _figures.note(f"Not computed: no sample has both an action of {stream!r} and class probabilities "
                             f"{probs!r} at the last tick of run {run!r}.")
    region = np.array(joint["region"].fill_null("").to_pylist(), dtype=object)
    both = np.isfinite(action) & np.isfinite(entropy)
    names = [_NEITHER, HIGH_ACTION_LOW_ENTROPY, LOW_ACTION_HIGH_ENTROPY]
    code = np.select([region == HIGH_ACTION_LOW_ENTROPY, region == LOW_ACTION_HIGH_ENTROPY], [1, 2], 0)
    boxes = [(limits["action_high"], 1.0, 0.0, limits["entropy_low"]),
             (0.0, limits["action_low"], limits["entropy_high"], float(np.nanmax(entropy[both])))]
    png = _figures.region_scatter(action[both], entropy[both], code[both], names, boxes,
                                  xlabel=f"normalized action (Σ {stream} over all ticks, min-max)",
                                  ylabel=f"predictive entropy of {probs} at the last tick (nats)")
    high, low = limits["high"], limits["low"]
    caption = (f"Each sample's action (the {stream} summed over all ticks, min-max normalized over the samples) "
               f"against the entropy of its class probabilities ({probs}) at the run's last tick, in nats. "
               f"\"High\" is at or above the {high:.0%} quantile, \"low\" at or below the {low:.0%} quantile "
               f"(dashed lines); the shaded corners are the two regions of entropy_vs_action: high action with low "
               f"entropy (confidently fitted yet hard: often wrong labels the network memorized) and low action "
               f"with high entropy (ambiguous yet easy to fit). Mirrors Figs 6b and 7 of {_PAPER}, for one run "
               "instead of an ensemble." + (" At most 20,000 points are drawn (a random subset); the counts are "
                                            "of all samples." if int(both.sum()) > 20_000 else ""))
    return (_figures.figure_html(png, caption, "normalized action against predictive entropy")
            + _region_counts(ledger, joint["sample_id"].to_numpy(), region, both)
            + _figures.table([], [
                ["action thresholds (normalized)", f"low ≤ {limits['action_low']:.4g}, high ≥ {limits['action_high']:.4g}"],
                ["entropy thresholds (nats)", f"low ≤ {limits['entropy_low']:.4g}, high ≥ {limits['entropy_high']:.4g}"],
            ])
            + _accuracy(ledger, run, stream, probs))


def _region_counts(ledger: Ledger, ids: np.ndarray, region: np.ndarray, both: np.ndarray) -> str:
    """How many samples fall in each region, overall and per split."""
    s = ledger._samples
    groups = [(HIGH_ACTION_LOW_ENTROPY, region == HIGH_ACTION_LOW_ENTROPY),
              (LOW_ACTION_HIGH_ENTROPY, region == LOW_ACTION_HIGH_ENTROPY),
              (_NEITHER, both & (region == "")), (_MISSING, ~both)]
    split_names = list(s.splits) if s.split is not None and s.splits is not None else []
    split = s.split[ledger._index.rows(ids)] if s.split is not None and split_names else None
    rows = []
    for name, mask in groups:
        if name == _MISSING and not mask.any():
            continue
        per_split = [int((mask & (split == i)).sum()) for i in range(len(split_names))] if split is not None else []
        rows.append([name, int(mask.sum()), *per_split])
    return _figures.table(["region", "samples", *[f"split {n}" for n in split_names]], rows)


def _accuracy(ledger: Ledger, run: str, stream: str, probs: str) -> str:
    """The accuracy-vs-threshold curves (Fig 6c) over the validation split when there is one."""
    if not has_stream(ledger, run, CORRECT):
        return _figures.note(f"No accuracy curves: run {run!r} has no {CORRECT!r} stream (log 0/1 correctness with "
                             f"run.log(ids, {CORRECT}=logits.argmax(1) == y)).")
    s = ledger._samples
    split = next((n for n in (s.splits or ()) if n.lower() in VALIDATION_SPLITS), None) if s.split is not None else None
    try:
        curves = accuracy_vs_threshold(ledger, [run], correct=CORRECT, by=BY, thresholds=_GRID, probs=probs,
                                       split=split, stream=stream)
    except LedgerError as err:
        return _figures.note(f"No accuracy curves: {err}")
    by = curves["by"].to_pylist()
    threshold, mean = curves["threshold"].to_numpy(), curves["accuracy_mean"].to_numpy(zero_copy_only=False)
    n = curves["n"].to_numpy()
    lines = [(name, threshold[[b == name for b in by]], mean[[b == name for b in by]]) for name in BY]
    png = _figures.accuracy_curves(lines, xlabel="threshold θ on the normalized score (samples with score ≤ θ kept)",
                                   ylabel=f"accuracy at the last tick ({CORRECT})")
    who = f"the {split} split" if split else "all samples (the ledger has no validation split)"
    caption = (f"Accuracy at the run's last tick (mean of {CORRECT}) of the samples of {who} whose normalized score "
               f"is at most θ, for the action and the variance of the {stream} over all ticks and the entropy of "
               f"{probs}, each min-max normalized over {who}. A score that ranks difficulty well keeps the accuracy "
               f"high for small θ. Mirrors Fig 6c of {_PAPER}, for one run (no confidence band).")
    rows = []
    for theta in _TABLE_THRESHOLDS:
        cells: list[object] = [theta]
        for name in BY:
            at = [i for i, (b, t) in enumerate(zip(by, threshold)) if b == name and t == theta]
            cells += [float(mean[at[0]]), int(n[at[0]])] if at else [float("nan"), 0]
        rows.append(cells)
    headers = ["θ", *[h for name in BY for h in (f"accuracy ({name} ≤ θ)", "n")]]
    return (_figures.figure_html(png, caption, "accuracy against the threshold on each normalized score")
            + _figures.table(headers, rows))


# --- nearest neighbours (Fig 5) ------------------------------------------------------------------------------
def neighbour_table(ledger: Ledger, run: str, stream: str, embedding: str, queries: int, k: int
                    ) -> pa.Table | LedgerError:
    """:func:`~lossledger.analysis.neighbours` of the ``queries`` hardest samples (by action of ``stream``) with
    features in ``embedding`` at the last tick, or the error that stopped it. Memory: one scan slab."""
    try:
        return neighbours(ledger, run, k=k, stream=embedding, top=queries, score_stream=stream)
    except LedgerError as err:
        return err


def neighbours_section(ledger: Ledger, table: pa.Table | LedgerError, *, stream: str, embedding: str, tick: int,
                       action: np.ndarray, images: _figures.Images | None) -> str:
    """One row per query: the sample (thumbnail, or id and class) and its neighbours with class and distance.

    ``action``: (N,) the action of every ledger row, for the queries' captions."""
    if isinstance(table, LedgerError):
        return _figures.note(f"Not computed: {table}")
    query_ids = list(dict.fromkeys(table["query_id"].to_pylist()))
    if not query_ids:
        return _figures.note("Not computed: no hard sample has neighbours with features.")
    query = table["query_id"].to_numpy()
    found = table["neighbour_id"].to_numpy()
    distance = table["distance"].to_numpy()
    k = max(int((query == q).sum()) for q in query_ids)
    rows = []
    for rank, qid in enumerate(query_ids, start=1):
        mine = query == qid
        q_row = int(ledger._index.rows(np.array([qid]))[0])
        near = list(zip(found[mine].tolist(), ledger._index.rows(found[mine]).tolist(), distance[mine].tolist()))
        rows.append((rank, qid, q_row, near))
    same = sum(label_of(ledger, r) == label_of(ledger, q_row) for _, _, q_row, near in rows for _, r, _ in near)
    total = sum(len(near) for *_, near in rows)
    caption = (f"The {len(rows)} hardest samples (highest action of {stream} over all ticks) that have features, "
               f"each followed by its {k} nearest neighbours, nearest first: exact Euclidean distance between the "
               f"{embedding} vectors logged at tick {tick} (the run's last). A neighbour of another class than its "
               f"hard sample is marked in red; {same} of the {total} neighbours share their hard sample's class. "
               f"Mirrors Fig 5 of {_PAPER} (what the network confuses a hard sample with).")
    if images is None:
        body = [[rank, qid, label_of(ledger, q_row), float(action[q_row]),
                 *[_neighbour_cell(ledger, nid, r, d, q_row) for nid, r, d in near],
                 *[""] * (k - len(near))]
                for rank, qid, q_row, near in rows]
        headers = ["rank", "sample_id", "class", "action", *[f"neighbour {i}" for i in range(1, k + 1)]]
        return (_figures.table(headers, body)
                + _figures.caption(caption + " Each neighbour: id · class · distance. Pass images=... to see "
                                   "thumbnails."))
    lines = []
    for rank, qid, q_row, near in rows:
        cards = [(f'<div class="card query">{images.tag(q_row, f"sample {qid}")}<div>#{rank} id {qid}</div>'
                  f"<div>{html.escape(label_of(ledger, q_row))}</div><div>action {action[q_row]:.4g}</div></div>")]
        for nid, r, d in near:
            other = ' class="flag"' if label_of(ledger, r) != label_of(ledger, q_row) else ""
            cards.append(f'<div class="card">{images.tag(r, f"neighbour {nid} of {qid}")}<div>id {nid}</div>'
                         f"<div{other}>{html.escape(label_of(ledger, r))}</div><div>d {d:.4g}</div></div>")
        lines.append(f'<div class="gallery nn">{"".join(cards)}</div>')
    return f'<figure>{"".join(lines)}<figcaption>{html.escape(caption)}</figcaption></figure>'


def _neighbour_cell(ledger: Ledger, nid: int, row: int, d: float, q_row: int) -> _figures.Html:
    text = html.escape(f"{nid} · {label_of(ledger, row)} · {d:.4g}")
    other = label_of(ledger, row) != label_of(ledger, q_row)
    return _figures.Html(f'<span class="flag">{text}</span>' if other else text)
