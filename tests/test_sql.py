"""The SQL views agree with the Python API, and the losses view can be scanned more than once."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pytest

import lossledger as ll
from lossledger import errors as E


@pytest.fixture
def filled(ledger):
    rng = np.random.default_rng(1)
    for name, seed in (("a", 0), ("b", 1)):
        with ledger.run(name, model="mlp", seed=seed, lr=0.1 * (seed + 1)) as run:
            for t in range(4):
                ids = rng.choice(10, size=7, replace=False)
                run.log(ids, loss=rng.exponential(1.0, 7), margin=rng.normal(size=7))
                if t == 0:
                    run.log([0], pix=np.ones((1, 2, 2)))
                run.end_epoch(step=(t + 1) * 3)
    return ll.open(ledger.path)


@pytest.mark.parametrize("batch_rows", [None, 3])
def test_scores_view_equals_python_api(filled, monkeypatch, batch_rows):
    if batch_rows:  # cache files of several record batches
        monkeypatch.setattr("lossledger._scoring.BATCH_ROWS", batch_rows)
        shutil.rmtree(filled.path / "cache", ignore_errors=True)
    for run in ("a", "b"):
        for dt in ("epoch", "step", "wall"):
            got = filled.sql(
                f"SELECT * EXCLUDE (run, stream, dt) FROM scores WHERE run='{run}' AND stream='loss' AND dt='{dt}' "
                "ORDER BY sample_id"
            )
            want = filled.scores(run, dt=dt)
            for name in want.column_names:
                values = got[name].to_numpy(zero_copy_only=False)
                np.testing.assert_allclose(
                    np.where(got[name].is_null().to_numpy(zero_copy_only=False), np.nan, values).astype(float),
                    want[name].to_numpy().astype(float), err_msg=name,
                )


def test_scores_view_has_null_for_never_observed(filled):
    row = filled.sql(
        "SELECT count(*) AS n, count(action) AS observed, sum(action) AS total FROM scores "
        "WHERE run='a' AND stream='pix' AND dt='epoch'"
    ).to_pylist()[0]
    assert row == {"n": 10, "observed": 1, "total": 1.0}  # mean over pixels of each pixel's action


def test_losses_view_equals_trajectories_and_rescans(filled):
    query = "SELECT tick, sample_id, value FROM losses WHERE run='b' AND stream='loss' ORDER BY tick, sample_id"
    con = filled.duckdb()
    first = con.sql(query).to_arrow_table()
    second = con.sql(query).to_arrow_table()  # a second scan of the same registered view
    con.close()
    assert first.equals(second) and first.num_rows == 4 * 7
    traj = filled.trajectories("b")
    for row in first.to_pylist():
        assert traj[row["sample_id"], row["tick"]] == pytest.approx(row["value"])
    assert np.count_nonzero(~np.isnan(traj)) == first.num_rows
    streams = filled.sql("SELECT DISTINCT stream FROM losses ORDER BY 1")["stream"].to_pylist()
    assert streams == ["loss", "margin"]  # element streams are not in the long view


def test_losses_view_sees_new_commits(ledger):
    with ledger.run("r") as run:
        run.log([0], loss=[1.0])
        run.end_epoch()
        con = ll.open(ledger.path).duckdb()
        assert con.sql("SELECT count(*) FROM losses").fetchall() == [(1,)]
        run.log([1], loss=[2.0])
        run.end_epoch()
        assert con.sql("SELECT count(*) FROM losses").fetchall() == [(2,)]
        con.close()


def test_float16_stream_reads_as_float32(ledger):
    with ledger.run("r", stream_dtypes={"loss": "float16"}) as run:
        run.log([0, 1], loss=[0.5, 0.25])
        run.end_epoch()
    table = ledger.sql("SELECT value FROM losses ORDER BY sample_id")
    assert str(table.schema.field("value").type) == "float" and table["value"].to_pylist() == [0.5, 0.25]


def test_runs_ticks_samples_views(filled):
    runs = filled.sql("SELECT run, ticks, model, seed, lr, attrs FROM runs ORDER BY run").to_pylist()
    assert [(r["run"], r["ticks"], r["model"], r["seed"]) for r in runs] == [("a", 4, "mlp", 0), ("b", 4, "mlp", 1)]
    assert runs[1]["lr"] == pytest.approx(0.2) and '"seed": 1' in runs[1]["attrs"]
    ticks = filled.sql("SELECT tick, step FROM ticks WHERE run='a' ORDER BY tick").to_pylist()
    assert [t["step"] for t in ticks] == [3, 6, 9, 12]
    per_class = filled.sql("SELECT class, count(*) AS n FROM samples GROUP BY class ORDER BY class").to_pylist()
    assert per_class == [{"class": "a", "n": 4}, {"class": "b", "n": 3}, {"class": "c", "n": 3}]


def test_sql_on_an_empty_ledger(ledger):
    assert ledger.sql("SELECT count(*) AS n FROM scores").to_pylist() == [{"n": 0}]
    assert ledger.sql("SELECT count(*) AS n FROM losses").to_pylist() == [{"n": 0}]


def test_top_matches_numpy_ranking(filled):
    scores = filled.scores("a")
    action = scores["action"].to_numpy()
    ids = scores["sample_id"].to_numpy()
    observed = ~np.isnan(action)
    order = np.lexsort((ids[observed], -action[observed]))
    top = filled.top(3, "a")
    assert top["sample_id"].to_pylist() == ids[observed][order][:3].tolist()
    assert top["rank"].to_pylist() == [1, 2, 3]
    easiest = filled.top(100, "a", hardest=False)
    assert easiest.num_rows == observed.sum()  # never-observed samples are not ranked
    assert easiest["action"].to_pylist() == sorted(action[observed].tolist())


def test_top_per_class(filled):
    table = filled.top(2, "b", by="variance", per_class=True)
    scores = filled.scores("b")
    labels = scores["label"].to_numpy()
    variance = scores["variance"].to_numpy()
    for label in range(3):
        mask = (labels == label) & ~np.isnan(variance)
        best = np.sort(variance[mask])[::-1][:2]
        got = [r["variance"] for r in table.to_pylist() if r["label"] == label]
        assert got == pytest.approx(best.tolist())
    assert set(table["class"].to_pylist()) == {"a", "b", "c"}


def _numpy_top(scores, k, by, hardest, per_class):
    """(label, rank, sample_id) of the expected ranking, by a plain sort of the whole table."""
    values = scores[by].to_numpy().astype(float)
    ids = scores["sample_id"].to_numpy()
    labels = scores["label"].to_numpy() if per_class else np.zeros(ids.size, int)
    rows = sorted((int(lab), -v if hardest else v, int(i)) for lab, v, i in zip(labels, values, ids) if not np.isnan(v))
    out, seen = [], {}
    for lab, _, i in rows:
        seen[lab] = seen.get(lab, 0) + 1
        if seen[lab] <= k:
            out.append((lab if per_class else None, seen[lab], i))
    return out


@pytest.mark.parametrize("ticks", [None, [1, 3]])
def test_top_streams_batches_and_matches_a_full_sort(tmp_path, monkeypatch, ticks):
    """Scores read or computed in batches of 7 rows: every ranking equals a sort of the whole table, ties
    (values from a handful of levels) broken by sample id, never-observed samples left out."""
    monkeypatch.setattr("lossledger._scoring.BATCH_ROWS", 7)
    monkeypatch.setattr("lossledger._scan.SCAN_BUDGET_BYTES", 256)
    monkeypatch.setattr("lossledger.format.CHUNK_TARGET_BYTES", 64)
    rng = np.random.default_rng(3)
    n = 120
    led = ll.create(tmp_path / "t.ll", sample_ids=rng.permutation(1000)[:n], labels=rng.integers(0, 4, n),
                    classes=["w", "x", "y", "z"])
    ids = led.sample_ids
    with led.run("r") as run:
        for _ in range(4):
            logged = ids[rng.random(n) < 0.7]
            run.log(logged, loss=rng.integers(0, 4, logged.size) / 2)  # ties
            run.end_epoch()
    led = ll.open(led.path)
    scores = led.scores("r", ticks=ticks)
    for by in ("action", "n_obs", "variance"):
        for hardest in (True, False):
            for per_class in (False, True):
                for k in (1, 5, 200):
                    got = led.top(k, "r", by=by, hardest=hardest, per_class=per_class, ticks=ticks)
                    rows = list(zip(got["label"].to_pylist() if per_class else [None] * got.num_rows,
                                    got["rank"].to_pylist(), got["sample_id"].to_pylist()))
                    assert rows == _numpy_top(scores, k, by, hardest, per_class), (by, hardest, per_class, k)
                    want = scores.take(pa.array([np.flatnonzero(scores["sample_id"].to_numpy() == i)[0]
                                                 for i in got["sample_id"].to_pylist()], pa.int64()))
                    for name in ("action", "variance", "first", "n_obs"):
                        np.testing.assert_array_equal(got[name].to_numpy(), want[name].to_numpy(), err_msg=name)
                    names = np.array(["w", "x", "y", "z"])[got["label"].to_numpy()].tolist()
                    assert got["class"].to_pylist() == names


def test_top_errors(filled):
    with pytest.raises(E.UnknownRunError, match="name one with run="):
        filled.top(3)
    with pytest.raises(E.ShapeMismatchError, match="choose one of"):
        filled.top(3, "a", by="sample_id")
    with pytest.raises(E.ShapeMismatchError, match="positive integer"):
        filled.top(0, "a")


# --- filter pushdown into the losses view --------------------------------------------------------------------
@pytest.fixture
def chunked(tmp_path, monkeypatch):
    """Two runs, two scalar streams, 8 ticks, 50 samples with ids 1000 + 3 * row, 4 samples per chunk (13 chunk
    columns); some values not logged. Returns (ledger, reference long table as a list of row dicts)."""
    monkeypatch.setattr("lossledger.format.CHUNK_TARGET_BYTES", 16)
    n, n_ticks = 50, 8
    led = ll.create(tmp_path / "c.ll", sample_ids=1000 + 3 * np.arange(n))
    rng = np.random.default_rng(7)
    rows = []
    for run_name in ("a", "b"):
        with led.run(run_name) as run:
            for t in range(n_ticks):
                for stream in ("loss", "margin"):
                    mask = rng.random(n) < 0.9
                    if t == 3:
                        mask[:8] = False  # chunk columns 0 and 1 never written at tick 3
                    values = rng.random(n).astype(np.float32)
                    run.log(led.sample_ids[mask], **{stream: values[mask]})
                    rows += [
                        {"run": run_name, "stream": stream, "tick": t, "sample_id": int(i), "value": float(v)}
                        for i, v in zip(led.sample_ids[mask], values[mask])
                    ]
                run.end_epoch()
    return led, rows


def count_chunk_reads(monkeypatch) -> list[tuple[int, int]]:
    """Record every chunk the real chunk reader decodes (a pass-through wrapper around ChunkSource.read)."""
    from lossledger import _scan

    calls: list[tuple[int, int]] = []
    real = _scan.ChunkSource.read

    def read(self, tick, col, out=None):
        calls.append((tick, col))
        return real(self, tick, col, out)

    monkeypatch.setattr(_scan.ChunkSource, "read", read)
    return calls


def reference(rows: list[dict], sql_where: str) -> list[tuple]:
    """The same query over the long table built in Python, by DuckDB (no pushdown into a plain Arrow table)."""
    import duckdb
    import pyarrow as pa

    table = pa.Table.from_pylist(rows, schema=pa.schema([("run", pa.string()), ("stream", pa.string()),
                                                         ("tick", pa.int32()), ("sample_id", pa.int64()),
                                                         ("value", pa.float32())]))
    con = duckdb.connect()
    con.register("losses", table)
    try:
        return con.sql(f"SELECT * FROM losses WHERE {sql_where} ORDER BY ALL").fetchall()
    finally:
        con.close()


def test_in_filter_decodes_only_the_chunks_holding_the_ids(chunked, monkeypatch):
    led, rows = chunked
    reads = count_chunk_reads(monkeypatch)
    ids = [1000 + 3 * 5, 1000 + 3 * 6, 1000 + 3 * 41]  # rows 5, 6 (chunk column 1) and 41 (column 10)
    where = f"sample_id IN ({', '.join(map(str, ids))})"
    got = led.sql(f"SELECT * FROM losses WHERE {where} ORDER BY ALL")
    assert [tuple(r.values()) for r in got.to_pylist()] == reference(rows, where)
    # 2 runs x 2 streams x 8 ticks x the 2 chunk columns holding the ids, out of 13 columns
    assert sorted(set(reads)) == sorted({(t, c) for t in range(8) for c in (1, 10)})
    assert len(reads) == 2 * 2 * 8 * 2

    traj = led.trajectories("b", "margin", ids=ids[:1])[0]
    reads.clear()
    got = led.sql(f"SELECT tick, value FROM losses WHERE run = 'b' AND stream = 'margin' AND sample_id = {ids[0]} "
                  "AND tick BETWEEN 2 AND 5 ORDER BY tick")
    want = [(t, float(traj[t])) for t in range(2, 6) if not np.isnan(traj[t])]
    assert [(r["tick"], r["value"]) for r in got.to_pylist()] == want  # float32 values, exact
    assert sorted(reads) == [(t, 1) for t in range(2, 6)]  # one chunk per tick, one run and stream

    reads.clear()
    assert led.sql("SELECT count(*) AS n FROM losses").to_pylist() == [{"n": len(rows)}]
    assert len(reads) == 2 * 2 * 8 * 13  # no filter: every chunk


@pytest.mark.parametrize(
    "where",
    [
        "sample_id IN (1000, 1003, 1147, 99999)",
        "sample_id = 1024 OR sample_id = 1102",
        "sample_id BETWEEN 1030 AND 1060 AND tick >= 6",
        "run = 'b' AND (tick = 1 OR tick = 7) AND sample_id < 1010",
        "(run = 'a' AND tick = 2) OR stream = 'margin'",
        "tick IN (0, 3) AND sample_id IN (1003, 1012)",  # tick 3: the first two chunk columns were never written
        "sample_id + 3 = 1006",
        "stream <> 'loss' AND tick <> 4 AND sample_id > 1140",
        "value > 0.5 AND sample_id IN (1006, 1009)",
        "sample_id IS NOT NULL AND run = 'a' AND tick = 5",
        "sample_id IN (SELECT 1000 + 3 * range FROM range(3))",
        "sample_id = -1",
    ],
)
def test_pushed_down_filters_return_exactly_the_rows(chunked, where):
    led, rows = chunked
    got = led.sql(f"SELECT * FROM losses WHERE {where} ORDER BY ALL")
    assert [tuple(r.values()) for r in got.to_pylist()] == reference(rows, where)


def test_pruning_needs_no_order_of_ids(tmp_path, monkeypatch):
    monkeypatch.setattr("lossledger.format.CHUNK_TARGET_BYTES", 16)
    ids = np.random.default_rng(3).permutation(40) * 10
    led = ll.create(tmp_path / "p.ll", sample_ids=ids)
    with led.run("r") as run:
        for t in range(3):
            run.log(ids, loss=np.arange(40, dtype=np.float32) + t)
            run.end_epoch()
    reads = count_chunk_reads(monkeypatch)
    got = led.sql("SELECT sample_id, tick, value FROM losses WHERE sample_id IN (0, 390) ORDER BY ALL").to_pylist()
    rows_of = {int(i): r for r, i in enumerate(ids)}
    assert [(g["sample_id"], g["tick"], g["value"]) for g in got] == [
        (i, t, float(rows_of[i] + t)) for i in (0, 390) for t in range(3)
    ]
    assert sorted(reads) == sorted({(t, rows_of[i] // 4) for i in (0, 390) for t in range(3)})


def test_a_long_in_list_decodes_only_the_chunks_holding_the_ids(chunked, monkeypatch):
    led, rows = chunked
    reads = count_chunk_reads(monkeypatch)
    ids = list(range(1000, 1000 + 3 * 12, 3)) + list(range(2000, 2100))  # rows 0..11 (columns 0-2) and 100 absent ids
    where = f"stream = 'loss' AND sample_id IN ({', '.join(map(str, ids))})"
    got = led.sql(f"SELECT * FROM losses WHERE {where} ORDER BY ALL")
    assert [tuple(r.values()) for r in got.to_pylist()] == reference(rows, where)
    assert sorted(set(reads)) == sorted({(t, c) for t in range(8) for c in (0, 1, 2)})
    assert len(reads) == 2 * 8 * 3  # two runs, one stream


def test_losses_view_is_a_lazy_pyarrow_dataset(chunked, monkeypatch):
    import pickle

    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from lossledger.sql import LossesView

    led, rows = chunked
    view = LossesView(led)
    assert isinstance(view, ds.Dataset) and view.schema.names == ["run", "stream", "tick", "sample_id", "value"]
    reads = count_chunk_reads(monkeypatch)
    picked = view.filter(pc.field("run") == "a").to_table(columns=["tick", "value"], filter=pc.field("sample_id") == 1003)
    assert picked.column_names == ["tick", "value"] and picked.num_rows == sum(
        1 for r in rows if r["run"] == "a" and r["sample_id"] == 1003
    )
    assert len(reads) == 2 * 8  # run a, two streams, one chunk column, 8 ticks
    assert view.count_rows(filter=pc.field("tick") == 0) == sum(1 for r in rows if r["tick"] == 0)
    again = pickle.loads(pickle.dumps(view.filter(pc.field("tick") == 0)))
    assert again.count_rows() == sum(1 for r in rows if r["tick"] == 0)
    assert view.sort_by("value").to_table().num_rows == len(rows)


def test_a_tick_range_and_a_long_in_list_decode_only_matching_chunks(chunked, monkeypatch):
    led, rows = chunked
    reads = count_chunk_reads(monkeypatch)
    ids = [1000 + 3 * r for r in (0, 5, 9)] + list(range(3000, 3100))  # columns 0, 1, 2 and 100 absent ids
    where = f"run = 'a' AND tick BETWEEN 2 AND 4 AND sample_id IN ({', '.join(map(str, ids))})"
    got = led.sql(f"SELECT * FROM losses WHERE {where} ORDER BY ALL")
    assert [tuple(r.values()) for r in got.to_pylist()] == reference(rows, where)
    assert sorted(reads) == sorted((t, c) for _ in ("loss", "margin") for t in (2, 3, 4) for c in (0, 1, 2))
