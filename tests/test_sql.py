"""The SQL views agree with the Python API, and the losses view can be scanned more than once."""

from __future__ import annotations

import numpy as np
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


def test_scores_view_equals_python_api(filled):
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


def test_top_errors(filled):
    with pytest.raises(E.UnknownRunError, match="name one with run="):
        filled.top(3)
    with pytest.raises(E.ShapeMismatchError, match="choose one of"):
        filled.top(3, "a", by="sample_id")
    with pytest.raises(E.ShapeMismatchError, match="positive integer"):
        filled.top(0, "a")
