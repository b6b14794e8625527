"""SQL over a ledger with DuckDB: the views ``samples``, ``runs``, ``ticks``, ``scores`` and ``losses``.

- ``samples(sample_id, label, class, split)``: one row per sample (columns the ledger has).
- ``runs(run, ticks, created, updated, attrs, <attr>...)``: one row per run; ``attrs`` is the user attributes
  as JSON text, and each top-level attribute is also a column (NULL where a run lacks it).
- ``ticks(run, tick, epoch, step, wall)``: committed ticks.
- ``scores(run, stream, dt, sample_id, label, action, variance, mean, first, last, min, max, n_obs)``: the
  per-sample scores of every committed stream of every run, for each ``dt`` in epoch/step/wall
  (computed on first use and read from the parquet cache after; see :meth:`Ledger.scores`). A sample never
  observed has NULL scores here (NaN in :meth:`Ledger.scores`), so aggregates skip it.
- ``losses(run, stream, tick, sample_id, value)``: every observed value of every scalar stream, one row each
  (unlogged NaNs are not rows), streamed lazily from the Zarr chunks at each scan (memory: one 64 MB slab);
  float16 streams are read as float32. Element streams (pixels, embeddings) are not in this view.

The views are read-only: nothing done through SQL changes the ledger.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import pyarrow as pa

from ._commit import list_runs, read_run_attrs
from ._scan import scan
from ._scoring import cache_path, stored_scores
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


class LossesSource:
    """The ``losses`` view's data: an Arrow C stream that reads the ledger afresh at every scan."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        reader = pa.RecordBatchReader.from_batches(LOSSES_SCHEMA, self._batches())
        return reader.__arrow_c_stream__(requested_schema)

    def _batches(self):
        io = self._ledger._io
        sample_id = self._ledger._samples.sample_id
        for run in list_runs(io):
            commit = read_run_attrs(io, run)["commit"]
            for stream, record in sorted(commit["streams"].items()):
                if record["element_shape"]:
                    continue
                array = io.open_array(stream_key(run, stream))
                ticks = np.arange(commit["ticks"], dtype=np.int64)
                for slab in scan(array, ticks):
                    for offset, tick in enumerate(ticks[slab.ticks]):
                        values = slab.values[offset]
                        keep = np.flatnonzero(~np.isnan(values))
                        if keep.size == 0:
                            continue
                        yield pa.RecordBatch.from_arrays(
                            [
                                pa.array(np.full(keep.size, run, dtype=object), pa.string()),
                                pa.array(np.full(keep.size, stream, dtype=object), pa.string()),
                                pa.array(np.full(keep.size, tick, dtype=np.int32)),
                                pa.array(sample_id[slab.lo + keep]),
                                pa.array(values[keep]),
                            ],
                            schema=LOSSES_SCHEMA,
                        )


def connect(ledger: Ledger, *, with_scores: bool = True) -> duckdb.DuckDBPyConnection:
    """A new in-memory DuckDB connection with the ledger's views (``scores`` only if ``with_scores``)."""
    con = duckdb.connect()
    con.register("samples", _samples_table(ledger))
    con.register("runs", _runs_table(ledger))
    con.register("ticks", _ticks_table(ledger))
    con.register("losses", LossesSource(ledger))
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


def _samples_table(ledger: Ledger) -> pa.Table:
    table = ledger.samples
    # Dictionary columns become plain strings: DuckDB then compares them with string literals directly.
    for name in ("class", "split"):
        if name in table.column_names:
            index = table.column_names.index(name)
            table = table.set_column(index, name, table[name].cast(pa.string()))
    return table


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
    parts = []
    for run in ledger.runs:
        for stream in read_run_attrs(ledger._io, run)["commit"]["streams"]:
            for dt in DT_MODES:
                table = stored_scores(ledger._io, ledger._samples, run, stream, dt, None)
                path = cache_path(ledger.path, run, stream, dt)
                name = f"_scores_{len(parts)}"
                if path.exists():
                    source = f"read_parquet('{_sql_string(str(path))}')"
                else:  # not cacheable (read-only folder): the in-memory result
                    con.register(name, table)
                    source = name
                parts.append(
                    f"SELECT '{_sql_string(run)}' AS run, '{stream}' AS stream, '{dt}' AS dt, "
                    f"* FROM {source}"
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
