"""The ``lossledger`` command line (``python -m lossledger`` works the same)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from . import __version__
from ._progress import reporting, terminal_bar
from ._render import render_csv, render_text
from .analysis import cluster_curves, curriculum_chunks, neighbours
from .errors import InputPathError, LedgerError
from .export import check_output_path, write_parquet
from .ledger import open as open_ledger


def _info(args: argparse.Namespace) -> int:
    print(open_ledger(args.path).info())
    return 0


def _top(args: argparse.Namespace) -> int:
    table = open_ledger(args.path).top(
        args.k, args.run, args.stream, by=args.by, dt=args.dt, hardest=not args.easiest, per_class=args.per_class
    )
    return _emit(table, args)


def _sql(args: argparse.Namespace) -> int:
    return _emit(open_ledger(args.path).sql(args.query), args)


def _export(args: argparse.Namespace) -> int:
    out = open_ledger(args.path).export(args.output, args.run, streams=args.stream, dt=args.dt)
    print(f"wrote {out}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    table = open_ledger(args.path).correlate(
        args.runs, args.stream, by_class=not args.overall, method=args.method, quantiles=args.quantiles, dt=args.dt,
        by=args.by,
    )
    return _emit(table, args)


def _report(args: argparse.Namespace) -> int:
    from .report import write_report  # matplotlib only for this command

    path = write_report(
        args.path, args.output, run=args.run, images=args.images, stream=args.stream, top=args.top,
        neighbour_rows=args.neighbour_rows, neighbour_k=args.neighbour_k,
    )
    print(f"wrote {path}")
    return 0


def _maps(args: argparse.Namespace) -> int:
    from .heatmaps import write_maps  # matplotlib only for this command

    ledger = open_ledger(args.path)
    images = _load_array(args.images)
    table = write_maps(ledger, ledger._only_run(args.run), args.out, stream=args.stream, top=args.top,
                       hardest=not args.easiest, images=images, labels=args.labels, prediction=args.prediction,
                       png=not args.npy_only)
    print(f"wrote {table.num_rows} sample map(s) to {args.out}")
    return 0


def _curriculum(args: argparse.Namespace) -> int:
    ledger = open_ledger(args.path)
    table = curriculum_chunks(ledger, ledger._only_run(args.run), args.chunks, stream=args.stream, ticks=args.ticks,
                              split=args.split, dt=args.dt)
    if args.summary:
        grouped = table.group_by("chunk").aggregate(
            [("sample_id", "count"), ("action", "mean"), ("action", "min"), ("action", "max")]
        ).sort_by("chunk")
        table = pa.table({"chunk": grouped["chunk"], "n": grouped["sample_id_count"],
                          "mean_action": grouped["action_mean"], "min_action": grouped["action_min"],
                          "max_action": grouped["action_max"]})
    return _emit(table, args)


def _clusters(args: argparse.Namespace) -> int:
    ledger = open_ledger(args.path)
    found = cluster_curves(ledger, ledger._only_run(args.run), args.stream, k=args.k, normalize=not args.raw,
                           ticks=args.ticks, batch_size=args.batch_size, n_members=args.members, seed=args.seed,
                           max_iter=args.max_iter)
    if args.show == "assignments":
        table = found.assignments
    elif args.show == "members":
        table = found.members
    elif args.show == "centres":
        k, n_ticks = found.centres.shape
        table = pa.table({"cluster": pa.array(np.repeat(np.arange(k), n_ticks), pa.int64()),
                          "tick": pa.array(np.tile(found.ticks, k), pa.int64()),
                          "value": pa.array(found.centres.ravel(), pa.float64())})
    else:
        table = _cluster_summary(found.assignments, found.centres)
    return _emit(table, args)


def _cluster_summary(assignments: pa.Table, centres: np.ndarray) -> pa.Table:
    """One row per cluster: size, share of the observed samples, mean distance to the centre, and the centre's
    first, largest and last value."""
    cluster = assignments["cluster"].to_numpy(zero_copy_only=False)
    observed = ~np.isnan(cluster.astype(np.float64))
    cluster = cluster[observed].astype(np.int64)
    distance = assignments["distance"].to_numpy(zero_copy_only=False)[observed]
    k = centres.shape[0]
    sizes = np.bincount(cluster, minlength=k)
    sums = np.bincount(cluster, weights=distance, minlength=k)
    return pa.table({
        "cluster": pa.array(np.arange(k), pa.int64()),
        "n": pa.array(sizes, pa.int64()),
        "share": pa.array(sizes / max(int(sizes.sum()), 1), pa.float64()),
        "mean_distance": pa.array(np.divide(sums, sizes, out=np.full(k, np.nan), where=sizes > 0), pa.float64()),
        "centre_first": pa.array(centres[:, 0], pa.float64()),
        "centre_max": pa.array(centres.max(axis=1), pa.float64()),
        "centre_last": pa.array(centres[:, -1], pa.float64()),
    })


def _neighbours(args: argparse.Namespace) -> int:
    ledger = open_ledger(args.path)
    table = neighbours(ledger, ledger._only_run(args.run), ids=args.ids, k=args.k, stream=args.stream,
                       features=_load_array(args.features), top=args.top, tick=args.tick,
                       score_stream=args.score_stream)
    return _emit(table, args)


def _load_array(path: str | None) -> Any:
    """The array in an .npy file (memory-mapped) or under key ``x`` of an .npz, or None."""
    if path is None:
        return None
    if not os.path.isfile(path):
        raise InputPathError(f"no file at {path}; pass the path of an existing .npy or .npz file")
    if path.endswith(".npz"):
        with np.load(path) as npz:
            return npz["x"]
    return np.load(path, mmap_mode="r")


def _fractions(text: str) -> list[float]:
    try:
        return [float(q) for q in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as 0.1,0.5, got {text!r}") from None


def _ids(text: str) -> list[int]:
    try:
        return [int(i) for i in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sample ids such as 3,17,42, got {text!r}") from None


def _tick_window(text: str) -> slice:
    """``START:STOP`` (either may be empty; negative counts from the end) as a slice of ticks."""
    try:
        start, stop = text.split(":")
        return slice(int(start) if start else None, int(stop) if stop else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a tick window START:STOP such as 0:30 or :-1, got {text!r}") from None


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo  # imports scikit-learn (and torch when present) only for this command

    run_demo(args.out, epochs=args.epochs, noise=args.noise, seed=args.seed, dataset=args.dataset)
    return 0


def _emit(table: pa.Table, args: argparse.Namespace) -> int:
    if args.format == "parquet":
        write_parquet(check_output_path(args.output), table.schema, [table])
        return 0
    out = open(args.output, "w", newline="") if args.output else sys.stdout  # noqa: SIM115
    try:
        if args.format == "csv":
            out.write(render_csv(table))
        elif args.format == "json":
            out.write(json.dumps(table.to_pylist(), default=str, allow_nan=True) + "\n")
        else:
            out.write(render_text(table) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table",
                        help="output format (default: a human-readable table)")
    parser.add_argument("-o", "--output", help="write to this file instead of standard output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lossledger", description="Per-sample loss trajectories of training runs, and the scores they give."
    )
    parser.add_argument("--version", action="version", version=f"lossledger {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser("demo", help="train a model on digits with flipped labels, log it, find the flips")
    demo.add_argument("--out", default="lossledger-demo", help="output folder (default: ./lossledger-demo)")
    demo.add_argument("--epochs", type=int, default=100, help="training epochs (default: 100)")
    demo.add_argument("--noise", type=float, default=0.2, help="fraction of training labels flipped (default: 0.2)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the split, the flips and the model (default: 0)")
    demo.add_argument("--dataset", help="an .npz with arrays x (n, ...) and y (n,) instead of digits")
    demo.set_defaults(handler=_demo)
    info = commands.add_parser("info", help="summarize a ledger: samples, classes, runs, ticks, streams")
    info.add_argument("path", help="the ledger folder")
    info.set_defaults(handler=_info)

    top = commands.add_parser("top", help="the hardest (or easiest) samples of a run by a score")
    top.add_argument("path", help="the ledger folder")
    top.add_argument("--run", help="the run (may be omitted when the ledger has one run)")
    top.add_argument("--stream", default="loss", help="the stream to score (default: loss)")
    top.add_argument("-k", type=int, default=20, help="how many samples (per class with --per-class); default 20")
    top.add_argument("--by", default="action", help="score column to rank by (default: action)")
    top.add_argument("--dt", choices=["epoch", "step", "wall"], default="epoch", help="Δt of a tick (default: epoch)")
    top.add_argument("--easiest", action="store_true", help="lowest scores first")
    top.add_argument("--per-class", action="store_true", help="k samples per class")
    _add_output(top)
    top.set_defaults(handler=_top)

    sql = commands.add_parser("sql", help="run a DuckDB query over the views samples, runs, ticks, scores, losses")
    sql.add_argument("path", help="the ledger folder")
    sql.add_argument("query", help="the SQL query, e.g. \"SELECT class, avg(action) FROM scores JOIN samples USING "
                     "(sample_id) GROUP BY class\"")
    _add_output(sql)
    sql.set_defaults(handler=_sql)

    compare = commands.add_parser("compare", help="correlate per-sample scores between runs (the paper's Table 1)")
    compare.add_argument("path", help="the ledger folder")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="two or more runs")
    compare.add_argument("--stream", default="loss", help="the stream to score (default: loss)")
    compare.add_argument("--by", default="action", help="score column to correlate (default: action)")
    compare.add_argument("--method", choices=["pearson", "spearman"], default="pearson", help="default: pearson")
    compare.add_argument("--overall", action="store_true", help="only the correlation over all samples, not per class")
    compare.add_argument("--quantiles", type=_fractions, help="also correlate the top-q samples, e.g. 0.1,0.5 (Fig 14)")
    compare.add_argument("--dt", choices=["epoch", "step", "wall"], default="epoch", help="Δt of a tick (default: epoch)")
    _add_output(compare)
    compare.set_defaults(handler=_compare)

    report = commands.add_parser("report", help="write a self-contained HTML report of a run (figures embedded)")
    report.add_argument("path", help="the ledger folder")
    report.add_argument("output", help="the .html file to write (replaced atomically)")
    report.add_argument("--run", help="the run (default: the only run, or the first by name)")
    report.add_argument("--images", help="an .npz (key x) or .npy of images, one per sample in ledger order")
    report.add_argument("--stream", default="loss", help="the stream to score (default: loss)")
    report.add_argument("--top", type=int, default=16, help="samples in each gallery (default: 16)")
    report.add_argument("--neighbour-rows", type=int, default=8,
                        help="hardest samples shown with their nearest neighbours, when the run logged an embedding "
                        "(default: 8)")
    report.add_argument("--neighbour-k", type=int, default=8, help="neighbours per row (default: 8)")
    report.set_defaults(handler=_report)

    maps = commands.add_parser("maps", help="write pixel action maps (PNG panels and .npy) of the hardest samples")
    maps.add_argument("path", help="the ledger folder")
    maps.add_argument("out", help="the output folder (created if missing)")
    maps.add_argument("--run", help="the run (may be omitted when the ledger has one run)")
    maps.add_argument("--stream", default="pixel", help="the per-pixel stream (default: pixel)")
    maps.add_argument("--top", type=int, default=10, help="how many samples (default: 10)")
    maps.add_argument("--easiest", action="store_true", help="the easiest samples instead")
    maps.add_argument("--images", help="input images: .npy (N, H, W[, C]) or .npz with key x, in ledger order")
    maps.add_argument("--labels", help="the stream of run holding label masks (class indices)")
    maps.add_argument("--prediction", help="the stream of run holding predicted masks")
    maps.add_argument("--npy-only", action="store_true", help="only the .npy maps (no matplotlib needed)")
    maps.set_defaults(handler=_maps)

    curriculum = commands.add_parser(
        "curriculum", help="split the samples into class-balanced chunks of increasing action (the paper's Fig 13)",
        description="Each class's samples, by action ascending, are cut into CHUNKS parts; part j of every class goes "
        "to chunk j (0 = easiest). One row per sample: sample_id, label, action (stream units × Δt), chunk; with "
        "--summary one row per chunk. Samples never observed are left out. The greedy curriculum trains a model "
        "per step: Python only (lossledger.analysis.greedy_curriculum).",
    )
    curriculum.add_argument("path", help="the ledger folder")
    curriculum.add_argument("--run", help="the run (may be omitted when the ledger has one run)")
    curriculum.add_argument("--chunks", type=int, default=10, help="number of chunks (default: 10)")
    curriculum.add_argument("--stream", default="loss", help="the stream whose action sorts the samples (default: loss)")
    curriculum.add_argument("--split", help="only the samples of this split, e.g. train (default: every sample)")
    curriculum.add_argument("--ticks", type=_tick_window, help="sum the action over ticks START:STOP (default: all)")
    curriculum.add_argument("--dt", choices=["epoch", "step", "wall"], default="epoch",
                            help="Δt of a tick (default: epoch)")
    curriculum.add_argument("--summary", action="store_true",
                            help="one row per chunk: chunk, n, mean_action, min_action, max_action")
    _add_output(curriculum)
    curriculum.set_defaults(handler=_curriculum)

    clusters = commands.add_parser(
        "clusters", help="k-means of the per-sample curves of a stream (the paper's Fig 2)",
        description="Mini-batch k-means of each sample's curve over the ticks (NaN ticks interpolated; never-observed "
        "samples left out). Curves are divided by their own peak (values are fractions of it) unless --raw (stream "
        "units). Clusters are numbered by the mean of their centre: 0 lowest. --show summary (default): cluster, n, "
        "share (of observed samples), mean_distance (Euclidean, curve units), centre_first, centre_max, "
        "centre_last; members: the closest samples of each centre; assignments: every sample's cluster and "
        "distance; centres: cluster, tick, value.",
    )
    clusters.add_argument("path", help="the ledger folder")
    clusters.add_argument("--run", help="the run (may be omitted when the ledger has one run)")
    clusters.add_argument("--stream", default="loss", help="a scalar stream (default: loss)")
    clusters.add_argument("-k", type=int, default=3, help="number of clusters (default: 3)")
    clusters.add_argument("--raw", action="store_true", help="cluster raw values (stream units), not peak fractions")
    clusters.add_argument("--ticks", type=_tick_window, help="only ticks START:STOP (default: every tick)")
    clusters.add_argument("--show", choices=["summary", "members", "assignments", "centres"], default="summary",
                          help="what to print (default: summary)")
    clusters.add_argument("--members", type=int, default=5, help="closest samples per centre (default: 5)")
    clusters.add_argument("--seed", type=int, default=0, help="seed of the init (default: 0)")
    clusters.add_argument("--batch-size", type=int, default=4096, help="samples per mini-batch (default: 4096)")
    clusters.add_argument("--max-iter", type=int, default=100, help="most passes over the data (default: 100)")
    _add_output(clusters)
    clusters.set_defaults(handler=_clusters)

    near = commands.add_parser(
        "neighbours", help="nearest neighbours of the hardest samples in a feature space (the paper's Fig 5)",
        description="The K nearest neighbours (exact, Euclidean, in feature units) of each query sample, in the "
        "features logged in --stream at --tick or in --features. One row per query and rank: query_id, "
        "query_label, rank (1 = nearest), neighbour_id, neighbour_label, distance.",
    )
    near.add_argument("path", help="the ledger folder")
    near.add_argument("--run", help="the run (may be omitted when the ledger has one run)")
    near.add_argument("--ids", type=_ids, help="query sample ids, e.g. 3,17,42 (default: the --top hardest)")
    near.add_argument("-k", type=int, default=5, help="neighbours per query (default: 5)")
    near.add_argument("--top", type=int, default=20,
                      help="default queries: this many hardest samples by action of --score-stream (default: 20)")
    near.add_argument("--stream", default="embedding",
                      help="the stream of feature vectors, element shape (D,) (default: embedding)")
    near.add_argument("--tick", type=int, default=-1, help="the tick of the features (default: -1, the last)")
    near.add_argument("--features", help="instead of --stream: .npy (N, D) or .npz with key x, in ledger order")
    near.add_argument("--score-stream", default="loss", help="the stream that ranks the hardest (default: loss)")
    _add_output(near)
    near.set_defaults(handler=_neighbours)

    export = commands.add_parser("export", help="write the scores of runs, joined with the samples, to parquet")
    export.add_argument("path", help="the ledger folder")
    export.add_argument("output", help="the parquet file to write (replaced atomically)")
    export.add_argument("--run", action="append", help="a run to export (repeat for several; default: all)")
    export.add_argument("--stream", action="append", help="a stream to export (repeat; default: every stream)")
    export.add_argument("--dt", choices=["epoch", "step", "wall"], default="epoch", help="Δt of a tick (default: epoch)")
    export.set_defaults(handler=_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok, 1 a ledger error, 2 bad usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "format", None) == "parquet" and not args.output:
        parser.error("--format parquet needs --output FILE")
    try:
        with reporting(terminal_bar()):  # a progress bar over long scans, on a terminal only
            return int(args.handler(args))
    except LedgerError as err:
        print(f"lossledger {args.command}: error: {err}", file=sys.stderr)
        return 1
    except ImportError as err:
        print(f"lossledger {args.command}: error: {err}", file=sys.stderr)
        return 1
    except duckdb.Error as err:
        print(f"lossledger {args.command}: SQL error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
