"""Searching a catalogue: the exact search in blocks (`catalogue.exact_shard`, `select_best`) against
naive loops, search-time settings of the approximate backends, and a catalogue read into memory."""

import numpy as np
import pytest

from pnpp_tf.errors import UserError
from pnpp_tf.retrieval import ann
from pnpp_tf.retrieval import catalogue as catalogue_lib
from pnpp_tf.retrieval.catalogue import Catalogue
from pnpp_tf.retrieval.cataloguing import write_catalogue
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


@pytest.fixture(scope="module")
def ivfpq_catalogue(tmp_path_factory):
    """10,000 random 16-d rows in one IVF-PQ shard (256 lists, the default probes as built)."""
    rows = np.random.default_rng(5).standard_normal((10_000, 16)).astype(np.float32)
    keys = [(f"{i}.png", 1, 1) for i in range(len(rows))]
    directory = str(tmp_path_factory.mktemp("ivf") / "rows.index")
    write_catalogue(directory, rows, keys, "/nowhere", backend="ivfpq", params=ann.AnnParams(), verbose=0)
    return directory, rows


def test_search_settings_replace_the_built_ones_without_a_rebuild(ivfpq_catalogue):
    directory, rows = ivfpq_catalogue
    queries = np.random.default_rng(6).standard_normal((20, 16)).astype(np.float32)
    exact = Catalogue.open(directory).search(queries, k=10, backend="exact")[1]
    # Every list probed and every row re-scored: the exact lists, whatever PQ's own order.
    everything = Catalogue.open(directory, search_settings={"probes": 10_000})
    assert everything.search(queries, k=10, rescore=len(rows))[1].tolist() == exact.tolist()
    # One list of 256 holds about 40 rows: most of each exact top 10 is elsewhere.
    one = Catalogue.open(directory, search_settings={"probes": 1, "expansion_search": 0})
    _, found, used = one.search(queries, k=10, rescore=len(rows))
    assert used == "ivfpq" and np.mean([len(set(a) & set(b)) for a, b in zip(found, exact)]) < 5
    with pytest.raises(UserError, match="--ivf_probes=-3"):
        Catalogue.open(directory, search_settings={"probes": -3})


def test_a_catalogue_read_into_memory_answers_as_mapped(ivfpq_catalogue):
    directory, _ = ivfpq_catalogue
    queries = np.random.default_rng(7).standard_normal((5, 16)).astype(np.float32)
    mapped = Catalogue.open(directory)
    loaded = Catalogue.open(directory)
    loaded.read_into_memory()
    assert not any(isinstance(shard.embeddings, np.memmap) for shard in loaded.shards)
    for backend in ("exact", "ivfpq"):
        expected, got = mapped.search(queries, k=7, backend=backend), loaded.search(queries, k=7, backend=backend)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[0], expected[0])


def test_ivfpq_shards_share_the_first_ones_quantiser(tmp_path, monkeypatch):
    rows = np.random.default_rng(8).standard_normal((25_000, 16)).astype(np.float32)
    keys = [(f"{i}.png", 1, 1) for i in range(len(rows))]
    directory = str(tmp_path / "rows.index")
    # 10,000 + 10,000 + 5,000 rows: the first trains; the others, the last too small to train
    # its own, copy it.
    write_catalogue(directory, rows, keys, "/nowhere", backend="ivfpq", params=ann.AnnParams(probes=4),
                    shard_size=10_000, verbose=0)
    catalogue = Catalogue.open(directory)
    structures = [catalogue._structure(shard, "ivfpq") for shard in catalogue.shards]  # pylint: disable=protected-access
    assert len(structures) == 3 and all(s.kind.startswith("faiss IVF-PQ") for s in structures)
    assert len({s.quantizer_key for s in structures}) == 1 and structures[0].quantizer_key
    queries = np.random.default_rng(9).standard_normal((30, 16)).astype(np.float32)
    shared = catalogue.search(queries, k=10)
    assert shared[2] == "ivfpq"
    # Every list probed and every item re-scored: the exact lists, from one shortlist per query
    # drawn from the three shards by their PQ scores.
    whole = Catalogue.open(directory, search_settings={"probes": 10_000}).search(queries, k=10, rescore=len(rows))
    np.testing.assert_array_equal(whole[1], catalogue.search(queries, k=10, backend="exact")[1])
    # One assignment for the three equals each shard assigning the queries itself.
    monkeypatch.setattr(Catalogue, "_assign", lambda self, queries, backend: {})
    alone = Catalogue.open(directory).search(queries, k=10)
    np.testing.assert_array_equal(shared[1], alone[1])
    np.testing.assert_array_equal(shared[0], alone[0])
