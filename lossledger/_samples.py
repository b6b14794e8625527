"""The ``samples/`` group: stable sample ids, optional labels and splits, and the id -> row index."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._arrays import as_ids, to_numpy
from ._commit import DAMAGED, column_meta, read_column
from ._store import StoreIO
from .errors import CorruptLedgerError, InvalidDTypeError, ShapeMismatchError, UnknownSampleError

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Samples:
    """The samples of a ledger, in row order (row i of every stream is sample ``sample_id[i]``)."""

    sample_id: np.ndarray  # (N,) int64
    label: np.ndarray | None  # (N,) int32 or None
    classes: tuple[str, ...] | None
    split: np.ndarray | None  # (N,) int8 codes into `splits`, or None
    splits: tuple[str, ...] | None

    @property
    def n(self) -> int:
        return int(self.sample_id.shape[0])


def build_samples(
    *,
    sample_ids: object | None,
    n_samples: int | None,
    labels: object | None,
    classes: Sequence[str] | None,
    splits: object | None,
) -> Samples:
    """Validate the ``create`` arguments into a :class:`Samples`."""
    if (sample_ids is None) == (n_samples is None):
        raise ShapeMismatchError(
            "pass exactly one of sample_ids= (your stable int64 ids) or n_samples= (ids 0..n_samples-1)"
        )
    if sample_ids is None:
        if not isinstance(n_samples, (int, np.integer)) or isinstance(n_samples, bool) or n_samples < 1:
            raise ShapeMismatchError(f"n_samples must be a positive integer, got {n_samples!r}")
        ids = np.arange(int(n_samples), dtype=np.int64)
    else:
        ids = as_ids(sample_ids).copy()
        if ids.size == 0:
            raise ShapeMismatchError("sample_ids is empty; a ledger needs at least one sample")
        sorted_ids = np.sort(ids)
        repeated = sorted_ids[1:][np.diff(sorted_ids) == 0]
        if repeated.size:
            raise ShapeMismatchError(
                f"sample_ids must be unique; repeated ids include {np.unique(repeated)[:5].tolist()}"
            )
    n = ids.size
    label_arr = None
    if labels is not None:
        label_arr = to_numpy(labels, "labels")
        if label_arr.dtype.kind not in "iu":
            raise InvalidDTypeError(f"labels must be integer class indices, got dtype {label_arr.dtype}")
        if label_arr.shape != (n,):
            raise ShapeMismatchError(f"labels must have shape ({n},) like the sample ids, got {label_arr.shape}")
        label_arr = label_arr.astype(np.int32)
        if classes is not None and label_arr.size and (label_arr.min() < 0 or label_arr.max() >= len(classes)):
            raise ShapeMismatchError(
                f"labels must lie in 0..{len(classes) - 1} to index classes; got {label_arr.min()}..{label_arr.max()}"
            )
    if classes is not None:
        if label_arr is None:
            raise ShapeMismatchError("classes= names the labels; pass labels= too")
        classes = tuple(str(c) for c in classes)
    split_codes, split_names = None, None
    if splits is not None:
        raw = np.asarray(to_numpy(splits, "splits")).astype(str)
        if raw.shape != (n,):
            raise ShapeMismatchError(f"splits must have shape ({n},) like the sample ids, got {raw.shape}")
        names, codes = np.unique(raw, return_inverse=True)
        if names.size > 127:
            raise ShapeMismatchError(f"splits has {names.size} distinct names; at most 127 are supported")
        split_codes, split_names = codes.astype(np.int8), tuple(str(s) for s in names)
    return Samples(ids, label_arr, classes, split_codes, split_names)


def write_samples(io: StoreIO, samples: Samples) -> None:
    """Write the ``samples/`` group (once, at creation)."""
    io.create_group("samples")
    n = samples.n
    columns: list[tuple[str, np.ndarray, dict]] = [("sample_id", samples.sample_id, {})]
    if samples.label is not None:
        attrs = {"classes": list(samples.classes)} if samples.classes is not None else {}
        columns.append(("label", samples.label, attrs))
    if samples.split is not None:
        columns.append(("split", samples.split, {"splits": list(samples.splits or ())}))
    for name, values, attrs in columns:
        io.create_array(
            f"samples/{name}", shape=(n,), chunks=(min(n, _CHUNK),), dtype=str(values.dtype), fill_value=-1,
            attributes=attrs,
        )
        io.write_array(f"samples/{name}", values)


def read_samples(io: StoreIO) -> Samples:
    """Read the ``samples/`` group (O(N) memory), checking it: :class:`CorruptLedgerError` names a damaged file.

    Zarr does not store a chunk that holds only the fill value (-1), so a missing chunk reads as -1 where
    that can be data: labels without class names, and a chunk of a single id. Anywhere else (labels with
    class names, split codes, more ids) a missing chunk is damage.
    """
    ids = read_column(io, "samples/sample_id", "int64", fill_missing_up_to=1)
    n = ids.size
    label = classes = split = splits = None
    for column in ("label", "split"):
        if not io.exists(f"samples/{column}/zarr.json") and io.list_dir(f"samples/{column}"):
            raise CorruptLedgerError(
                f"{io.root / 'samples' / column / 'zarr.json'} is missing but samples/{column} holds chunks; {DAMAGED}"
            )
    if io.exists("samples/label/zarr.json"):
        classes = _names(io, "label", "classes")
        label = _column(io, "label", "int32", n, fill_missing=classes is None)
        if classes is not None and n and (label.min() < 0 or label.max() >= len(classes)):
            raise CorruptLedgerError(
                f"{io.root / 'samples' / 'label'} holds labels {label.min()}..{label.max()}, outside the "
                f"{len(classes)} classes; {DAMAGED}"
            )
    if io.exists("samples/split/zarr.json"):
        split = _column(io, "split", "int8", n, fill_missing=False)
        splits = _names(io, "split", "splits") or ()
        if n and (split.min() < 0 or split.max() >= len(splits)):
            raise CorruptLedgerError(
                f"{io.root / 'samples' / 'split'} holds split codes {split.min()}..{split.max()}, outside the "
                f"{len(splits)} split names; {DAMAGED}"
            )
    return Samples(ids, label, classes, split, splits)


def _column(io: StoreIO, name: str, dtype: str, n: int, *, fill_missing: bool) -> np.ndarray:
    rows = column_meta(io, f"samples/{name}", dtype, None)["shape"][0]
    if rows != n:
        raise CorruptLedgerError(
            f"{io.root / 'samples' / name / 'zarr.json'} has {rows} rows, but samples/sample_id has {n}; {DAMAGED}"
        )
    return read_column(io, f"samples/{name}", dtype, rows=n, fill_missing_up_to=n if fill_missing else 0)


def _names(io: StoreIO, column: str, attribute: str) -> tuple[str, ...] | None:
    """The names in ``samples/<column>``'s attribute (class or split names), checked to be a list of strings."""
    attrs = io.get_json(f"samples/{column}/zarr.json").get("attributes", {})  # type: ignore[union-attr]
    if not isinstance(attrs, dict) or attribute not in attrs:
        return None
    names = attrs[attribute]
    if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
        raise CorruptLedgerError(
            f"{io.root / 'samples' / column / 'zarr.json'}: attribute {attribute!r} is {names!r}, not a list of "
            f"names; {DAMAGED}"
        )
    return tuple(names)


class SampleIndex:
    """Maps sample ids to rows: O(1) per id when ids are 0..N-1, else a binary search (O(log N)).

    Memory: nothing beyond the ids for ids 0..N-1; else the sort order and the sorted ids (16 bytes per sample).
    """

    def __init__(self, sample_id: np.ndarray) -> None:
        self.n = int(sample_id.size)
        self._identity = _is_range(sample_id)
        if not self._identity:
            self._order = np.argsort(sample_id, kind="stable")
            self._sorted = sample_id[self._order]
            repeated = self._sorted[1:][self._sorted[1:] == self._sorted[:-1]]
            if repeated.size:  # create() refuses repeated ids: the stored ids were damaged
                raise CorruptLedgerError(
                    f"the ledger's sample ids repeat (e.g. {np.unique(repeated)[:5].tolist()}); samples/sample_id "
                    "is damaged"
                )

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id (int64, same shape); raises :class:`UnknownSampleError` naming bad ids."""
        if self._identity:
            if ids.size and (ids.min() < 0 or ids.max() >= self.n):
                bad = ids[(ids < 0) | (ids >= self.n)]
                raise UnknownSampleError(
                    f"{bad.size} id(s) out of range 0..{self.n - 1}, e.g. {bad[:5].tolist()}; this ledger has "
                    f"{self.n} samples with ids 0..{self.n - 1}: use only those (create the ledger with "
                    "sample_ids= to use other ids)"
                )
            return ids
        pos = np.searchsorted(self._sorted, ids)
        pos_clipped = np.minimum(pos, self.n - 1)
        found = self._sorted[pos_clipped] == ids
        if not found.all():
            bad = ids[~found]
            raise UnknownSampleError(
                f"{bad.size} id(s) are not samples of this ledger, e.g. {bad[:5].tolist()}; use only the "
                "sample_ids given to lossledger.create()"
            )
        return self._order[pos_clipped]


def _is_range(sample_id: np.ndarray) -> bool:
    """Whether the ids are 0..N-1 in order; compared a chunk at a time (no N-sized temporary)."""
    n = int(sample_id.size)
    if not n or sample_id[0] != 0 or sample_id[-1] != n - 1:
        return False
    return all(
        np.array_equal(sample_id[lo : lo + _CHUNK], np.arange(lo, min(n, lo + _CHUNK))) for lo in range(0, n, _CHUNK)
    )
