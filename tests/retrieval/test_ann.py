"""The approximate shard structures of pnpp_tf.retrieval.ann shortlist the exact neighbours, survive
save and load (memory-mapped or not), work on tiny shards, and name bad flags and files.

Small clustered sets, like trained embeddings: neighbours are meaningful, so recall is too."""

import json
import subprocess
import sys

import numpy as np
import pytest

from pnpp_tf.errors import UserError
from pnpp_tf.retrieval import ann, ivf
from pnpp_tf.retrieval.ann import AnnParams

# Every (backend, dtype) the catalogue can ask for; ivfpq stores PQ codes whatever the dtype.
CASES = [(backend, dtype) for backend in ann.APPROXIMATE for dtype in ann.DTYPES]


def clustered(n, dim=32, classes=20, seed=0):
    """Unit rows around `classes` random centres (within-class cosine ~0.5), and 40 queries."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def points(count):
        x = centres[rng.integers(0, classes, count)] + rng.normal(size=(count, dim)) / np.sqrt(dim)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return points(n), points(40)


def exact_top(x, queries, k):
    return np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :k]


def recall(found, top):
    """The fraction of the exact neighbours `top` that are anywhere in the shortlists `found`."""
    return np.mean([np.isin(t, f).mean() for f, t in zip(found, top)])


def needs(backend):
    pytest.importorskip("usearch" if backend == "hnsw" else "faiss")


@pytest.mark.parametrize("backend,dtype", CASES)
def test_the_shortlist_holds_the_exact_top_10_and_depth_n_holds_every_row(backend, dtype):
    needs(backend)
    x, queries = clustered(500)
    structure = ann.build(backend, x, dtype=dtype)
    assert len(structure) == 500 and structure.backend == backend
    # 500 rows is below IVFPQ_MIN_ROWS: ivfpq is exact there. HNSW's approximate scores at i8,
    # round(127 x) of 32-d unit rows, are the coarsest: its own top 10 held 0.97 of the exact
    # one, and a 50-deep list all of it (so 1.0 holds, with a margin, for every dtype).
    assert recall(structure.candidates(queries, 50), exact_top(x, queries, 10)) == 1.0
    # A search as deep as the shard visits every node the graph reaches: all of them, as it is
    # built on one thread (concurrent adds strand some: unum-cloud/USearch#735).
    everything = structure.candidates(queries[:5], 500)
    assert everything.dtype == np.int64 and everything.shape == (5, 500)
    for row in everything:
        assert sorted(row) == list(range(500))


def test_an_hnsw_graph_is_the_same_on_every_build():
    needs("hnsw")
    x, queries = clustered(2000, classes=40)
    first, second = (ann.build("hnsw", x, AnnParams(expansion_search=16)) for _ in range(2))
    np.testing.assert_array_equal(first.candidates(queries, 10), second.candidates(queries, 10))


@pytest.fixture(scope="module")
def ivf_pq(tmp_path_factory):
    """A real IVF-PQ structure (the smallest shard that gets one), built once: (rows, queries, path)."""
    pytest.importorskip("faiss")
    x, queries = clustered(ann.IVFPQ_MIN_ROWS, classes=50)
    # One thread: on a 2-core machine busy with other work, OpenMP's barriers made this small
    # k-means 4x slower with two (4 s instead of 1 s).
    ann.set_threads(1)
    try:
        structure = ann.build("ivfpq", x)
    finally:
        ann.set_threads(None)
    assert structure.kind == "faiss IVF-PQ, 256 lists, 4-byte codes" and len(structure) == len(x)
    path = tmp_path_factory.mktemp("ivfpq") / ann.structure_file("ivfpq")
    structure.save(path)
    return x, queries, path


@pytest.mark.parametrize("mmap", [True, False])
def test_ivf_pq_above_its_minimum_shortlists_the_exact_top_10(ivf_pq, mmap):
    x, queries, path = ivf_pq
    structure = ann.Structure.load("ivfpq", path, mmap=mmap)
    # 4-byte PQ codes of 32 dimensions are coarse (a 10-deep list holds 0.44 of the top 10),
    # but the catalogue's depth, 100, holds 0.985 of it here: re-scoring recovers the rest.
    found = structure.candidates(queries, ann.rescore_depth(10))
    assert recall(found, exact_top(x, queries, 10)) >= 0.97
    # Probing every list reaches every row.
    every = ann.Structure.load("ivfpq", path, mmap=mmap, params=AnnParams(probes=10_000))
    assert sorted(every.candidates(queries[:1], len(x))[0]) == list(range(len(x)))


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("mmap", [True, False])
def test_a_saved_structure_loads_with_the_same_candidates(tmp_path, backend, dtype, mmap):
    needs(backend)
    x, queries = clustered(300, seed=1)
    params = AnnParams(connectivity=8, expansion_search=20)
    structure = ann.build(backend, x, params, dtype)
    path = tmp_path / ann.structure_file(backend)
    structure.save(path)
    loaded = ann.Structure.load(backend, path, mmap=mmap, params=params)
    assert len(loaded) == 300 and loaded.dim == 32
    np.testing.assert_array_equal(loaded.candidates(queries, 30), structure.candidates(queries, 30))


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("n", [1, 3, 50])
def test_tiny_shards_pad_with_minus_one_past_their_rows(backend, dtype, n):
    needs(backend)
    x, queries = clustered(n, seed=n)
    found = ann.build(backend, x, dtype=dtype).candidates(queries[:4], n + 7)
    assert found.shape == (4, n + 7)
    assert (found[:, n:] == -1).all()
    for row in found:
        assert sorted(row[:n]) == list(range(n))
    assert ann.build(backend, x, dtype=dtype).candidates(queries[:0], 5).shape == (0, 5)


@pytest.mark.parametrize("field,flag", sorted(ann.FLAGS.items()))
@pytest.mark.parametrize("value", [-1, 0, 2.5, True])
def test_a_bad_parameter_names_its_flag(field, flag, value):
    if value == 0 and field in ("lists", "pq_bytes"):
        return  # 0 means automatic there
    with pytest.raises(UserError, match=rf"^{flag}={value!r} must be "):
        AnnParams(**{field: value})


def test_pq_bytes_must_divide_the_dimension_even_on_a_tiny_shard():
    needs("ivfpq")
    x, _ = clustered(10, dim=32)
    with pytest.raises(UserError, match=r"^--pq_bytes=5 does not divide the embedding dimension 32"):
        ann.build("ivfpq", x, AnnParams(pq_bytes=5))


def test_params_round_trip_through_json():
    params = AnnParams(connectivity=16, expansion_add=40, expansion_search=50, lists=100,
                       probes=7, pq_bytes=8)
    assert AnnParams.from_json(json.loads(json.dumps(params.to_json()))) == params
    assert AnnParams.from_json({}) == AnnParams()
    with pytest.raises(UserError, match=r"^ANN parameters colour are unknown"):
        AnnParams.from_json({"colour": 1})


@pytest.mark.parametrize("backend", ann.APPROXIMATE)
@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("cut", ["one byte", "half", "garbage"])
def test_a_cut_short_or_foreign_file_is_named(tmp_path, backend, mmap, cut):
    needs(backend)
    x, _ = clustered(200, dim=16)
    path = tmp_path / ann.structure_file(backend)
    ann.build(backend, x).save(path)
    whole = path.read_bytes()
    path.write_bytes({"one byte": whole[:-1], "half": whole[:len(whole) // 2],
                      "garbage": b"not an index" * 10}[cut])
    with pytest.raises(UserError, match=rf"^{path} is not a whole .*build the catalogue again\.$"):
        ann.Structure.load(backend, path, mmap=mmap)
    with pytest.raises(UserError, match=r"missing does not exist"):
        ann.Structure.load(backend, tmp_path / "missing", mmap=mmap)


@pytest.mark.parametrize("mmap", [True, False])
def test_a_damaged_ivf_pq_behind_a_good_length_mark_is_named_with_faiss_reason(ivf_pq, tmp_path, mmap):
    _, _, whole_path = ivf_pq
    faiss_part = whole_path.read_bytes()[:-ivf._TRAILER.size]  # pylint: disable=protected-access
    half = len(faiss_part) // 2
    path = tmp_path / "ivfpq.faiss"
    path.write_bytes(faiss_part[:half] + ivf._TRAILER.pack(ivf._MAGIC, half))  # pylint: disable=protected-access
    with pytest.raises(UserError, match=rf"^{path} is not a whole faiss index \('.*read error"):
        ann.Structure.load("ivfpq", path, mmap=mmap)


@pytest.mark.parametrize("backend", ann.APPROXIMATE)
def test_a_missing_library_says_what_to_install(monkeypatch, backend):
    for module in ("usearch", "usearch.index", "faiss"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import` raise ImportError
    with pytest.raises(UserError, match=rf"^--backend={backend} needs .*: pip install 'pnpp_tf\[ann\]'"):
        ann.build(backend, np.eye(4, dtype=np.float32))


def test_the_module_imports_without_either_library():
    blocked = "import sys; sys.modules.update(usearch=None, faiss=None, tensorflow=None); "
    subprocess.run([sys.executable, "-c", blocked + "import pnpp_tf.retrieval.ann"], check=True)


def test_faiss_threads_are_put_back_and_queries_are_checked(ivf_pq):
    faiss = pytest.importorskip("faiss")
    x, queries, path = ivf_pq
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        ann.set_threads(2)
        ann.build("ivfpq", x[:100])
        structure = ann.Structure.load("ivfpq", path)
        structure.candidates(queries, 10)
        assert faiss.omp_get_max_threads() == 1
    finally:
        ann.set_threads(None)
        faiss.omp_set_num_threads(before)
    with pytest.raises(UserError, match=r"^queries must be finite rows of 32 values"):
        structure.candidates(queries[:, :8], 10)
    assert ann.rescore_depth(5) == 100 and ann.rescore_depth(20) == 200
    assert ann.rescore_depth(5, "ivfpq") == 300 and ann.rescore_depth(20, "ivfpq") == 600
