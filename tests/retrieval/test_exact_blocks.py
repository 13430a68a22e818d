"""The catalogue's exact search in blocks (`catalogue.exact_shard`, `select_best`) against naive loops."""

import numpy as np
import pytest

from pnpp_tf.retrieval import catalogue as catalogue_lib
from pnpp_tf.retrieval.shards import DTYPES, Shard


def naive_best(scores, k):
    """Each row's k best (score, column) by score descending, then column ascending."""
    rows = [sorted(range(len(row)), key=lambda column: (-row[column], column))[:k] for row in scores]
    return np.take_along_axis(scores, np.array(rows), axis=1), np.array(rows)


@pytest.mark.parametrize("k", [1, 3, 10, 39, 40])
def test_select_best_keeps_the_lowest_columns_of_a_tie_across_the_cut(k):
    # Five distinct values over 40 columns: nearly every cut falls inside a run of ties.
    scores = np.random.default_rng(k).integers(0, 5, size=(50, 40)).astype(np.float32)
    values, columns = catalogue_lib.select_best(scores, k)
    expected_values, expected_columns = naive_best(scores, k)
    np.testing.assert_array_equal(columns, expected_columns)
    np.testing.assert_array_equal(values, expected_values)
    assert columns.dtype == np.int64


def exact_unit_rows(count, dim, seed):
    """Unit rows whose entries are 0, +-1/2 or +-1, so that every dot product is exact in float32
    whatever the summation order, and many tie."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((count, dim), np.float32)
    for row in rows:
        chosen = rng.choice(dim, size=rng.choice([1, 4]), replace=False)
        row[chosen] = rng.choice([-1.0, 1.0], size=len(chosen)) / np.sqrt(len(chosen))
    return rows


@pytest.mark.parametrize("dtype", DTYPES)
def test_an_exact_search_in_many_blocks_is_the_naive_loop(tmp_path, monkeypatch, dtype):
    rows = exact_unit_rows(61, 8, seed=1)
    rows[[9, 30, 60]] = rows[4]  # duplicates in other row blocks: listed by row
    queries = np.concatenate([exact_unit_rows(7, 8, seed=2), rows[[4]]])
    shard = Shard.write(str(tmp_path / "shard"), rows, [(f"{i}.png", 1, 1) for i in range(61)], dtype)
    # Blocks of 3 queries, and of 7 scores per query block (so 2 or 3 rows at a time, at least
    # k): every list is merged from many blocks.
    monkeypatch.setattr(catalogue_lib, "_QUERY_BLOCK", 3)
    monkeypatch.setattr(catalogue_lib, "_EXACT_SCORES", 7)
    monkeypatch.setattr(catalogue_lib, "_DECODE_BLOCK", 5)
    scores = queries.astype(np.float64) @ shard.unit_rows().astype(np.float64).T
    for k in (1, 4, 20, 61):
        similarities, found = catalogue_lib.exact_shard(shard, queries, k)
        expected_similarities, expected_rows = naive_best(scores, k)
        np.testing.assert_array_equal(found, expected_rows)
        np.testing.assert_array_equal(similarities, expected_similarities.astype(np.float32))
    assert catalogue_lib.exact_shard(shard, rows[[4]], 4)[1].tolist() == [[4, 9, 30, 60]]
