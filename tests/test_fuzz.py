"""The format reader against damaged stores: every read gives the numbers of the undamaged ledger or raises a
LedgerError naming the damaged file; never a raw Zarr/numcodecs/JSON/Arrow error, never wrong numbers.

A small ledger (tiny chunks, so each run is many files; two tick rows pending in the commit record, as a
killed writer leaves them) is damaged in one way per case, by an enumerated list (truncated, empty and
garbage chunks, bad JSON, missing arrays, commit records with wrong types or counts, shapes that do not
match the record) and by hypothesis (any file truncated, replaced by garbage, or deleted). Every reader
(``open``, ``info``, ``ticks``, ``trajectories``, ``scores``, ``sql``, ``export``) then runs against it.

A deleted stream chunk is not damage the reader can see: Zarr does not store a chunk nobody logged to, so
the chunk's samples read as NaN ("not logged") at that tick; scores then skip them (checked against numpy).
A flipped bit anywhere in a chunk (format v2 ends each chunk with a crc32c) raises, naming the chunk.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lossledger as ll
import lossledger.format
import lossledger.run
from lossledger.errors import CorruptLedgerError, LedgerError

N = 40
IDS = np.arange(N, dtype=np.int64) * 3 + 7
T_R, T_S = 5, 4
PIX = (2, 2)


def loss_at(t: int, ids: np.ndarray) -> np.ndarray:
    return (t + 1) * 10.0 + ids / 8.0


def pix_at(t: int, ids: np.ndarray) -> np.ndarray:
    return (t + ids[:, None, None] / 4.0) + np.arange(4).reshape(PIX) / 2.0


def logged_loss(t: int) -> np.ndarray:
    return IDS[::2] if t == 2 else IDS  # tick 2 logs every other sample


def logged_pix(t: int) -> np.ndarray:
    return IDS[t : t + 6]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A pristine ledger: run "r" (loss, float16 pix maps; 3 tick rows flushed, 2 pending) and run "s"."""
    root = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lossledger.format, "CHUNK_TARGET_BYTES", 64)  # 16 losses or 8 float16 maps per chunk
        mp.setattr(lossledger.run, "TICKS_FLUSH", 3)
        led = ll.create(root / "live.ll", sample_ids=IDS, labels=np.arange(N) % 3, classes=["a", "b", "c"],
                        splits=["train"] * 30 + ["val"] * 10)
        with led.run("s", seed=2) as s:
            for t in range(T_S):
                s.log(IDS, loss=loss_at(t + 7, IDS))
                s.end_epoch()
        r = led.run("r", seed=1, stream_dtypes={"pix": "float16"})
        for t in range(T_R):
            r.log(logged_loss(t), loss=loss_at(t, logged_loss(t)))
            r.log(logged_pix(t), pix=pix_at(t, logged_pix(t)))
            r.end_epoch()
        # Snapshot while the writer is open: rows 3 and 4 are still pending in the commit record.
        shutil.copytree(root / "live.ll", root / "base.ll", ignore=shutil.ignore_patterns("writer.lock"))
        r.close()
    commit = json.loads((root / "base.ll/runs/r/zarr.json").read_text())["attributes"]["commit"]
    assert len(commit["pending_ticks"]["epoch"]) == 2
    return root / "base.ll"


def expected_loss() -> np.ndarray:
    out = np.full((N, T_R), np.nan, np.float32)
    for t in range(T_R):
        out[np.searchsorted(IDS, logged_loss(t)), t] = loss_at(t, logged_loss(t))
    return out


def numpy_scores(traj: np.ndarray) -> dict[str, np.ndarray]:
    """Reference scores (dt = epoch) of an (N, T) float32 trajectory matrix, NaN = not logged."""
    x = traj.astype(np.float64)
    seen = ~np.isnan(x)
    n_obs = seen.sum(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        first = np.array([row[s][0] if s.any() else np.nan for row, s in zip(x, seen)])
        last = np.array([row[s][-1] if s.any() else np.nan for row, s in zip(x, seen)])
        return {"action": np.where(n_obs, np.nansum(x, axis=1), np.nan), "mean": np.nanmean(x, axis=1),
                "variance": np.nanvar(x, axis=1), "first": first, "last": last, "min": np.nanmin(x, axis=1),
                "max": np.nanmax(x, axis=1), "n_obs": n_obs}


# --- the readers ---------------------------------------------------------------------------------------
def _table(t) -> dict:
    return {k: np.asarray(v) if isinstance(v, list) and v and not isinstance(v[0], (str, list)) else v
            for k, v in t.to_pydict().items()}


def _export(led, path: Path) -> dict:
    out = led.export(path.parent / "export.parquet")
    try:
        return _table(pq.read_table(out).replace_schema_metadata(None))
    finally:
        out.unlink()


READERS = {
    "info": lambda led, p: led.info().replace(str(p), "<ledger>"),
    "runs": lambda led, p: led.runs,
    "ticks_r": lambda led, p: _table(led.ticks("r")),
    "ticks_s": lambda led, p: _table(led.ticks("s")),
    "streams_r": lambda led, p: _table(led.streams("r")),
    "traj_loss": lambda led, p: led.trajectories("r", "loss"),
    "traj_loss_ids": lambda led, p: led.trajectories("r", "loss", ids=IDS[[39, 0, 20, 0]], ticks=[4, 1]),
    "traj_pix": lambda led, p: led.trajectories("r", "pix"),
    "traj_s": lambda led, p: led.trajectories("s", "loss"),
    "scores_loss": lambda led, p: _table(led.scores("r", "loss")),
    "scores_pix": lambda led, p: _table(led.scores("r", "pix", dt="step")),
    "scores_s": lambda led, p: _table(led.scores("s", "loss", dt="wall")),
    "sql": lambda led, p: _table(led.sql(
        "SELECT run, stream, count(*) AS n, sum(value) AS total, min(tick) AS t0, max(tick) AS t1 FROM losses "
        "GROUP BY ALL UNION ALL SELECT run, stream || dt, sum(n_obs)::BIGINT, sum(action), 0, 0 FROM scores "
        "GROUP BY ALL UNION ALL SELECT run, 'ticks', count(*), sum(step)::BIGINT, min(epoch), max(epoch) FROM ticks "
        "GROUP BY ALL ORDER BY ALL")),
    "export": lambda led, p: _export(led, p),
}
#: Readers of each part of the ledger: they must raise when that part is damaged.
READ_LOSS = {"traj_loss", "traj_loss_ids", "scores_loss", "sql", "export"}
READ_PIX = {"traj_pix", "scores_pix", "export"}
READ_TICKS = {"ticks_r", "scores_pix", "sql"}
RUN_R = READ_LOSS | READ_PIX | READ_TICKS | {"info", "streams_r"}
ALL = set(READERS)


def read_all(path: Path, readers: dict = READERS) -> dict[str, object]:
    """Every reader's result on the ledger at ``path`` (an exception is a result); the score cache is dropped
    first so that scores are computed from the chunks."""
    shutil.rmtree(path / "cache", ignore_errors=True)
    try:
        led = ll.open(path)
    except Exception as err:  # noqa: BLE001 - checked by the caller
        return dict.fromkeys(readers, err)
    out: dict[str, object] = {}
    for name, read in readers.items():
        try:
            out[name] = read(led, path)
        except Exception as err:  # noqa: BLE001 - checked by the caller
            out[name] = err
    return out


def same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and bool(
            np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    return a == b


@pytest.fixture(scope="module")
def pristine(base, tmp_path_factory) -> dict[str, object]:
    path = tmp_path_factory.mktemp("pristine") / "p.ll"
    shutil.copytree(base, path)
    got = read_all(path)
    errors = {k: v for k, v in got.items() if isinstance(v, Exception)}
    assert not errors, errors
    # The pristine readers are right (against the plan and numpy), so "as pristine" means "correct".
    np.testing.assert_array_equal(got["traj_loss"], expected_loss())
    ref = numpy_scores(expected_loss())
    for column, want in ref.items():
        np.testing.assert_allclose(got["scores_loss"][column], want, rtol=1e-12, err_msg=column)
    assert got["ticks_r"]["epoch"].tolist() == list(range(T_R))
    return got


#: In ``check(expect=...)``: the caller checks this reader's result itself.
OWN = object()


def check(path: Path, pristine: dict, must_raise: set[str], names: str | tuple[str, ...],
          expect: dict | None = None, readers: dict = READERS) -> dict:
    """Each reader raises a LedgerError whose message names ``names`` (a path below the ledger, or one of
    several), or returns the pristine result (or ``expect[reader]``); the readers in ``must_raise`` raise."""
    got = read_all(path, readers)
    alternatives = [str(path / name) for name in ((names,) if isinstance(names, str) else names)]
    for reader, result in got.items():
        if isinstance(result, Exception):
            assert isinstance(result, LedgerError), f"{reader}: raw {type(result).__name__}: {result}"
            assert any(name in str(result) for name in alternatives), f"{reader}: {result}"
        else:
            assert reader not in must_raise, f"{reader} read damaged {names} without an error: {result}"
            want = (expect or {}).get(reader, pristine[reader])
            assert want is OWN or same(want, result), f"{reader}: wrong result on a ledger with {names} damaged"
    return got


# --- enumerated damage -------------------------------------------------------------------------------------
def _bytes(rel: str, f):
    def damage(root: Path) -> None:
        p = root / rel
        p.write_bytes(f(p.read_bytes()))
    return damage


def _json(rel: str, f):
    def damage(root: Path) -> None:
        p = root / rel
        doc = json.loads(p.read_text())
        f(doc)
        p.write_text(json.dumps(doc))
    return damage


def _commit(f):
    return _json("runs/r/zarr.json", lambda d: f(d["attributes"]["commit"]))


def _remove(rel: str):
    def damage(root: Path) -> None:
        p = root / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return damage


LOSS_CHUNK = "runs/r/streams/loss/c/1/1"
PIX_CHUNK = "runs/r/streams/pix/c/3/0/0/0"
TICKS_CHUNK = "runs/r/ticks/step/c/0"
RUN_META = "runs/r/zarr.json"
LOSS_META = "runs/r/streams/loss/zarr.json"
PIX_META = "runs/r/streams/pix/zarr.json"

CASES = [
    # (id, damage, readers that must raise, the path the message names)
    ("loss chunk truncated", _bytes(LOSS_CHUNK, lambda b: b[:20]), READ_LOSS, LOSS_CHUNK),
    ("loss chunk empty", _bytes(LOSS_CHUNK, lambda b: b""), READ_LOSS, LOSS_CHUNK),
    ("loss chunk header only", _bytes(LOSS_CHUNK, lambda b: b[:16]), READ_LOSS, LOSS_CHUNK),
    ("loss chunk garbage", _bytes(LOSS_CHUNK, lambda b: bytes(range(len(b)))), READ_LOSS, LOSS_CHUNK),
    ("loss chunk grown", _bytes(LOSS_CHUNK, lambda b: b + b"\0" * 8), READ_LOSS, LOSS_CHUNK),
    ("loss chunk size in header", _bytes(LOSS_CHUNK, lambda b: b[:4] + (2**20).to_bytes(4, "little") + b[8:]),
     READ_LOSS, LOSS_CHUNK),
    ("pix chunk truncated", _bytes(PIX_CHUNK, lambda b: b[:-1]), READ_PIX, PIX_CHUNK),
    ("ticks chunk truncated", _bytes(TICKS_CHUNK, lambda b: b[:10]), READ_TICKS, TICKS_CHUNK),
    ("ticks chunk deleted", _remove(TICKS_CHUNK), READ_TICKS, TICKS_CHUNK),
    ("sample ids truncated", _bytes("samples/sample_id/c/0", lambda b: b[:30]), ALL, "samples/sample_id/c/0"),
    ("sample ids deleted", _remove("samples/sample_id/c/0"), ALL, "samples/sample_id/c/0"),
    ("label chunk deleted", _remove("samples/label/c/0"), ALL, "samples/label"),
    ("split chunk garbage", _bytes("samples/split/c/0", lambda b: b"\xff" * len(b)), ALL, "samples/split/c/0"),
    ("root zarr.json bad JSON", _bytes("zarr.json", lambda b: b[:-2]), ALL, "zarr.json"),
    ("run zarr.json bad JSON", _bytes(RUN_META, lambda b: b"{" + b), RUN_R, RUN_META),
    ("run zarr.json not UTF-8", _bytes(RUN_META, lambda b: b"\xff\xfe" + b), RUN_R, RUN_META),
    ("run zarr.json a list", _bytes(RUN_META, lambda b: b"[1, 2]"), RUN_R, RUN_META),
    ("loss zarr.json bad JSON", _bytes(LOSS_META, lambda b: b[: len(b) // 2]), READ_LOSS, LOSS_META),
    ("ticks zarr.json bad JSON", _bytes("runs/r/ticks/wall/zarr.json", lambda b: b"nope"), READ_TICKS,
     "runs/r/ticks/wall/zarr.json"),
    ("label zarr.json bad JSON", _bytes("samples/label/zarr.json", lambda b: b"{}}"), ALL, "samples/label/zarr.json"),
    ("sample_id zarr.json missing", _remove("samples/sample_id/zarr.json"), ALL, "samples/sample_id/zarr.json"),
    ("samples group missing", _remove("samples"), ALL, "samples/sample_id/zarr.json"),
    ("runs group zarr.json missing", _remove("runs/zarr.json"), ALL, "runs/zarr.json"),
    ("loss array missing", _remove("runs/r/streams/loss"), READ_LOSS, LOSS_META),
    ("pix array metadata missing", _remove(PIX_META), READ_PIX, PIX_META),
    ("ticks array missing", _remove("runs/r/ticks/epoch"), READ_TICKS, "runs/r/ticks/epoch/zarr.json"),
    ("no commit record", _json(RUN_META, lambda d: d["attributes"].pop("commit")), RUN_R, RUN_META),
    ("ticks negative", _commit(lambda c: c.update(ticks=-3)), RUN_R, RUN_META),
    ("ticks a string", _commit(lambda c: c.update(ticks="5")), RUN_R, RUN_META),
    ("ticks a float", _commit(lambda c: c.update(ticks=5.0)), RUN_R, RUN_META),
    ("ticks a bool", _commit(lambda c: c.update(ticks=True)), RUN_R, RUN_META),
    ("ticks huge", _commit(lambda c: c.update(ticks=10**15)), READ_LOSS | READ_PIX | READ_TICKS, "runs/r/"),
    ("ticks past the capacity", _commit(lambda c: c.update(ticks=17)), READ_LOSS | READ_PIX | READ_TICKS, "runs/r/"),
    ("ticks past the rows written", _commit(lambda c: c.update(ticks=7)), READ_TICKS, "runs/r/ticks/"),
    ("streams a list", _commit(lambda c: c.update(streams=["loss"])), RUN_R, RUN_META),
    ("stream record null", _commit(lambda c: c["streams"].update(loss=None)), RUN_R, RUN_META),
    ("stream record without element_shape", _commit(lambda c: c["streams"]["pix"].pop("element_shape")), RUN_R,
     RUN_META),
    ("stream dtype unknown", _commit(lambda c: c["streams"]["loss"].update(dtype="int8")), RUN_R, RUN_META),
    ("stream since a string", _commit(lambda c: c["streams"]["loss"].update(since="0")), RUN_R, RUN_META),
    ("stream since past ticks", _commit(lambda c: c["streams"]["loss"].update(since=9)), RUN_R, RUN_META),
    ("stream name a path", _commit(lambda c: c["streams"].update({"../../s/streams/loss": c["streams"]["loss"]})),
     RUN_R, RUN_META),
    ("stream listed without array", _commit(lambda c: c["streams"].update(ghost=c["streams"]["loss"])),
     {"sql", "export"}, "runs/r/streams/ghost/zarr.json"),
    ("record dtype differs from array", _commit(lambda c: c["streams"]["pix"].update(dtype="float32")), READ_PIX,
     PIX_META),
    ("record element shape differs", _commit(lambda c: c["streams"]["pix"].update(element_shape=[4])), READ_PIX,
     PIX_META),
    ("pending_ticks a string", _commit(lambda c: c.update(pending_ticks="x")), RUN_R, RUN_META),
    ("pending_ticks ragged", _commit(lambda c: c["pending_ticks"].update(step=[1])), RUN_R, RUN_META),
    ("pending_ticks strings", _commit(lambda c: c["pending_ticks"].update(wall=["a", "b"])), RUN_R, RUN_META),
    ("pending_ticks bools", _commit(lambda c: c["pending_ticks"].update(epoch=[True, False])), RUN_R, RUN_META),
    ("pending_ticks longer than ticks", _commit(lambda c: c["pending_ticks"].update(
        {k: v * 4 for k, v in c["pending_ticks"].items()})), RUN_R, RUN_META),
    ("pending_ticks column missing", _commit(lambda c: c["pending_ticks"].pop("wall")), RUN_R, RUN_META),
    ("updated missing", _commit(lambda c: c.pop("updated")), RUN_R, RUN_META),
    ("user attrs a list", _json(RUN_META, lambda d: d["attributes"].update(attrs=[1])), RUN_R, RUN_META),
    ("loss shape fewer ticks", _json(LOSS_META, lambda d: d.update(shape=[3, N])), READ_LOSS, LOSS_META),
    ("loss shape fewer samples", _json(LOSS_META, lambda d: d.update(shape=[16, N - 1])), READ_LOSS, LOSS_META),
    ("loss shape more samples", _json(LOSS_META, lambda d: d.update(shape=[16, N + 9])), READ_LOSS, LOSS_META),
    ("loss shape one dimension", _json(LOSS_META, lambda d: d.update(shape=[16])), READ_LOSS, LOSS_META),
    ("loss shape negative", _json(LOSS_META, lambda d: d.update(shape=[-16, N])), READ_LOSS, LOSS_META),
    ("loss data type int32", _json(LOSS_META, lambda d: d.update(data_type="int32")), READ_LOSS, LOSS_META),
    ("loss chunk shape changed", _json(LOSS_META, lambda d: d["chunk_grid"]["configuration"].update(
        chunk_shape=[1, 8])), READ_LOSS, (LOSS_META, "runs/r/streams/loss/c/")),  # found decoding a chunk
    ("loss chunk grid a string", _json(LOSS_META, lambda d: d.update(chunk_grid="regular")), READ_LOSS, LOSS_META),
    ("loss fill value 0", _json(LOSS_META, lambda d: d.update(fill_value=0.0)), READ_LOSS, LOSS_META),
    ("loss unknown codec", _json(LOSS_META, lambda d: d.update(codecs=[{"name": "nope"}])), READ_LOSS, LOSS_META),
    ("loss is a group", _json(LOSS_META, lambda d: d.update(node_type="group")), READ_LOSS, LOSS_META),
    ("pix element shape changed", _json(PIX_META, lambda d: d.update(shape=[16, N, 4])), READ_PIX, PIX_META),
    ("ticks shape fewer rows", _json("runs/r/ticks/step/zarr.json", lambda d: d.update(shape=[2])), READ_TICKS,
     "runs/r/ticks/step/zarr.json"),
    ("ticks data type float", _json("runs/r/ticks/epoch/zarr.json", lambda d: d.update(data_type="float64")),
     READ_TICKS, "runs/r/ticks/epoch/zarr.json"),
    ("sample ids fewer", _json("samples/sample_id/zarr.json", lambda d: d.update(shape=[N - 1])), ALL, "samples/"),
    ("sample ids float", _json("samples/sample_id/zarr.json", lambda d: d.update(data_type="float64")), ALL,
     "samples/sample_id/zarr.json"),
    ("labels fewer", _json("samples/label/zarr.json", lambda d: d.update(shape=[30])), ALL,
     "samples/label/zarr.json"),
    ("splits more", _json("samples/split/zarr.json", lambda d: d.update(shape=[N + 1])), ALL,
     "samples/split/zarr.json"),
    ("class names a string", _json("samples/label/zarr.json", lambda d: d["attributes"].update(classes="abc")),
     ALL, "samples/label/zarr.json"),
    ("version a string", _json("zarr.json", lambda d: d["attributes"].update(version="1")), ALL, ""),
]


#: Cases also read through DuckDB and exported (0.1-0.3 s more each): one or more of every kind of damage.
WITH_SQL = {
    "loss chunk truncated", "loss chunk garbage", "pix chunk truncated", "ticks chunk deleted", "label chunk deleted",
    "run zarr.json bad JSON", "loss zarr.json bad JSON", "pix array metadata missing", "ticks array missing",
    "ticks huge", "ticks past the rows written", "stream listed without array", "record element shape differs",
    "pending_ticks ragged", "updated missing", "loss shape fewer samples", "loss fill value 0", "loss unknown codec",
    "ticks shape fewer rows", "sample ids float",
}
QUICK = {k: v for k, v in READERS.items() if k not in ("sql", "export")}


@pytest.mark.parametrize(("case", "damage", "must_raise", "names"), CASES, ids=[c[0] for c in CASES])
def test_damaged_ledger_raises_naming_the_file_or_reads_right(base, pristine, tmp_path, case, damage, must_raise,
                                                              names):
    path = tmp_path / "d.ll"
    shutil.copytree(base, path)
    damage(path)
    readers = READERS if case in WITH_SQL else QUICK
    got = check(path, pristine, must_raise & set(readers), names, readers=readers)
    if must_raise is ALL:
        assert isinstance(got["info"], CorruptLedgerError | ll.errors.NotALedgerError), got["info"]


def test_deleted_stream_chunk_reads_as_not_logged(base, pristine, tmp_path):
    path = tmp_path / "d.ll"
    shutil.copytree(base, path)
    (path / LOSS_CHUNK).unlink()  # tick 1, samples 16..31
    want = expected_loss()
    want[16:32, 1] = np.nan
    ref = numpy_scores(want)
    got = check(path, pristine, set(), LOSS_CHUNK, expect={
        "traj_loss": want,
        "traj_loss_ids": want[[39, 0, 20, 0]][:, [4, 1]],
        "scores_loss": {**pristine["scores_loss"], **ref},
        "sql": OWN,
        "export": OWN,
    })
    for column, values in ref.items():
        np.testing.assert_allclose(got["scores_loss"][column], values, rtol=1e-12, err_msg=column)
    sql = {(r, s): n for r, s, n in zip(got["sql"]["run"], got["sql"]["stream"], got["sql"]["n"])}
    assert sql[("r", "loss")] == np.count_nonzero(~np.isnan(want))  # losses: NaN is not a row
    assert sql[("r", "lossepoch")] == ref["n_obs"].sum()
    export = got["export"]
    rows = np.flatnonzero((np.asarray(export["run"]) == "r") & (np.asarray(export["stream"]) == "loss"))
    np.testing.assert_array_equal(np.asarray(export["n_obs"])[rows], ref["n_obs"])


def test_killed_runs_metadata_hides_the_run_and_the_writer_refuses_to_wipe_it(base, tmp_path):
    path = tmp_path / "d.ll"
    shutil.copytree(base, path)
    (path / RUN_META).unlink()
    led = ll.open(path, mode="a")
    assert led.runs == ["s"]  # a run exists once its metadata is written (a killed creation leaves none)
    with pytest.raises(CorruptLedgerError, match="zarr.json.*missing") as info:
        led.run("r")
    assert str(path / RUN_META) in str(info.value)
    assert (path / LOSS_CHUNK).exists()  # nothing was deleted
    led.close()


@pytest.mark.parametrize(("chunk", "must_raise"), [
    (LOSS_CHUNK, READ_LOSS), (PIX_CHUNK, READ_PIX), (TICKS_CHUNK, READ_TICKS), ("samples/sample_id/c/0", ALL),
], ids=["loss", "pixel", "ticks", "samples"])
@pytest.mark.parametrize("where", [0, 20, -5, -1], ids=["header", "body", "last-value", "checksum"])
def test_bit_flip_inside_a_chunk_is_detected(base, pristine, tmp_path, chunk, must_raise, where):
    path = tmp_path / "d.ll"
    shutil.copytree(base, path)
    data = bytearray((path / chunk).read_bytes())
    data[where] ^= 0x10  # e.g. a bit of a stored float32 (small chunks are stored uncompressed: blosc's memcpy)
    (path / chunk).write_bytes(bytes(data))
    got = check(path, pristine, must_raise & set(QUICK), chunk, readers=QUICK)
    assert any("fails its crc32c checksum" in str(result) for result in got.values())


def test_analyses_on_a_stream_array_of_the_wrong_shape(base, tmp_path):
    path = tmp_path / "d.ll"
    shutil.copytree(base, path)
    _json(LOSS_META, lambda d: d.update(shape=[16, N - 1]))(path)
    ledger = ll.open(path)
    for analysis in (
        lambda: ll.dynamics.aum(ledger, "r", margin="loss"),
        lambda: ll.analysis.memorization_window(ledger, "r"),
        lambda: ll.analysis.cluster_curves(ledger, "r"),
    ):
        with pytest.raises(CorruptLedgerError, match="rows, but the ledger has 40 samples"):
            analysis()


# --- random damage -------------------------------------------------------------------------------------
def _files(base: Path) -> list[str]:
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())


def _is_stream_chunk(rel: str) -> bool:
    return "/streams/" in rel and "/c/" in rel


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_damage_raises_naming_the_file_or_reads_right(base, pristine, tmp_path_factory, data):
    files = [f for f in _files(base) if f != RUN_META]  # a deleted RUN_META hides the run (test above)
    rel = data.draw(st.sampled_from(files), label="file")
    size = (base / rel).stat().st_size
    kinds = ["truncate", "garbage", "delete"] + (["bit flip"] if "/c/" in rel else [])  # JSON has no checksum
    kind = data.draw(st.sampled_from(kinds), label="damage")
    path = tmp_path_factory.mktemp("random") / "d.ll"
    shutil.copytree(base, path)
    if kind == "bit flip":
        damaged = bytearray((base / rel).read_bytes())
        damaged[data.draw(st.integers(0, size - 1), label="byte")] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        (path / rel).write_bytes(bytes(damaged))
    elif kind == "truncate":
        (path / rel).write_bytes((base / rel).read_bytes()[: data.draw(st.integers(0, max(0, size - 1)))])
    elif kind == "garbage":
        (path / rel).write_bytes(data.draw(st.binary(min_size=0, max_size=2 * size + 16), label="bytes"))
    else:
        (path / rel).unlink()
    if kind == "delete" and _is_stream_chunk(rel):
        return  # reads as not logged: test_deleted_stream_chunk_reads_as_not_logged
    if kind == "delete" and rel.startswith("runs/") and rel.count("/") == 2 and rel.endswith("/zarr.json"):
        return  # hides that run: test_killed_runs_metadata_hides_the_run_and_the_writer_refuses_to_wipe_it
    # A damaged chunk of stream data must be found by every reader of it.
    must = set()
    if _is_stream_chunk(rel) and kind != "delete" and "/r/" in rel:
        must = {"traj_loss", "scores_loss"} if "/loss/" in rel else {"traj_pix", "scores_pix"}
    check(path, pristine, must, rel if rel.endswith("zarr.json") or "/c/" in rel else "", readers=QUICK)
    shutil.rmtree(path.parent)
