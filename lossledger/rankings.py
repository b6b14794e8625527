"""Rankings of samples by a score: the hardest and easiest examples, overall or per class."""

from __future__ import annotations

import duckdb
import pyarrow as pa

from .errors import ShapeMismatchError


def top_k(scores: pa.Table, samples: pa.Table, k: int, *, by: str, hardest: bool, per_class: bool) -> pa.Table:
    """The ``k`` samples with the highest (``hardest``) or lowest ``by`` score, or ``k`` per label.

    ``scores``: a table from :meth:`Ledger.scores`; samples never observed (NaN) are never ranked. Returns
    ``rank`` (1-based, within the class when ``per_class``), ``sample_id``, ``label``/``class`` when known, and
    every score column. Memory: DuckDB's top-k keeps k rows per group.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ShapeMismatchError(f"k must be a positive integer, got {k!r}")
    numeric = [f.name for f in scores.schema if pa.types.is_floating(f.type) or f.name == "n_obs"]
    if by not in numeric:
        raise ShapeMismatchError(f"cannot rank by {by!r}; choose one of {numeric}")
    if per_class and "label" not in scores.column_names:
        raise ShapeMismatchError("per_class=True needs labels; create the ledger with labels=...")
    order = "DESC" if hardest else "ASC"
    partition = "PARTITION BY s.label " if per_class else ""
    has_class = "class" in samples.column_names
    con = duckdb.connect()
    try:
        con.register("s_in", scores)
        con.register("samples_in", samples.select(["sample_id", "class"]) if has_class else samples.select(["sample_id"]))
        class_col = ", m.class" if has_class else ""
        # Ties are broken by sample_id so that a ranking is reproducible.
        sql = f"""
            SELECT row_number() OVER ({partition}ORDER BY s."{by}" {order}, s.sample_id) AS rank, s.*{class_col}
            FROM s_in s JOIN samples_in m USING (sample_id)
            WHERE NOT isnan(s."{by}")
            QUALIFY rank <= {k}
            ORDER BY {"s.label, " if per_class else ""}rank
        """
        table = con.sql(sql).to_arrow_table()
    finally:
        con.close()
    if has_class:  # class right after label
        names = [n for n in table.column_names if n != "class"]
        names.insert(names.index("label") + 1 if "label" in names else 2, "class")
        table = table.select(names)
    return table
