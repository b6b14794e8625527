"""Create and open ledgers; read trajectories back."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import duckdb
import numpy as np
import pyarrow as pa

from . import compare, pixels
from ._arrays import as_ids, tick_positions
from ._commit import (
    DAMAGED,
    check_run,
    list_runs,
    read_run_attrs,
    read_stream_chunks,
    read_ticks,
    stream_meta,
)
from ._create import write_ledger
from ._dask_engine import Engine, check_engine, dask_scores
from ._remote import URL, store_io
from ._runs import open_writer
from ._samples import SampleIndex, Samples, build_samples, read_samples
from ._scoring import compute_scores
from ._store import json_bytes
from .errors import (
    CorruptLedgerError,
    FormatVersionError,
    InvalidDTypeError,
    LedgerNotFoundError,
    NotALedgerError,
    ReadOnlyError,
    ShapeMismatchError,
    UnknownRunError,
)
from .export import export as export_scores
from .format import (
    CHECKSUMS_SINCE,
    FORMAT_NAME,
    FORMAT_VERSION,
    ON_DUPLICATE,
    STREAM_DTYPES,
    OnDuplicate,
    check_run_name,
    check_stream_name,
    stream_key,
)
from .pixels import PixelMaps
from .rankings import top_k
from .run import Run
from .scores import Dt
from .sql import connect as sql_connect
from .sql import query as sql_query

Mode = Literal["r", "a"]


def create(
    path: str | os.PathLike[str],
    *,
    sample_ids: Any = None,
    n_samples: int | None = None,
    labels: Any = None,
    classes: Sequence[str] | None = None,
    splits: Any = None,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Ledger:
    """Create a ledger at ``path`` and return it open for writing (mode ``"a"``).

    Give either ``sample_ids`` ((N,) unique integer ids, e.g. dataset indices) or ``n_samples`` (ids
    ``0..N-1``); optionally ``labels`` ((N,) int class indices), ``classes`` (their names) and ``splits``
    ((N,) strings such as "train"/"val"). ``overwrite=True`` replaces an existing ledger, never other files.
    ``path`` is a local folder, or an object-store URL such as ``"s3://bucket/runs/digits.ll"`` with fsspec
    ``storage_options`` (``docs/object-storage.md``). A local ledger appears atomically: it is built beside
    ``path`` and renamed into place; on an object store its root ``zarr.json`` is written last, and until
    then ``open`` finds no ledger there.

    >>> ledger = create(tmp / "demo.ll", n_samples=4, labels=[0, 1, 1, 0], classes=["cat", "dog"])
    """
    samples = build_samples(sample_ids=sample_ids, n_samples=n_samples, labels=labels, classes=classes, splits=splits)
    where = write_ledger(path, samples, overwrite=overwrite, storage_options=storage_options)
    del samples  # the Ledger reads the ids back: one copy at a time (800 MB at 100M samples)
    return Ledger(where, mode="a", storage_options=storage_options)


def open(
    path: str | os.PathLike[str], mode: Mode = "r", *, storage_options: Mapping[str, Any] | None = None
) -> Ledger:
    """Open the ledger at ``path`` (a folder, or a URL with fsspec ``storage_options``): mode ``"r"`` (default)
    to read, ``"a"`` to also write runs."""
    return Ledger(path, mode=mode, storage_options=storage_options)


class Ledger:
    """A ledger on disk or on an object store: samples, runs, and their committed ticks. Use :func:`create`
    or :func:`open`.

    Readers see only committed ticks, re-read at every call, so a reader open during training sees new
    ticks as they are committed. ``path`` is a :class:`~pathlib.Path`, or the URL (a ``str``) of a ledger on an
    object store, whose ``storage_options`` are kept in ``storage_options``.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, mode: Mode = "r", storage_options: Mapping[str, Any] | None = None
    ) -> None:
        if mode not in ("r", "a"):
            raise ShapeMismatchError(f"mode must be 'r' (read) or 'a' (read and write runs), got {mode!r}")
        self._io = store_io(path, read_only=mode == "r", storage_options=storage_options)
        path = self._io.root
        if self._io.local and not Path(path).exists():
            raise LedgerNotFoundError(f"no ledger at {path}; create one with lossledger.create({str(path)!r}, ...)")
        self.path: Path | URL = path
        self.mode: Mode = mode
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        root = self._io.group_attrs("")
        if root is None and not self._io.local and not self._io.list_dir(""):
            raise LedgerNotFoundError(f"no ledger at {path}; create one with lossledger.create({str(path)!r}, ...)")
        if root is None or root.get("format") != FORMAT_NAME:
            raise NotALedgerError(
                f"{path} is not a lossledger ledger ({path / 'zarr.json'} is missing or has no format "
                "'lossledger'); pass the folder made by lossledger.create()"
            )
        version = root.get("version")
        if not isinstance(version, int) or version < 1:
            raise CorruptLedgerError(f"{path} has an invalid format version {version!r}; the ledger is damaged")
        if version > FORMAT_VERSION:
            raise FormatVersionError(
                f"{path} uses ledger format version {version}, newer than version {FORMAT_VERSION} that this "
                "lossledger reads; upgrade lossledger (pip install -U lossledger)"
            )
        self._root_attrs = root
        self._io.checksums = version >= CHECKSUMS_SINCE  # new runs of a v1 ledger stay v1, readable by v1 readers
        if not self._io.exists("runs/zarr.json"):
            raise CorruptLedgerError(f"{path / 'runs' / 'zarr.json'} is missing: the runs group is gone; {DAMAGED}")
        self._samples: Samples = read_samples(self._io)
        self._index = SampleIndex(self._samples.sample_id)
        self._open_runs: list[Run] = []

    # --- samples --------------------------------------------------------------------------------------
    @property
    def n_samples(self) -> int:
        return self._samples.n

    @property
    def sample_ids(self) -> np.ndarray:
        """(N,) int64 sample ids in row order."""
        return self._samples.sample_id.copy()

    @property
    def classes(self) -> tuple[str, ...] | None:
        return self._samples.classes

    @property
    def samples(self) -> pa.Table:
        """One row per sample: ``sample_id``, and ``label``, ``class``, ``split`` where the ledger has them."""
        s = self._samples
        columns: dict[str, Any] = {"sample_id": pa.array(s.sample_id, pa.int64())}
        if s.label is not None:
            columns["label"] = pa.array(s.label, pa.int32())
            if s.classes is not None:
                columns["class"] = pa.DictionaryArray.from_arrays(pa.array(s.label), pa.array(list(s.classes)))
        if s.split is not None:
            columns["split"] = pa.DictionaryArray.from_arrays(pa.array(s.split), pa.array(list(s.splits or ())))
        return pa.table(columns)

    # --- runs -----------------------------------------------------------------------------------------
    @property
    def runs(self) -> list[str]:
        """Names of the runs in the ledger, sorted."""
        return list_runs(self._io)

    def run(
        self,
        name: str,
        /,
        *,
        on_duplicate: OnDuplicate = "error",
        allow_nonfinite: bool = False,
        stream_dtypes: dict[str, str] | None = None,
        **attrs: Any,
    ) -> Run:
        """Create run ``name``, or resume it after its last committed tick; return its writer.

        ``attrs`` are JSON user attributes (model, seed, ...), merged into a resumed run's attributes.
        ``on_duplicate`` says what a sample logged twice in one tick does: raise (default), keep the first or
        last value, or average. ``allow_nonfinite`` stores NaN/inf losses instead of raising.
        ``stream_dtypes`` maps stream names to "float32" (default) or "float16" (half the storage, ~3
        significant digits). One writer per run: a second is refused with :class:`RunLockedError`.
        """
        if self.mode != "a":
            raise ReadOnlyError(
                f"ledger {self.path} is open read-only; open it with lossledger.open({str(self.path)!r}, mode='a') "
                "to write runs"
            )
        check_run_name(name)
        if on_duplicate not in ON_DUPLICATE:
            raise ShapeMismatchError(f"on_duplicate must be one of {list(ON_DUPLICATE)}, got {on_duplicate!r}")
        dtypes = dict(stream_dtypes or {})
        for stream, dtype in dtypes.items():
            check_stream_name(stream)
            if dtype not in STREAM_DTYPES:
                raise InvalidDTypeError(
                    f"stream_dtypes[{stream!r}] = {dtype!r} is not supported; use one of {list(STREAM_DTYPES)}"
                )
        attrs = _json_attrs(attrs)
        lock = self._io.lock_run(name)
        try:
            writer = open_writer(
                self._io, self._index, name, lock, attrs,
                on_duplicate=on_duplicate, allow_nonfinite=allow_nonfinite, stream_dtypes=dtypes,
            )
        except BaseException:
            lock.release()
            raise
        self._open_runs.append(writer)
        return writer

    def run_attrs(self, run: str) -> dict[str, Any]:
        """User attributes of ``run``, plus ``created`` and ``updated`` (ISO-8601 UTC)."""
        attrs = read_run_attrs(self._io, run)
        return {**attrs["attrs"], "created": attrs.get("created"), "updated": attrs["commit"].get("updated")}

    def streams(self, run: str) -> pa.Table:
        """Committed streams of ``run``: ``stream``, ``dtype``, ``element_shape``, ``since`` (first tick)."""
        commit = read_run_attrs(self._io, run)["commit"]
        check_run(self._io, run, commit, self.n_samples)
        records = commit["streams"]
        names = sorted(records)
        return pa.table(
            {
                "stream": pa.array(names, pa.string()),
                "dtype": pa.array([records[n]["dtype"] for n in names], pa.string()),
                "element_shape": pa.array([records[n]["element_shape"] for n in names], pa.list_(pa.int64())),
                "since": pa.array([records[n]["since"] for n in names], pa.int64()),
            }
        )

    def ticks(self, run: str) -> pa.Table:
        """Committed ticks of ``run``: ``tick``, ``epoch``, ``step`` (optimizer steps so far), ``wall`` (seconds)."""
        rows = read_ticks(self._io, run, read_run_attrs(self._io, run)["commit"])
        columns: dict[str, Any] = {"tick": pa.array(np.arange(len(rows["epoch"]), dtype=np.int64))}
        columns.update({column: pa.array(values) for column, values in rows.items()})
        return pa.table(columns)

    def trajectories(
        self, run: str, stream: str = "loss", ids: Any = None, ticks: Any = None
    ) -> np.ndarray:
        """Values of ``stream`` for ``ids`` (default: all samples) at ``ticks`` (default: all committed).

        Returns shape (len(ids), len(ticks), *element_shape) in the stored dtype, NaN where a sample was
        not logged. Memory is that of the result: meant for small reads (scores stream over chunks).
        """
        commit = read_run_attrs(self._io, run)["commit"]
        meta = stream_meta(self._io, run, stream, commit, self.n_samples)
        read_ticks(self._io, run, commit)  # checks that the committed ticks were all written (O(T))
        per_chunk = meta["chunk_grid"]["configuration"]["chunk_shape"][1]
        element = tuple(commit["streams"][stream]["element_shape"])
        tick_index = tick_positions(ticks, commit["ticks"])
        rows = np.arange(self.n_samples) if ids is None else self._index.rows(as_ids(ids))
        # Read each needed chunk once (checked as it is decoded) into (unique rows, unique ticks).
        wanted, row_inverse = np.unique(rows, return_inverse=True)
        tick_list, tick_inverse = np.unique(tick_index, return_inverse=True)
        picked = np.full((wanted.size, tick_list.size, *element), np.nan, meta["data_type"])
        cols, starts = np.unique(wanted // per_chunk, return_index=True)
        bounds = dict(zip(cols.tolist(), zip(starts.tolist(), [*starts[1:].tolist(), wanted.size])))
        position = {int(t): i for i, t in enumerate(tick_list)}
        chunks = ((int(t), col) for t in tick_list for col in bounds)
        for (tick, col), values in read_stream_chunks(self._io, stream_key(run, stream), meta, chunks):
            if values is not None:
                a, b = bounds[col]
                picked[a:b, position[tick]] = values[wanted[a:b] - col * per_chunk]
        if ids is None and tick_list.size == tick_index.size and np.array_equal(tick_list, tick_index):
            return picked  # all samples in row order at increasing ticks: no reordering
        return picked[row_inverse][:, tick_inverse]

    def scores(
        self,
        run: str,
        stream: str = "loss",
        *,
        dt: Dt = "epoch",
        ticks: Any = None,
        engine: Engine = "local",
        client: Any = None,
    ) -> pa.Table:
        """Per-sample scores of ``stream`` in ``run`` over committed ticks, one row per sample (row order).

        Columns: ``sample_id``, ``label`` (if the ledger has labels), ``action`` (Σ L·Δt), ``variance``,
        ``mean``, ``first``, ``last``, ``min``, ``max`` (float64, NaN for a sample never observed), ``n_obs``.
        ``dt``: Δt of a tick is 1 (``"epoch"``), its optimizer steps (``"step"``) or its seconds (``"wall"``).
        ``ticks``: a window (slice or indices) instead of every committed tick. Definitions:
        :mod:`lossledger.scores`. Memory: two 32 MB slabs (one scored, the next being read) and a block's state
        while computing; the result is a memory-mapped Arrow file (RSS only for the pages touched). Results over
        all ticks are cached in the ledger and recomputed when the run has new commits.

        ``engine="dask"`` computes the same table, bit for bit, on a Dask cluster: one task per sample block,
        each worker reading that block's chunks itself from the ledger's path or URL (which the workers must
        reach). ``client``: the ``distributed.Client`` to use; default the current one, else Dask's default
        scheduler. Needs ``pip install "lossledger[dask]"``; shares the cache. See docs/scale-out.md.

        >>> ledger.scores("r", engine="dask", client=distributed.Client(cluster))  # doctest: +SKIP
        """
        check_engine(engine, client)
        stream_meta(self._io, run, stream, read_run_attrs(self._io, run)["commit"], self.n_samples)
        if engine == "dask":
            return dask_scores(self._io, self._samples, run, stream, dt, ticks, client=client)
        return compute_scores(self._io, self._samples, run, stream, dt, ticks)

    def top(
        self,
        k: int = 10,
        run: str | None = None,
        stream: str = "loss",
        *,
        by: str = "action",
        dt: Dt = "epoch",
        hardest: bool = True,
        per_class: bool = False,
        ticks: Any = None,
    ) -> pa.Table:
        """The ``k`` hardest (highest ``by``) or easiest samples of ``run``, overall or ``k`` per class.

        ``run`` may be omitted when the ledger has one run. Returns ``rank``, ``sample_id``, ``label``,
        ``class`` (when known) and the score columns of :meth:`scores`; never-observed samples are not ranked.
        Memory: one pass over the cached scores, batch by batch (~20 MB), keeping ``k`` rows (per class);
        see :func:`lossledger.rankings.top_k`.
        """
        return top_k(self, k, self._only_run(run), stream, by=by, dt=dt, hardest=hardest, per_class=per_class,
                     ticks=ticks)

    def pixel_action(
        self, run: str, stream: str = "pixel", *, ids: Any = None, dt: Dt = "epoch", ticks: Any = None
    ) -> PixelMaps:
        """Per-pixel action, mean and variance maps (k, H, W) of samples ``ids`` of a dense stream.

        See :func:`lossledger.pixels.pixel_action` (and ``pixel_summary``, ``pixel_class_action`` there,
        ``pca_embedding`` and ``write_maps`` in :mod:`lossledger.heatmaps`). Memory: the maps of the requested samples plus one 64 MB block.
        """
        return pixels.pixel_action(self, run, stream, ids=ids, dt=dt, ticks=ticks)

    def ensemble(
        self, runs: Sequence[str], stream: str = "loss", *, dt: Dt = "epoch", ticks: Any = None, by: str = "action"
    ) -> pa.Table:
        """Mean score over ``runs`` per sample, min-max normalized, with one column per run (paper Fig 6/7).

        See :func:`lossledger.compare.ensemble`. Memory: O(samples × runs).
        """
        return compare.ensemble(self, runs, stream, dt=dt, ticks=ticks, by=by)

    def correlate(
        self,
        runs: Sequence[str],
        stream: str = "loss",
        *,
        by_class: bool = True,
        method: Literal["pearson", "spearman"] = "pearson",
        quantiles: Sequence[float] | None = None,
        dt: Dt = "epoch",
        ticks: Any = None,
        by: str = "action",
    ) -> pa.Table:
        """Correlation of per-sample scores between each pair of ``runs``, overall and per class (paper Table 1);
        ``quantiles`` restricts it to the top-q samples (Fig 14). See :func:`lossledger.compare.correlate`."""
        return compare.correlate(
            self, runs, stream, by_class=by_class, method=method, quantiles=quantiles, dt=dt, ticks=ticks, by=by
        )

    def export(
        self,
        path: str | os.PathLike[str],
        runs: Sequence[str] | None = None,
        *,
        streams: Sequence[str] | None = None,
        dt: Dt = "epoch",
    ) -> Path:
        """Write the scores of ``runs`` (default: all) joined with the samples table to one parquet file.

        One row per run, stream and sample; missing scores are null; the run attributes are in the file's
        ``lossledger`` metadata (schema: docs/api.md). Written to a temp file and renamed, so the file appears
        whole or not at all. Memory: one batch of scores (at most 262,144 rows) and the parquet row group being
        written, plus the score engine's while a cache is computed. Returns the path.
        """
        return export_scores(self, path, runs, streams=streams, dt=dt)

    def sql(self, query: str) -> pa.Table:
        """Run a DuckDB SQL query over the views ``samples``, ``runs``, ``ticks``, ``scores``, ``losses``.

        See :mod:`lossledger.sql` (and docs/sql.md) for the columns. Returns a ``pyarrow.Table``. A damaged
        ledger raises :class:`CorruptLedgerError` naming the damaged file; a bad query, DuckDB's own error.
        """
        self._check_runs()
        try:
            return sql_query(self, query)
        except duckdb.Error as err:
            # The views read chunks inside DuckDB, which reports a failed read as its own error, with our message.
            if _DAMAGED in str(err):
                raise CorruptLedgerError(str(err)) from err
            raise

    def duckdb(self) -> duckdb.DuckDBPyConnection:
        """A new DuckDB connection with the ledger's views registered, for power users (close it when done)."""
        self._check_runs()
        return sql_connect(self)

    def _check_runs(self) -> None:
        """Check every run's commit record and array metadata (a few small reads per run), so that views over
        them read only what a writer wrote; :class:`CorruptLedgerError` names a damaged file."""
        for run in self.runs:
            check_run(self._io, run, read_run_attrs(self._io, run)["commit"], self.n_samples)

    def _only_run(self, run: str | None) -> str:
        if run is not None:
            return run
        runs = self.runs
        if len(runs) != 1:
            raise UnknownRunError(f"the ledger has {len(runs)} runs {runs}; name one with run=...")
        return runs[0]

    def info(self) -> str:
        """A human-readable summary: samples, classes, splits, and each run's ticks and streams."""
        s = self._samples
        lines = [f"lossledger v{self._root_attrs['version']} ledger at {self.path}", f"  samples: {s.n:,}"]
        if s.classes is not None:
            lines.append(f"  classes: {len(s.classes)} ({', '.join(s.classes[:10])}{', ...' if len(s.classes) > 10 else ''})")
        if s.split is not None and s.splits is not None:
            counts = np.bincount(s.split, minlength=len(s.splits))
            lines.append("  splits: " + ", ".join(f"{name} {c:,}" for name, c in zip(s.splits, counts)))
        runs = self.runs
        lines.append(f"  runs: {len(runs)}")
        for run in runs:
            attrs = read_run_attrs(self._io, run)
            commit = attrs["commit"]
            check_run(self._io, run, commit, self.n_samples)
            read_ticks(self._io, run, commit)
            streams = ", ".join(
                name + (f"{tuple(r['element_shape'])}" if r["element_shape"] else "") + ("[f16]" if r["dtype"] == "float16" else "")
                for name, r in sorted(commit["streams"].items())
            ) or "-"
            user = ", ".join(f"{k}={v}" for k, v in attrs["attrs"].items())
            lines.append(f"    {run}: {commit['ticks']} tick(s); streams: {streams}" + (f"; {user}" if user else ""))
            lines.append(f"      updated {commit.get('updated')}")
        return "\n".join(lines)

    def close(self) -> None:
        """Close every run writer opened through this ledger (uncommitted values are discarded, loudly)."""
        for writer in self._open_runs:
            writer.close()
        self._open_runs.clear()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<lossledger.Ledger {str(self.path)!r} mode={self.mode!r} samples={self.n_samples}>"


#: Every message about damage says this, also when DuckDB passes one on as its own error.
_DAMAGED = "the ledger is damaged"


def _json_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """User attributes as plain JSON (numpy scalars unwrapped); raise naming the first bad one."""
    out = {}
    for key, value in attrs.items():
        if isinstance(value, np.generic):
            value = value.item()
        try:
            json_bytes({key: value})
        except (TypeError, ValueError) as err:
            raise InvalidDTypeError(
                f"run attribute {key}={value!r} is not JSON ({err}); pass str, int, float (finite), bool, None, "
                "or lists/dicts of those"
            ) from err
        out[key] = value
    return out
