"""pnpp_tf.retrieval.shards and catalogue: a shard's files, the exact search in blocks
(`catalogue.exact_shard`, `select_best`) against naive loops, approximate search (shared IVF
quantiser, search-time settings, shortlists re-scored exactly), a catalogue read into memory, and
the memory a mapped search holds."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from catalogue_testing import (CHILD, INT8_SLACK, child_env, directory_bytes, exact_rows, import_ann, one_line,
                               write_catalogue)
from pnpp_tf.errors import UserError
from pnpp_tf.retrieval import ann, cataloguing, neighbours
from pnpp_tf.retrieval import catalogue as catalogue_lib
from pnpp_tf.retrieval.catalogue import Catalogue
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
    cataloguing.write_catalogue(directory, rows, keys, "/nowhere", backend="ivfpq", params=ann.AnnParams(), verbose=0)
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
    cataloguing.write_catalogue(directory, rows, keys, "/nowhere", backend="ivfpq", params=ann.AnnParams(probes=4),
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


# Moved from test_catalogue.py: shards, exact search across shards, memory, approximate search

# 1. Shards


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_shard_round_trips_its_rows_and_paths(tmp_path, dtype):
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(7, 12)).astype(np.float32) * rng.uniform(1e-3, 10, size=(7, 1)).astype(np.float32)
    rows[3] = 0.0  # a zero row stays zero (its scale is 1)
    items = [(f"dir {i}/ünïcødé café {i}.jpg", 10 * i, 1_700_000_000_123_456_789 + i) for i in range(7)]
    items[5] = ("日本/写真 5.png", 50, 5)
    items[6] = (os.fsdecode(b"latin-1 caf\xe9.jpg"), 60, 6)  # not UTF-8: a surrogate escape, as os.walk gives it
    shard = Shard.write(str(tmp_path / "shard-000000"), rows, items, dtype)
    assert sorted(os.listdir(tmp_path)) == ["shard-000000"]  # no temporary left
    for opened in (shard, Shard.open(str(tmp_path / "shard-000000"))):
        assert len(opened) == 7 and opened.dtype == dtype
        assert isinstance(opened.embeddings, np.memmap)
        assert opened.keys() == items
        assert opened.relative_paths() == [path for path, _, _ in items]
        assert [opened.relative_path(i) for i in range(7)] == [path for path, _, _ in items]
        decoded = opened.decoded()
        assert decoded.dtype == np.float32 and decoded.shape == rows.shape
        unit = neighbours.unit_rows(rows)  # what is stored, in the stored dtype
        if dtype == "float32":
            np.testing.assert_array_equal(decoded, unit)
        elif dtype == "float16":
            np.testing.assert_array_equal(decoded, unit.astype(np.float16).astype(np.float32))
        else:
            codes, scales = np.asarray(opened.embeddings), np.asarray(opened.scales)
            assert scales[3] == 1.0 and not decoded[3].any()
            # codes: each unit row quantised to +-127 over its largest magnitude; the scale makes
            # the decoded row unit length again.
            step = np.abs(unit).max(axis=1, keepdims=True) / 127
            assert np.all(np.abs(unit / np.where(step > 0, step, 1) - codes) <= 0.5 + INT8_SLACK)
            assert np.all(np.abs(codes).max(axis=1)[[0, 1, 2, 4, 5, 6]] == 127)
            np.testing.assert_array_equal(decoded, codes.astype(np.float32) * scales[:, None])
        np.testing.assert_array_equal(opened.decoded([5, 0, 5]), decoded[[5, 0, 5]])
        # Rows decode to unit length (to the dtype's rounding) and are scored as decoded.
        norms = np.linalg.norm(decoded[[0, 1, 2, 4, 5, 6]].astype(np.float64), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol={"float32": 1e-6, "float16": 2e-3, "int8": 1e-6}[dtype])
        np.testing.assert_array_equal(opened.unit_rows([6, 1]), decoded[[6, 1]])
        np.testing.assert_array_equal(opened.unit_rows(), decoded)
        np.testing.assert_array_equal(opened.unit_block(2, 5), decoded[2:5])


def test_a_shard_is_written_whole_or_not_at_all(tmp_path):
    rows = np.eye(3, dtype=np.float32)
    with pytest.raises(UserError, match="3 embeddings but 2 items"):
        Shard.write(str(tmp_path / "a"), rows, [("x", 1, 1)] * 2, "float32")
    with pytest.raises(UserError, match="--index_dtype='bfloat16' is not one of"):
        Shard.write(str(tmp_path / "a"), rows, [("x", 1, 1)] * 3, "bfloat16")
    with pytest.raises(UserError, match="NaN or infinite"):
        Shard.write(str(tmp_path / "a"), rows * np.nan, [("x", 1, 1)] * 3, "float32")
    assert os.listdir(tmp_path) == []
    Shard.write(str(tmp_path / "a"), rows, [("x", 1, 1)] * 3, "float32")
    with pytest.raises(OSError):  # never over an existing shard
        Shard.write(str(tmp_path / "a"), rows, [("x", 1, 1)] * 3, "float32")
    assert os.listdir(tmp_path) == ["a"]


def _cut_short(path):
    path.write_bytes(path.read_bytes()[:-5])


def _grow(path):
    path.write_bytes(path.read_bytes() + b"x")


def _miscount(path):
    path.write_text(json.dumps({**json.loads(path.read_text()), "count": 5}))


def _drop_one(path):
    np.save(path, np.asarray(np.load(path))[:-1])


@pytest.mark.parametrize("name, damage, why", [
    ("embeddings.npy", _cut_short, r"\(ValueError: mmap length is greater than file size\)"),
    ("scales.npy", _cut_short, r"\(ValueError: mmap length is greater than file size\)"),
    ("sizes.npy", os.remove, r"\(FileNotFoundError: .*sizes.npy'\)"),
    ("shard.json", os.remove, r"\(FileNotFoundError: .*shard.json'\)"),
    ("paths.bin", _grow, r"\(paths.bin holds \d+ bytes, not \d+\)"),
    ("paths.bin", _cut_short, r"\(paths.bin holds \d+ bytes, not \d+\)"),
    ("shard.json", _miscount, r"\(embeddings.npy is int8 \(4, 6\), not int8 \(5, 6\)\)"),
    ("mtimes.npy", _drop_one, r"\(sizes, mtimes or path offsets do not hold one entry per item\)"),
])
def test_a_damaged_shard_is_named_in_one_line(tmp_path, name, damage, why):
    directory = tmp_path / "shard-000003"
    Shard.write(str(directory), np.arange(24, dtype=np.float32).reshape(4, 6) - 11,
                [(f"photo {i}.jpg", i, i) for i in range(4)], "int8")
    damage(directory / name)
    with pytest.raises(UserError) as raised:
        Shard.open(str(directory))
    one_line(raised, r"^shard {directory} is damaged " + why + "; run python -m pnpp_tf.index again to embed its "
                     r"images anew.$", directory=directory)


# 2. Exact search across shards


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_search_across_shards_is_the_exact_engine_on_all_rows(tmp_path, dtype):
    rows = exact_rows(40, seed=2)
    rows[[7, 19, 33]] = rows[2]  # duplicates, in other shards: equal scores, listed by item
    rows[25] = 2 * rows[2]  # the same direction, another norm
    rows[11] = 0.0  # a zero row scores 0 against everything
    queries = np.concatenate([exact_rows(6, seed=3), rows[[2, 11]], 3 * rows[[5]]])
    catalogue = Catalogue.open(write_catalogue(tmp_path / "rows.index", rows, shard_size=6, dtype=dtype))
    assert len(catalogue) == 40 and len(catalogue.shards) == 7 and catalogue.damaged == []
    np.testing.assert_array_equal(catalogue.unit_rows(), neighbours.unit_rows(rows))
    for k in (1, 5, 17, 40):
        distances, items, backend = catalogue.search(queries, k=k)
        similarities, expected = neighbours.nearest(queries, rows, k)
        assert backend == "exact" and items.dtype == np.int64 and distances.dtype == np.float32
        np.testing.assert_array_equal(items, expected)
        np.testing.assert_array_equal(distances, np.maximum(1 - similarities, 0))
    # The order is (score desc, item asc), ties included: the duplicates of row 2 in item order.
    _, items, _ = catalogue.search(rows[2], k=5, backend="exact")
    assert items.tolist() == [[2, 7, 19, 25, 33]]
    assert [catalogue.relative_path(i) for i in items[0]] == [f"img_{i}.png" for i in items[0]]
    assert catalogue.path(7) == os.path.join("/nowhere", "img_7.png")
    assert catalogue.relative_paths() == [f"img_{i}.png" for i in range(40)]


def test_search_rejects_a_bad_k_backend_or_width(tmp_path):
    catalogue = Catalogue.open(write_catalogue(tmp_path / "rows.index", exact_rows(10), shard_size=3))
    queries = exact_rows(2, seed=5)
    for k in (0, -1, 11):
        with pytest.raises(UserError, match=rf"^--k={k} must be between 1 and the 10 items of "):
            catalogue.search(queries, k=k)
    with pytest.raises(UserError, match="^The queries are 9-d embeddings but the catalogue .* holds 8-d ones"):
        catalogue.search(np.ones((2, 9), np.float32), k=1)
    with pytest.raises(UserError, match="NaN or infinite"):
        catalogue.search(np.full((1, 8), np.inf, np.float32), k=1)
    with pytest.raises(UserError, match="^--backend='faiss' is not one of auto, exact, hnsw, ivfpq"):
        catalogue.search(queries, k=1, backend="faiss")
    with pytest.raises(UserError, match="^--backend=hnsw: the catalogue .* was built without an approximate "):
        catalogue.search(queries, k=1, backend="hnsw")
    with pytest.raises(IndexError):
        catalogue.locate(10)


# 6. Memory


def measure(index, backend, queries, tmp_path, k=10, warm_rows=1):
    """What the child reports after opening `index` and searching it: (peak RSS increase in KB, its
    JSON report)."""
    np.save(tmp_path / "queries.npy", queries)
    env = child_env()
    child = subprocess.run([sys.executable, CHILD, "memory", index, backend, str(tmp_path / "queries.npy"), str(k),
                            str(warm_rows)], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    return report["peak_kb"] - report["before_kb"], report


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """60,000 x 128 float32 rows (30 MB) in 16 shards of 3,750, written directly; 5 of them as
    queries, each its own nearest (score 1), far ahead of the others (random rows)."""
    root = tmp_path_factory.mktemp("large")
    rows = np.random.default_rng(0).normal(size=(60_000, 128)).astype(np.float32)
    mine = np.array([5, 3_749, 12_345, 40_000, 59_999])
    return {"root": root, "rows": rows, "queries": rows[mine], "mine": mine, "shard_size": 3_750,
            "exact": write_catalogue(root / "exact.index", rows, shard_size=3_750)}


def allocated_kb(increase, report):
    """The part of a peak RSS increase that is not mapped files' pages.

    The shards and structures are memory-mapped, so every page a search touches (and those the
    kernel maps around it: fault-around and readahead make that most of the pages of randomly
    read rows) stays resident as a page of the file, which the kernel can drop at any time: up
    to the index's size, however little the search reads. What is left is what the search
    itself allocates.
    """
    return increase - (report["file_kb_after"] - report["file_kb_before"])


def test_an_exact_search_holds_one_shard_at_a_time(large, tmp_path):
    index = large["exact"]
    increase, report = measure(index, "exact", large["queries"], tmp_path, warm_rows=large["shard_size"])
    assert report["backend"] == "exact"
    np.testing.assert_array_equal(np.asarray(report["items"])[:, 0], large["mine"])
    # The float32 rows are multiplied where they are mapped, a block of scores at a time: all the
    # rows copied at once would be the index's size, and its copies as much again.
    index_kb = directory_bytes(index) / 1024
    assert allocated_kb(increase, report) < index_kb / 2, report

# 7. Approximate backends (pnpp_tf.retrieval.ann): shortlists re-scored exactly




@pytest.mark.parametrize("backend", ["hnsw", "ivfpq"])
def test_an_approximate_search_rescores_its_shortlists_exactly(tmp_path, backend):
    ann = import_ann(backend)
    rows = exact_rows(40, seed=4)
    rows[[9, 30]] = rows[4]
    queries = np.concatenate([exact_rows(5, seed=6), rows[[4]]])
    index = write_catalogue(tmp_path / "rows.index", rows, shard_size=6, approximate=backend, params=ann.AnnParams())
    catalogue = Catalogue.open(index)
    assert all(os.path.isfile(shard.structure_path(backend)) for shard in catalogue.shards)
    # 40 rows and shortlists of at least 100 (300 for IVF-PQ): every row is re-scored, so the lists are
    # the exact ones, ties and all (the scores are exact in float32 on every path).
    for k in (1, 7, 40):
        distances, items, used = catalogue.search(queries, k=k)
        exact_distances, exact_items, _ = catalogue.search(queries, k=k, backend="exact")
        assert used == backend
        np.testing.assert_array_equal(items, exact_items)
        np.testing.assert_array_equal(distances, exact_distances)
    assert catalogue.search(rows[4], k=3, backend=backend)[1].tolist() == [[4, 9, 30]]
    # A shortlist shorter than the shard's rows: still k items, the best first.
    distances, items, _ = catalogue.search(queries, k=2, rescore=2)
    assert items.shape == (6, 2) and (items >= 0).all() and np.all(np.diff(distances, axis=1) >= 0)
    with pytest.raises(UserError, match="^--rescore=1 must be at least --k=2"):
        catalogue.search(queries, k=2, rescore=1)
    other = "ivfpq" if backend == "hnsw" else "hnsw"
    with pytest.raises(UserError, match=rf"^--backend={other}: the catalogue .* was built with {backend}; "):
        catalogue.search(queries, k=1, backend=other)


def test_an_approximate_search_reads_little_of_a_mapped_catalogue(large, tmp_path):
    ann = import_ann("hnsw")
    params = ann.AnnParams(connectivity=8, expansion_add=32)
    index = write_catalogue(large["root"] / "hnsw.index", large["rows"], shard_size=large["shard_size"],
                            approximate="hnsw", params=params)
    increase, report = measure(index, "hnsw", large["queries"], tmp_path, warm_rows=large["shard_size"])
    assert report["backend"] == "hnsw"
    np.testing.assert_array_equal(np.asarray(report["items"])[:, 0], large["mine"])
    # Neither the rows nor the graphs are read into memory: the structures are mapped, and only
    # the shortlisted rows are decoded (100 per query).
    assert allocated_kb(increase, report) < directory_bytes(index) / 1024 / 4, report
