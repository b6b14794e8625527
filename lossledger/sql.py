"""SQL over a ledger with DuckDB: the views ``samples``, ``runs``, ``ticks``, ``scores`` and ``losses``.

- ``samples(sample_id, label, class, split)``: one row per sample (columns the ledger has).
- ``runs(run, ticks, created, updated, attrs, <attr>...)``: one row per run; ``attrs`` is the user attributes
  as JSON text, and each top-level attribute is also a column (NULL where a run lacks it).
- ``ticks(run, tick, epoch, step, wall)``: committed ticks.
- ``scores(run, stream, dt, sample_id, label, action, variance, mean, first, last, min, max, n_obs)``: the
  per-sample scores of every committed stream of every run, for each ``dt`` in epoch/step/wall
  (computed on first use and read from the score cache after; see :meth:`Ledger.scores`). A sample never
  observed has NULL scores here (NaN in :meth:`Ledger.scores`), so aggregates skip it.
- ``losses(run, stream, tick, sample_id, value)``: every observed value of every scalar stream, one row each
  (unlogged NaNs are not rows), streamed lazily from the Zarr chunks at each scan (memory: a few chunks of
  ~1 MiB); float16 streams are read as float32. Element streams (pixels, embeddings) are not in this view.
  Filters on ``run``, ``stream``, ``tick`` and ``sample_id`` (``=``, ``IN (...)``, ranges) reach the reader,
  which then decodes only the chunks that may hold matching rows (:class:`LossesView`).

The views are read-only: nothing done through SQL changes the ledger.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from ._commit import list_runs, read_run_attrs
from ._scan import ChunkSource, read_chunks
from ._scoring import stored_scores_all
from .format import stream_key
from .scores import DT_MODES

if TYPE_CHECKING:
    from .ledger import Ledger

LOSSES_SCHEMA = pa.schema(
    [
        pa.field("run", pa.string()),
        pa.field("stream", pa.string()),
        pa.field("tick", pa.int32()),
        pa.field("sample_id", pa.int64()),
        pa.field("value", pa.float32()),
    ]
)
#: Pieces of the view that a filter is checked against are split this many ways at each level (ticks).
_SPLIT = 16
#: Row number of each sample, in the probe table of :class:`_Probe` (not a column of the view).
_ROW = "lossledger_row"
#: Never opened: the fragments of :func:`_satisfiable` only carry partition expressions, nothing is read.
_NOWHERE = pafs.LocalFileSystem()


class LossesView(ds.InMemoryDataset):
    """The ``losses`` view's data: a ``pyarrow.dataset.Dataset`` that reads the ledger afresh at every scan.

    DuckDB scans a registered Dataset through ``type(dataset).scanner(dataset, columns=..., filter=...)``, with
    the query's filters on the view's columns as a pyarrow expression: ``sample_id IN (...)``, ``=``, ranges,
    comparisons on ``run``, ``stream``, ``tick``, and ANDs/ORs of those (not the filters a join or a subquery
    implies). :meth:`scanner` reads only the chunks that may hold rows passing the filter, and Arrow decides
    which: each (run, stream), each tick, and each chunk column is described by what all its rows satisfy
    (``run == r and stream == s``, ``tick == t``, ``sample_id`` between the chunk's least and greatest id),
    and the filter is simplified against that the way Arrow prunes dataset fragments by their partition
    expressions, so a piece is skipped only when Arrow proves no row of it can pass (:func:`_satisfiable`). The
    rows of the chunks read are then filtered exactly by the returned ``pyarrow.dataset.Scanner``.

    When the filter mentions ``sample_id`` and not ``value`` (``WHERE sample_id IN (...)``, with or without
    ``run``, ``stream``, ``tick``), the rows that pass are known before any chunk is read: the filter is
    evaluated on every sample id with the run, stream and tick filled in (:class:`_Probe`). A chunk is then
    read only if it holds a passing row, whatever the order of the ids, and only those rows are handed on.

    The base is an empty in-memory dataset of the view's schema: DuckDB needs a ``Dataset`` instance, and the
    Python methods (``to_table``, ``to_batches``, ``head``, ``take``, ``count_rows``) all scan through
    :meth:`scanner`. Consumers that bypass Python and read the C++ dataset (``Scanner.from_dataset``, Acero)
    would see it empty: scan the view through its methods.

    Memory: the chunks being read and those read ahead (:data:`lossledger._scan.READ_AHEAD_CHUNKS`, ~1 MiB
    each) and the record batches the consumer holds; never the (ticks x samples) matrix.
    """

    def __init__(self, ledger: Ledger, condition: pc.Expression | None = None) -> None:
        super().__init__(LOSSES_SCHEMA.empty_table())
        self._ledger = ledger
        self._condition = condition
        self._id_ranges: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def scanner(self, columns: Any = None, filter: pc.Expression | None = None, **kwargs: Any) -> ds.Scanner:
        """A one-shot ``pyarrow.dataset.Scanner`` over the ledger as committed now (``columns``/``filter`` as pyarrow's)."""
        condition = _and(self._condition, filter)
        names = [f.name for f in LOSSES_SCHEMA]
        if isinstance(columns, (list, tuple)):
            wanted = set(columns) | _referenced(condition)
            names = [name for name in names if name in wanted]
        schema = pa.schema([LOSSES_SCHEMA.field(name) for name in names])
        batches = self._batches(self._plan(condition), schema)
        return ds.Scanner.from_batches(batches, schema=schema, columns=columns, filter=condition, **kwargs)

    def filter(self, expression: pc.Expression) -> LossesView:
        """The view with ``expression`` applied at every scan, lazily."""
        return LossesView(self._ledger, _and(self._condition, expression))

    def get_fragments(self, filter: pc.Expression | None = None):
        return self._materialized().get_fragments(filter=filter)

    def join(self, *args: Any, **kwargs: Any) -> ds.InMemoryDataset:
        return self._materialized().join(*args, **kwargs)

    def join_asof(self, *args: Any, **kwargs: Any) -> ds.InMemoryDataset:
        return self._materialized().join_asof(*args, **kwargs)

    def sort_by(self, *args: Any, **kwargs: Any) -> ds.InMemoryDataset:
        return self._materialized().sort_by(*args, **kwargs)

    def replace_schema(self, schema: pa.Schema) -> ds.InMemoryDataset:
        return self._materialized().replace_schema(schema)

    def _materialized(self) -> ds.InMemoryDataset:
        """The view as an in-memory dataset, for pyarrow's operations that work on whole tables (memory: all of it)."""
        return ds.InMemoryDataset(self.to_table())

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        return self.scanner().to_reader().__arrow_c_stream__(requested_schema)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _losses_view_at, (str(self._ledger.path), self._ledger.storage_options, self._condition)

    # --- which chunks -----------------------------------------------------------------------------------
    def _plan(self, condition: pc.Expression | None) -> list[_Piece]:
        """What to read of the scalar streams of every run, given ``condition`` (None: everything)."""
        io = self._ledger._io
        refs = _referenced(condition)
        pieces = []
        for run in list_runs(io):
            commit = read_run_attrs(io, run)["commit"]
            for stream, record in sorted(commit["streams"].items()):
                if not record["element_shape"] and commit["ticks"]:
                    pieces.append((run, stream, commit["ticks"]))
        if condition is None or not pieces:
            keep = np.ones(len(pieces), bool)
        else:
            keep = _satisfiable(condition, [_where(run, stream) for run, stream, _ in pieces])
        plan = []
        shared: dict[tuple[str | None, str | None], np.ndarray] = {}
        for (run, stream, n_ticks), kept in zip(pieces, keep):
            if not kept:
                continue
            source = ChunkSource(io.open_array(stream_key(run, stream)))
            ticks = np.arange(n_ticks)
            cols = np.arange(source.n_cols)
            probe = None
            if condition is not None and "tick" in refs:
                ticks = _kept_ticks(condition, _where(run, stream), n_ticks)
            if condition is not None and "sample_id" in refs and cols.size:
                lows, highs = self._ranges(source.per_chunk)
                ids = pc.field("sample_id")
                guarantees = [
                    _where(run, stream) & (ids >= pa.scalar(int(a), pa.int64())) & (ids <= pa.scalar(int(b), pa.int64()))
                    for a, b in zip(lows, highs)
                ]
                cols = cols[_satisfiable(condition, guarantees)]
                if "value" not in refs:
                    probe = _Probe(self._ledger._samples.sample_id, condition, refs, run, stream, shared)
            if ticks.size and cols.size:
                plan.append(_Piece(run, stream, source, ticks, cols, probe))
        return plan

    def _ranges(self, per_chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """Least and greatest sample id of each chunk column (samples never change: computed once per width)."""
        if per_chunk not in self._id_ranges:
            ids = self._ledger._samples.sample_id
            starts = np.arange(0, ids.size, per_chunk)
            self._id_ranges[per_chunk] = (np.minimum.reduceat(ids, starts), np.maximum.reduceat(ids, starts))
        return self._id_ranges[per_chunk]

    def _batches(self, plan: list[_Piece], schema: pa.Schema):
        sample_id = self._ledger._samples.sample_id
        for piece in plan:
            source = piece.source
            text = {"run": _repeated(piece.run, source.per_chunk), "stream": _repeated(piece.stream, source.per_chunk)}
            for (tick, col), values in read_chunks(source, piece.keys()):
                lo = col * source.per_chunk
                keep = ~np.isnan(values)
                if piece.probe is not None:  # the rows that pass are known: Arrow filters only those
                    keep &= piece.probe.rows(tick)[lo : lo + values.size]
                    piece.probe.forget_before(tick)
                if keep.all():
                    ids = sample_id[lo : lo + values.size]
                else:
                    rows = np.flatnonzero(keep)
                    if rows.size == 0:
                        continue
                    ids, values = sample_id[lo + rows], values[rows]
                arrays = []
                for name in schema.names:
                    if name in text:
                        arrays.append(text[name].slice(0, values.size))
                    elif name == "tick":
                        arrays.append(pa.array(np.full(values.size, tick, np.int32)))
                    else:
                        arrays.append(pa.array(ids if name == "sample_id" else values))
                yield pa.RecordBatch.from_arrays(arrays, schema=schema)


class _Probe:
    """Which sample rows pass a condition that mentions ``sample_id`` and not ``value``, evaluated exactly.

    Every other column of a row is known where it is asked (the run and stream of the piece, the tick of the
    chunk), so the condition is evaluated on a table of every sample id with those columns filled in: once per
    tick when the condition mentions ``tick``, else once for all ticks, shared by the (run, stream) pieces the
    condition does not tell apart. Memory: the table of the N ids (~16 bytes per sample) and the passing rows
    of the ticks the reader is ahead by (at most ``READ_AHEAD_CHUNKS + 1``, 1 byte per sample each).
    """

    def __init__(
        self, ids: np.ndarray, condition: pc.Expression, refs: set[str], run: str, stream: str,
        shared: dict[tuple[str | None, str | None], np.ndarray],
    ) -> None:
        self.condition = condition
        self.per_tick = "tick" in refs
        columns = {"sample_id": pa.array(ids), _ROW: pa.array(np.arange(ids.size))}
        for name, value in (("run", run), ("stream", stream)):
            if name in refs:
                columns[name] = _repeated(value, ids.size)
        self.table = pa.table(columns)
        self.key = (run if "run" in refs else None, stream if "stream" in refs else None)
        self.shared = shared
        self.recent: dict[int, np.ndarray] = {}

    def rows(self, tick: int) -> np.ndarray:
        """(N,) bool: the sample rows that pass at ``tick``."""
        if not self.per_tick:
            if self.key not in self.shared:
                self.shared[self.key] = self._evaluate(self.table)
            return self.shared[self.key]
        if tick not in self.recent:
            ticks = pa.array(np.full(self.table.num_rows, tick, np.int32))
            self.recent[tick] = self._evaluate(self.table.append_column("tick", ticks))
        return self.recent[tick]

    def forget_before(self, tick: int) -> None:
        """Drop the rows of ticks before ``tick``: chunks are read in tick order."""
        for old in [t for t in self.recent if t < tick]:
            del self.recent[old]

    def _evaluate(self, table: pa.Table) -> np.ndarray:
        passed = table.filter(self.condition)[_ROW].to_numpy()
        rows = np.zeros(table.num_rows, bool)
        rows[passed] = True
        return rows


class _Piece(NamedTuple):
    """One (run, stream) of the view to read: its ticks and chunk columns, and what knows the passing rows."""

    run: str
    stream: str
    source: ChunkSource
    ticks: np.ndarray
    cols: np.ndarray
    probe: _Probe | None

    def keys(self) -> Iterator[tuple[int, int]]:
        """(tick, chunk column) of the chunks to read, in order; with a probe, only those holding a passing row."""
        per_chunk = self.source.per_chunk
        for tick in self.ticks:
            rows = None if self.probe is None else self.probe.rows(int(tick))
            for col in self.cols:
                if rows is None or rows[col * per_chunk : (col + 1) * per_chunk].any():
                    yield int(tick), int(col)


def _losses_view_at(path: str, storage_options: dict[str, Any], condition: pc.Expression | None) -> LossesView:
    from .ledger import open as open_ledger

    return LossesView(open_ledger(path, storage_options=storage_options or None), condition)


def _and(a: pc.Expression | None, b: pc.Expression | None) -> pc.Expression | None:
    return b if a is None else a if b is None else a & b


def _where(run: str, stream: str) -> pc.Expression:
    return (pc.field("run") == run) & (pc.field("stream") == stream)


def _referenced(condition: pc.Expression | None) -> set[str]:
    """Columns of the view that ``condition`` mentions: those without which it cannot be bound."""
    if condition is None:
        return set()
    out = set()
    for field in LOSSES_SCHEMA:
        rest = pa.schema([f for f in LOSSES_SCHEMA if f.name != field.name])
        try:
            ds.Scanner.from_batches(iter(()), schema=rest, filter=condition)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            out.add(field.name)
    return out


def _satisfiable(condition: pc.Expression, guarantees: list[pc.Expression]) -> np.ndarray:
    """For each guarantee (what every row of a piece of the view satisfies), whether ``condition`` may hold there.

    Arrow decides, as when it prunes a dataset's fragments by their partition expressions: one fragment per
    guarantee (files that are never opened), and a fragment is left out only when the condition simplifies
    to false under its guarantee. Sound for any condition; exact for comparisons, ``is_in``, AND and OR of
    them on ``run``, ``stream``, ``tick``, and ``sample_id`` against a range.
    """
    if not guarantees:
        return np.zeros(0, bool)
    paths = [f"/lossledger-losses-view/{i}" for i in range(len(guarantees))]
    fragments = ds.FileSystemDataset.from_paths(
        paths, schema=LOSSES_SCHEMA, format=ds.IpcFileFormat(), filesystem=_NOWHERE, partitions=guarantees
    )
    keep = np.zeros(len(guarantees), bool)
    for fragment in fragments.get_fragments(filter=condition):
        keep[int(fragment.path.rsplit("/", 1)[1])] = True
    return keep


def _kept_ticks(condition: pc.Expression, base: pc.Expression, n_ticks: int) -> np.ndarray:
    """Ticks ``0..n_ticks-1`` where ``condition`` may hold: ranges of ticks are checked, then split, down to ticks."""
    tick = pc.field("tick")
    kept: list[int] = []
    ranges = [(0, n_ticks)]
    while ranges:
        guarantees = [
            base & (tick == pa.scalar(a, pa.int32())) if b - a == 1
            else base & (tick >= pa.scalar(a, pa.int32())) & (tick <= pa.scalar(b - 1, pa.int32()))
            for a, b in ranges
        ]
        split = []
        for (a, b), maybe in zip(ranges, _satisfiable(condition, guarantees)):
            if not maybe:
                continue
            if b - a == 1:
                kept.append(a)
                continue
            step = -(-(b - a) // _SPLIT)
            split += [(lo, min(b, lo + step)) for lo in range(a, b, step)]
        ranges = split
    return np.array(sorted(kept), dtype=np.int64)


def _repeated(text: str, n: int) -> pa.Array:
    return pa.repeat(pa.scalar(text, pa.string()), n)


def connect(ledger: Ledger, *, with_scores: bool = True) -> duckdb.DuckDBPyConnection:
    """A new in-memory DuckDB connection with the ledger's views (``scores`` only if ``with_scores``)."""
    con = duckdb.connect()
    _register_samples(con, ledger)
    con.register("runs", _runs_table(ledger))
    con.register("ticks", _ticks_table(ledger))
    con.register("losses", LossesView(ledger))
    if with_scores:
        _register_scores(con, ledger)
    return con


def query(ledger: Ledger, sql: str) -> pa.Table:
    """Run ``sql`` against the ledger's views and return the result as a ``pyarrow.Table``."""
    uses_scores = re.search(r"\bscores\b", sql, flags=re.IGNORECASE) is not None
    con = connect(ledger, with_scores=uses_scores)
    try:
        return con.sql(sql).to_arrow_table()
    finally:
        con.close()


def _register_samples(con: duckdb.DuckDBPyConnection, ledger: Ledger) -> None:
    """The ``samples`` view: the ledger's columns as they are (no copy), with ``class`` and ``split`` cast from
    dictionary to plain strings as they are scanned (DuckDB then compares them with string literals directly;
    a cast of the whole column would cost ~10 bytes per sample)."""
    table = ledger.samples
    con.register("_samples", table)
    casts = [f"CAST({name} AS VARCHAR) AS {name}" for name in ("class", "split") if name in table.column_names]
    replace = f" REPLACE ({', '.join(casts)})" if casts else ""
    con.execute(f"CREATE VIEW samples AS SELECT *{replace} FROM _samples")


def _runs_table(ledger: Ledger) -> pa.Table:
    rows = []
    for run in ledger.runs:
        attrs = read_run_attrs(ledger._io, run)
        rows.append(
            {
                "run": run,
                "ticks": attrs["commit"]["ticks"],
                "created": attrs.get("created"),
                "updated": attrs["commit"].get("updated"),
                "attrs": json.dumps(attrs["attrs"]),
                "user": attrs["attrs"],
            }
        )
    base = pa.table(
        {
            "run": pa.array([r["run"] for r in rows], pa.string()),
            "ticks": pa.array([r["ticks"] for r in rows], pa.int64()),
            "created": pa.array([r["created"] for r in rows], pa.string()),
            "updated": pa.array([r["updated"] for r in rows], pa.string()),
            "attrs": pa.array([r["attrs"] for r in rows], pa.string()),
        }
    )
    keys = sorted({k for r in rows for k, v in r["user"].items() if not isinstance(v, (dict, list))} - set(base.column_names))
    for key in keys:
        values = [r["user"].get(key) for r in rows]
        try:
            column = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types across runs: text
            column = pa.array([None if v is None else str(v) for v in values], pa.string())
        base = base.append_column(key, column)
    return base


def _ticks_table(ledger: Ledger) -> pa.Table:
    tables = []
    for run in ledger.runs:
        ticks = ledger.ticks(run)
        tables.append(ticks.add_column(0, "run", pa.array([run] * ticks.num_rows, pa.string())))
    if not tables:
        return pa.table({"run": pa.array([], pa.string()), "tick": pa.array([], pa.int64()),
                         "epoch": pa.array([], pa.int64()), "step": pa.array([], pa.int64()),
                         "wall": pa.array([], pa.float64())})
    return pa.concat_tables(tables)


def _register_scores(con: duckdb.DuckDBPyConnection, ledger: Ledger) -> None:
    parts: list[str] = []
    for run in ledger.runs:
        for stream in read_run_attrs(ledger._io, run)["commit"]["streams"]:
            files = stored_scores_all(ledger._io, ledger._samples, run, stream)  # the dt modes in one read
            for dt in DT_MODES:
                name = f"_scores_{len(parts)}"
                score_file = files[dt]
                # The cache file is scanned by Arrow, a batch at a time; an uncacheable result (folder not
                # writable) is its memory-mapped table.
                if score_file.path is not None:
                    con.register(name, ds.dataset(str(score_file.path), format="ipc"))
                else:
                    con.register(name, score_file.table)
                parts.append(
                    f"SELECT '{_sql_string(run)}' AS run, '{stream}' AS stream, '{dt}' AS dt, * FROM {name}"
                )
    if parts:
        con.execute("CREATE VIEW scores AS " + " UNION ALL BY NAME ".join(parts))
    else:
        con.execute(
            "CREATE VIEW scores AS SELECT NULL::VARCHAR AS run, NULL::VARCHAR AS stream, NULL::VARCHAR AS dt, "
            "NULL::BIGINT AS sample_id, NULL::INTEGER AS label, NULL::DOUBLE AS action, NULL::DOUBLE AS variance, "
            "NULL::DOUBLE AS mean, NULL::DOUBLE AS first, NULL::DOUBLE AS last, NULL::DOUBLE AS min, "
            "NULL::DOUBLE AS max, NULL::BIGINT AS n_obs WHERE false"
        )


def _sql_string(text: str) -> str:
    return text.replace("'", "''")
