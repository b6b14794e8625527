"""Every bad input: the right LedgerError subclass (also the matching builtin), a message that says what
to do, and nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest

import lossledger as ll
from lossledger import errors as E


@pytest.fixture
def run(ledger):
    with ledger.run("r") as r:
        r.log([0, 1], loss=[1.0, 2.0])
        r.end_epoch()
        yield r


BAD_LOGS = [
    # (ids, streams, error class, builtin, message fragment that says what to do)
    ([0, 1, 2], {"loss": [1.0, 2.0]}, E.ShapeMismatchError, ValueError, "one value per sample"),
    ([0, 1], {"loss": 1.0}, E.ShapeMismatchError, ValueError, "one value per sample"),
    ([[0, 1]], {"loss": [1.0, 2.0]}, E.ShapeMismatchError, ValueError, "one id per sample"),
    ([0, 10], {"loss": [1.0, 2.0]}, E.UnknownSampleError, KeyError, "ids 0..9"),
    ([-1, 0], {"loss": [1.0, 2.0]}, E.UnknownSampleError, KeyError, "ids 0..9"),
    ([0, 1], {"loss": [1.0, np.nan]}, E.NonFiniteValueError, ValueError, "allow_nonfinite=True"),
    ([0, 1], {"loss": [np.inf, 1.0]}, E.NonFiniteValueError, ValueError, "allow_nonfinite=True"),
    ([0, 1], {"loss": np.array([1 + 1j, 2])}, E.InvalidDTypeError, TypeError, "real numbers"),
    ([0, 1], {"loss": ["a", "b"]}, E.InvalidDTypeError, TypeError, "real numbers"),
    ([0, 1], {"loss": np.array([object(), object()])}, E.InvalidDTypeError, TypeError, "real numbers"),
    ([0.0, 1.0], {"loss": [1.0, 2.0]}, E.InvalidDTypeError, TypeError, "int64"),
    (["0", "1"], {"loss": [1.0, 2.0]}, E.InvalidDTypeError, TypeError, "int64"),
    ([0, 1], {"loss": np.ones((2, 3))}, E.ShapeMismatchError, ValueError, "new stream name"),
    ([0, 0], {"loss": [1.0, 2.0]}, E.DuplicateSampleError, ValueError, "on_duplicate="),
    ([0, 1], {"../evil": [1.0, 2.0]}, E.InvalidNameError, ValueError, "Python identifier"),
    ([0, 1], {"ids": [1.0, 2.0]}, E.InvalidNameError, ValueError, "Python identifier"),
    ([0, 1], {}, E.ShapeMismatchError, ValueError, "as keywords"),
]


@pytest.mark.parametrize(("ids", "streams", "cls", "builtin", "hint"), BAD_LOGS)
def test_bad_log_raises_and_records_nothing(ledger, run, ids, streams, cls, builtin, hint):
    run.log([5], loss=[5.0])
    # A good stream in the same call must not be recorded either.
    good = {"loss": [9.0] * len(ids)} if streams and "loss" not in streams and np.ndim(ids) == 1 else {}
    with pytest.raises(cls) as info:
        run.log(ids, **good, **streams)
    assert isinstance(info.value, E.LedgerError) and isinstance(info.value, builtin)
    assert hint in str(info.value), str(info.value)
    run.end_epoch()
    got = ledger.trajectories("r")[:, 1]
    expected = np.full(10, np.nan, np.float32)
    expected[5] = 5.0
    np.testing.assert_array_equal(got, expected)
    assert ledger.streams("r")["stream"].to_pylist() == ["loss"]


def test_duplicate_across_calls_in_one_tick(ledger, run):
    run.log([3], loss=[1.0])
    with pytest.raises(E.DuplicateSampleError, match=r"\[3\] logged twice"):
        run.log([4, 3], loss=[1.0, 1.0])
    run.end_epoch()
    np.testing.assert_array_equal(ledger.trajectories("r", ids=[3, 4])[:, 1], [1.0, np.nan])


def test_element_shape_change_mid_run(run):
    run.log([0], emb=np.zeros((1, 4)))
    run.end_epoch()
    with pytest.raises(E.ShapeMismatchError, match=r"element shape \(4,\)"):
        run.log([0], emb=np.zeros((1, 5)))


def test_unknown_custom_id(tmp_path):
    led = ll.create(tmp_path / "c.ll", sample_ids=[100, 200])
    with led.run("r") as r:
        with pytest.raises(E.UnknownSampleError, match=r"\[150\].*sample_ids given to lossledger.create") as info:
            r.log([100, 150], loss=[1.0, 2.0])
        assert str(info.value).startswith("1 id(s)")  # no KeyError quoting


def test_float16_overflow(ledger):
    with ledger.run("r", stream_dtypes={"loss": "float16"}) as r:
        with pytest.raises(E.NonFiniteValueError, match="float32"):
            r.log([0], loss=[1e6])


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 129, "sp ace", None, 3])
def test_unsafe_run_names(ledger, store_files, name):
    before = store_files(ledger.path)
    with pytest.raises(E.InvalidNameError, match="letters, digits"):
        ledger.run(name)
    assert store_files(ledger.path) == before


@pytest.mark.parametrize(
    ("kwargs", "cls", "hint"),
    [
        ({"on_duplicate": "max"}, E.ShapeMismatchError, "one of"),
        ({"stream_dtypes": {"loss": "float64"}}, E.InvalidDTypeError, "float16"),
        ({"stream_dtypes": {"a-b": "float16"}}, E.InvalidNameError, "identifier"),
        ({"model": object()}, E.InvalidDTypeError, "not JSON"),
        ({"lr": float("nan")}, E.InvalidDTypeError, "finite"),
    ],
)
def test_bad_run_options_write_nothing(ledger, store_files, kwargs, cls, hint):
    before = store_files(ledger.path)
    with pytest.raises(cls, match=hint):
        ledger.run("r", **kwargs)
    assert store_files(ledger.path) == before
    assert ledger.runs == []


def test_write_in_read_mode(ledger, store_files):
    reader = ll.open(ledger.path)
    before = store_files(ledger.path)
    with pytest.raises(E.ReadOnlyError, match="mode='a'") as info:
        reader.run("r")
    assert isinstance(info.value, PermissionError)
    assert store_files(ledger.path) == before


def test_closed_run(run):
    run.close()
    with pytest.raises(E.RunClosedError, match=r"ledger.run\('r'\)"):
        run.log([0], loss=[1.0])


def test_second_writer_refused_in_process(ledger, run):
    with pytest.raises(E.RunLockedError, match="another writer") as info:
        ledger.run("r")
    assert isinstance(info.value, BlockingIOError)
    other = ledger.run("other")  # other runs of the same ledger are fine
    other.close()


def test_open_missing_path(tmp_path):
    with pytest.raises(E.LedgerNotFoundError, match="lossledger.create") as info:
        ll.open(tmp_path / "nope.ll")
    assert isinstance(info.value, FileNotFoundError)


def test_open_something_that_is_not_a_ledger(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "data.txt").write_text("hi")
    with pytest.raises(E.NotALedgerError, match="lossledger.create"):
        ll.open(tmp_path / "plain")
    import zarr

    zarr.open_group(tmp_path / "zgroup", mode="w")
    with pytest.raises(E.NotALedgerError):
        ll.open(tmp_path / "zgroup")


def test_open_future_version(ledger):
    meta_path = ledger.path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["version"] = ll.format.FORMAT_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(E.FormatVersionError, match="upgrade lossledger") as info:
        ll.open(ledger.path)
    assert isinstance(info.value, ValueError)


def test_create_over_existing(ledger, store_files, tmp_path):
    before = store_files(ledger.path)
    with pytest.raises(E.LedgerExistsError, match="overwrite=True") as info:
        ll.create(ledger.path, n_samples=3)
    assert isinstance(info.value, FileExistsError)
    assert store_files(ledger.path) == before
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(E.LedgerExistsError, match="never deletes"):
        ll.create(other, n_samples=3, overwrite=True)
    assert (other / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize(
    ("kwargs", "hint"),
    [
        ({}, "exactly one of"),
        ({"n_samples": 3, "sample_ids": [1, 2, 3]}, "exactly one of"),
        ({"n_samples": 0}, "positive integer"),
        ({"sample_ids": [1, 2, 2]}, r"repeated ids include \[2\]"),
        ({"sample_ids": []}, "at least one sample"),
        ({"n_samples": 3, "labels": [0, 1]}, r"shape \(3,\)"),
        ({"n_samples": 3, "labels": [0.5, 1, 1]}, "integer class indices"),
        ({"n_samples": 3, "labels": [0, 1, 2], "classes": ["a", "b"]}, r"0\.\.1"),
        ({"n_samples": 3, "classes": ["a"]}, "labels= too"),
        ({"n_samples": 2, "splits": ["train"]}, r"shape \(2,\)"),
    ],
)
def test_bad_create_arguments_write_nothing(tmp_path, kwargs, hint):
    with pytest.raises(E.LedgerError, match=hint) as info:
        ll.create(tmp_path / "x.ll", **kwargs)
    assert isinstance(info.value, (ValueError, TypeError))
    assert list(tmp_path.iterdir()) == []


def test_create_in_missing_folder(tmp_path):
    with pytest.raises(E.LedgerNotFoundError, match="create it first"):
        ll.create(tmp_path / "no" / "such" / "x.ll", n_samples=2)


def test_unknown_run_and_stream(ledger, run):
    with pytest.raises(E.UnknownRunError, match=r"existing runs: \['r'\]"):
        ledger.trajectories("nope")
    with pytest.raises(E.UnknownStreamError, match=r"streams are \['loss'\]"):
        ledger.trajectories("r", "pixel")
    with pytest.raises(E.ShapeMismatchError, match="committed tick"):
        ledger.trajectories("r", ticks=[5])


def test_every_error_is_exported_and_in_the_hierarchy():
    for name in E.__all__:
        cls = getattr(E, name)
        if name == "LedgerWarning":
            assert issubclass(cls, UserWarning)
        else:
            assert issubclass(cls, E.LedgerError)
