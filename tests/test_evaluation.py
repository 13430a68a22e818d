"""Tests for pnpp_tf.retrieval.metrics against a brute-force numpy reference."""

import sys

import numpy as np
import pytest

from pnpp_tf.retrieval.metrics import nmi, retrieval_metrics
from pnpp_tf.retrieval import neighbours
from pnpp_tf.errors import UserError


KS = (1, 2, 4, 8)

try:
    import faiss  # noqa: F401 pylint: disable=unused-import
    HAVE_FAISS = True
except ImportError:
    HAVE_FAISS = False

# Every comparison with the reference runs on both backends; faiss' only where it is installed.
BACKENDS = ["tf", pytest.param("faiss", marks=pytest.mark.skipif(
    not HAVE_FAISS, reason="faiss is not installed (pip install 'pnpp_tf[faiss]')"))]


def reference_metrics(q, ql, g=None, gl=None, ks=KS, distance="cosine"):
    """The obvious O(N*M) implementation with explicit loops; "euclidean" ranks the raw rows by
    ascending ||q - g||^2."""
    cosine = distance == "cosine"
    q = np.asarray(q, np.float64)
    if cosine:
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    self_mode = g is None
    if self_mode:
        g, gl = q, ql
    else:
        g = np.asarray(g, np.float64)
        if cosine:
            g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    # Broadcast-and-sum rather than BLAS matmul: identical rows then give
    # bit-identical scores, so exact duplicates really tie.
    if cosine:
        sim = (q[:, None, :] * g[None, :, :]).sum(axis=-1)
    else:
        sim = -((q[:, None, :] - g[None, :, :]) ** 2).sum(axis=-1)
    hits = {k: 0 for k in ks}
    aps, rps, no_pos = [], [], 0
    for i in range(len(q)):
        idx = np.arange(len(g))
        if self_mode:
            idx = idx[idx != i]
        # lexsort: last key is primary -> descending score, then index.
        order = idx[np.lexsort((idx, -sim[i, idx]))]
        rel = (gl[order] == ql[i]).astype(float)
        for k in ks:
            if rel[:k].any():
                hits[k] += 1
        r = int(rel.sum())
        if r == 0:
            no_pos += 1
            continue
        ap = 0.0
        for j in range(r):
            if rel[j]:
                ap += rel[:j + 1].sum() / (j + 1)
        aps.append(ap / r)
        rps.append(rel[:r].sum() / r)
    out = {f"recall@{k}": hits[k] / len(q) for k in ks}
    out["map@r"] = float(np.mean(aps)) if aps else float("nan")
    out["r_precision"] = float(np.mean(rps)) if rps else float("nan")
    out["num_queries"] = len(q)
    out["num_queries_without_positives"] = no_pos
    return out


def assert_same(got, want):
    assert set(got) == set(want)
    for key, value in want.items():
        if isinstance(value, int):
            assert got[key] == value and isinstance(got[key], int), key
        else:
            assert isinstance(got[key], float), key
            np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-6,
                                       err_msg=key)


def quantised(rng, n, dim=8):
    """Unit vectors with 4 entries of +-0.5: every dot product is exact in
    float32, so the implementation and reference see identical ties."""
    x = np.zeros((n, dim), np.float32)
    for row in x:
        row[rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [7, 1024])
def test_random_no_gallery(block_size, backend):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 16)).astype(np.float32)
    y = rng.integers(0, 6, size=60)
    assert_same(retrieval_metrics(x, y, block_size=block_size, backend=backend),
                reference_metrics(x, y))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [7, 1024])
def test_random_with_gallery(block_size, backend):
    rng = np.random.default_rng(1)
    q = rng.normal(size=(45, 12))
    ql = rng.integers(0, 7, size=45)  # class 6 never in gallery -> R = 0
    g = rng.normal(size=(50, 12))
    gl = rng.integers(0, 6, size=50)
    got = retrieval_metrics(q, ql, g, gl, block_size=block_size, backend=backend)
    want = reference_metrics(q, ql, g, gl)
    assert want["num_queries_without_positives"] > 0
    assert_same(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_gallery", [False, True])
def test_exact_duplicates(with_gallery, backend):
    rng = np.random.default_rng(2)
    base = quantised(rng, 10)
    x = np.concatenate([base, base, base[:5]])  # duplicates at other indices
    y = rng.integers(0, 4, size=len(x))
    if with_gallery:
        args = (x[:12], y[:12], x, y)
    else:
        args = (x, y)
    assert_same(retrieval_metrics(*args, block_size=7, backend=backend),
                reference_metrics(*args))


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantised_many_ties(backend):
    rng = np.random.default_rng(3)
    x = quantised(rng, 80, dim=6)  # only 60 distinct vectors: many ties
    y = rng.integers(0, 5, size=80)
    assert_same(retrieval_metrics(x, y, block_size=7, backend=backend),
                reference_metrics(x, y))


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_random_floats(backend):
    rng = np.random.default_rng(4)
    base = rng.normal(size=(20, 10)).astype(np.float32)
    x = np.concatenate([base, base[::2], base[:3]])
    y = rng.integers(0, 5, size=len(x))
    assert_same(retrieval_metrics(x, y, block_size=7, backend=backend),
                reference_metrics(x, y))


@pytest.mark.parametrize("backend", BACKENDS)
def test_singleton_classes(backend):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 8))
    y = np.concatenate([rng.integers(0, 4, size=20), np.arange(100, 110)])
    got = retrieval_metrics(x, y, block_size=7, backend=backend)
    assert got["num_queries_without_positives"] == 10
    assert_same(got, reference_metrics(x, y))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_positives_at_all(backend):
    x = np.eye(3)
    got = retrieval_metrics(x, [0, 1, 2], ks=(1, 2), backend=backend)
    assert got["recall@1"] == 0.0 and got["recall@2"] == 0.0
    assert np.isnan(got["map@r"]) and np.isnan(got["r_precision"])
    assert got["num_queries_without_positives"] == 3


def test_hand_made_line():
    # Four unit vectors at angles 0, 10, 25, 90 degrees (cosine order is
    # angular order, no ties); labels a, a, b, b.
    ang = np.deg2rad([0.0, 10.0, 25.0, 90.0])
    x = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    y = np.array([0, 0, 1, 1])
    got = retrieval_metrics(x, y, ks=(1, 2, 3))
    # Neighbour orders: 0 -> [1,2,3]; 1 -> [0,2,3]; 2 -> [1,0,3];
    # 3 -> [2,1,0]. Query 2 finds its positive only at rank 3.
    assert got["recall@1"] == pytest.approx(3 / 4)
    assert got["recall@2"] == pytest.approx(3 / 4)
    assert got["recall@3"] == pytest.approx(1.0)
    # R = 1 for every query; AP@R = rel(1).
    assert got["map@r"] == pytest.approx(3 / 4)
    assert got["r_precision"] == pytest.approx(3 / 4)
    assert got["num_queries"] == 4
    assert got["num_queries_without_positives"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_tie_break_by_index(backend):
    # Query 0 has two equal-score neighbours: the negative at index 1 comes
    # first, so Recall@1 misses; swapping the order makes it a hit.
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    got = retrieval_metrics(x[:1], [0], x[1:], [1, 0], ks=(1, 2), backend=backend)
    assert got["recall@1"] == 0.0 and got["recall@2"] == 1.0
    assert got["map@r"] == 0.0
    got = retrieval_metrics(x[:1], [0], x[1:], [0, 1], ks=(1, 2), backend=backend)
    assert got["recall@1"] == 1.0 and got["map@r"] == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_excluded_by_index_only(backend):
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    got = retrieval_metrics(x, [0, 0, 1], ks=(1,), backend=backend)
    assert got["recall@1"] == pytest.approx(2 / 3)


def test_k_too_large():
    x = np.random.default_rng(6).normal(size=(5, 3))
    with pytest.raises(ValueError, match=r"K=5.*\(4\)"):
        retrieval_metrics(x, np.zeros(5, int), ks=(1, 5))
    retrieval_metrics(x, np.zeros(5, int), ks=(4,))
    with pytest.raises(ValueError, match=r"K=4.*\(3\)"):
        retrieval_metrics(x, np.zeros(5, int), x[:3], np.zeros(3, int),
                          ks=(4,))


def test_shape_validation():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match=r"\(5,\)"):
        retrieval_metrics(x[:, 0], np.zeros(5, int))
    with pytest.raises(ValueError, match="length 4"):
        retrieval_metrics(x, np.zeros(4, int))
    with pytest.raises(ValueError, match="3 vs 2"):
        retrieval_metrics(x, np.zeros(5, int), np.zeros((5, 2)),
                          np.zeros(5, int), ks=(1,))
    with pytest.raises(ValueError, match="gallery_labels"):
        retrieval_metrics(x, np.zeros(5, int), x)
    with pytest.raises(ValueError, match="block_size"):
        retrieval_metrics(x, np.zeros(5, int), ks=(1,), block_size=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_gallery", [False, True])
def test_deep_ranks_among_many_ties(with_gallery, backend):
    # 300 vectors from 240 distinct ones with few distinct dot products and ~5 images per
    # class: best positives often sit below rank 32 inside long runs of equal scores, where
    # faiss cuts its first, shallow list and must search deeper.
    rng = np.random.default_rng(10)
    x = quantised(rng, 300, dim=6)
    y = rng.integers(0, 60, size=300)
    ks = (1, 2, 32, 100, 250)
    args = (x[:40], y[:40], x[40:], y[40:]) if with_gallery else (x, y)
    want = reference_metrics(*args, ks=ks)
    assert want["recall@32"] < 1.0  # some ranks lie beyond the first search
    assert_same(retrieval_metrics(*args, ks=ks, block_size=16, backend=backend), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_class_deep_map_at_r(backend):
    # One class of 150 makes R up to 149: the top-R ranking is deeper than any K.
    rng = np.random.default_rng(11)
    x = rng.normal(size=(240, 12)).astype(np.float32)
    x[150:] = x[:90]  # duplicates across the big class and the small ones
    y = np.concatenate([np.zeros(150, int), rng.integers(1, 20, size=90)])
    assert_same(retrieval_metrics(x, y, block_size=64, backend=backend),
                reference_metrics(x, y))


@pytest.mark.parametrize("with_gallery", [False, True])
def test_chunked_top_r_selection_with_ties(monkeypatch, with_gallery):
    # Chunks of 4 columns make the two-stage top-R selection run on small data, with runs of
    # equal scores and duplicates across chunk boundaries and a partial last chunk.
    monkeypatch.setattr(neighbours, "_TOP_K_CHUNK", 4)
    rng = np.random.default_rng(14)
    x = quantised(rng, 203, dim=6)
    x[100:150] = x[:50]
    y = rng.integers(0, 40, size=203)
    args = (x[:50], y[:50], x[50:], y[50:]) if with_gallery else (x, y)
    assert_same(retrieval_metrics(*args, ks=(1, 5, 20), block_size=32),
                reference_metrics(*args, ks=(1, 5, 20)))


def test_chunked_top_r_selection_at_the_default_chunk():
    rng = np.random.default_rng(15)
    x = quantised(rng, 1100, dim=8)
    y = rng.integers(0, 200, size=1100)
    # Deep enough a gallery for the two-stage selection (see neighbours._exact_blocks).
    assert 2 * np.bincount(y).max() * neighbours._TOP_K_CHUNK <= len(x)
    assert_same(retrieval_metrics(x, y, ks=(1, 10, 100)), reference_metrics(x, y, ks=(1, 10, 100)))


def test_backends_agree_on_ties_and_gallery():
    if not HAVE_FAISS:
        pytest.skip("faiss is not installed")
    rng = np.random.default_rng(12)
    x = quantised(rng, 400, dim=8)
    y = rng.integers(0, 50, size=400)
    for args in ((x, y), (x[:100], y[:100], x[100:], y[100:])):
        got = [retrieval_metrics(*args, ks=(1, 10, 100), backend=b) for b in ("tf", "faiss")]
        assert got[0] == got[1]


def test_automatic_block_size_splits_queries(monkeypatch):
    # Scores of 200 entries per block: 4 rows of 43 at a time, the last block padded.
    monkeypatch.setattr(neighbours, "_AUTO_BLOCK_SCORES", 200)
    rng = np.random.default_rng(13)
    x = rng.normal(size=(43, 6))
    y = rng.integers(0, 5, size=43)
    assert_same(retrieval_metrics(x, y), reference_metrics(x, y))


def test_non_finite_embeddings_are_named():
    x = np.ones((5, 3))
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"query_embeddings has 1 row.*row 3"):
        retrieval_metrics(x, np.zeros(5, int))
    with pytest.raises(ValueError, match=r"gallery_embeddings .*row 0"):
        retrieval_metrics(np.ones((2, 3)), [0, 0], np.full((2, 3), np.inf), [0, 0], ks=(1,))


def test_unknown_backend():
    with pytest.raises(ValueError, match="'annoy'"):
        retrieval_metrics(np.eye(3), [0, 0, 1], ks=(1,), backend="annoy")


def test_faiss_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    with pytest.raises(UserError, match=r"pnpp_tf\[faiss\]"):
        retrieval_metrics(np.eye(3), [0, 0, 1], ks=(1,), backend="faiss")


def test_nmi_perfect_clusters():
    rng = np.random.default_rng(7)
    centres = np.eye(5, 16) * 10
    y = np.repeat(np.arange(5), 20)
    x = centres[y] + rng.normal(scale=0.01, size=(100, 16))
    assert nmi(x, y) == pytest.approx(1.0)


def test_nmi_random_range_and_determinism():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(200, 8))
    y = rng.integers(0, 10, size=200)
    value = nmi(x, y, seed=3)
    assert isinstance(value, float)
    assert 0.0 <= value <= 1.0
    assert nmi(x, y, seed=3) == value
    assert 0.0 <= nmi(x, y, n_clusters=4) <= 1.0


# --- Euclidean distance on the raw embeddings (the authors' protocol) ---------------------------


def integer_rows(rng, n, dim=6):
    """Raw embeddings of small integers with norms from 1x to 3x: every squared distance is an
    exact integer in float32, so the ties the reference sees are the ones the backends see."""
    return (rng.integers(-2, 3, size=(n, dim)) * rng.integers(1, 4, size=(n, 1))).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_gallery", [False, True])
@pytest.mark.parametrize("block_size", [5, 1024])
def test_euclidean_ties_and_duplicates(backend, with_gallery, block_size):
    rng = np.random.default_rng(20)
    x = integer_rows(rng, 90)
    x[60:75] = x[:15]  # exact duplicates at other indices
    x[75:] = 2 * x[15:30]  # same directions, twice the length: cosine ties, Euclidean does not
    y = rng.integers(0, 12, size=90)
    args = (x[:40], y[:40], x[40:], y[40:]) if with_gallery else (x, y)
    got = retrieval_metrics(*args, block_size=block_size, backend=backend, distance="euclidean")
    assert_same(got, reference_metrics(*args, distance="euclidean"))
    # The two distances rank these embeddings differently, so the test tells them apart.
    assert got != retrieval_metrics(*args, block_size=block_size, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_euclidean_random_floats(backend):
    rng = np.random.default_rng(21)
    x = (rng.normal(size=(70, 8)) * rng.uniform(0.1, 10.0, size=(70, 1))).astype(np.float32)
    y = rng.integers(0, 8, size=70)
    # float32 rounds 2 q.g - ||g||^2 (8 products, a norm, a subtraction) by at most about
    # 10 * 2^-24 * (|q| + |g|)^2. Every two neighbours adjacent in a query's exact order are
    # further apart than their two bounds together, so no CPU's rounding can swap them.
    x64 = x.astype(np.float64)
    d = ((x64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)
    norms = np.linalg.norm(x64, axis=1)
    bound = 10 * 2.0 ** -24 * (norms[:, None] + norms[None, :]) ** 2
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1)[:, :-1]
    gaps = np.diff(np.take_along_axis(d, order, axis=1), axis=1)
    near = np.take_along_axis(bound, order, axis=1)
    assert np.all(gaps > near[:, 1:] + near[:, :-1])
    got = retrieval_metrics(x, y, backend=backend, distance="euclidean", block_size=16)
    assert_same(got, reference_metrics(x, y, distance="euclidean"))


def test_euclidean_nmi_clusters_the_raw_vectors():
    # Two classes along the same directions, one near the origin and one far out: the raw
    # vectors cluster by class, their unit vectors cannot tell the classes apart.
    rng = np.random.default_rng(22)
    directions = np.abs(rng.normal(size=(40, 4))) + 1.0
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    x = directions * np.repeat([1.0, 20.0], 20)[:, None]
    y = np.repeat([0, 1], 20)
    assert nmi(x, y, distance="euclidean") == pytest.approx(1.0)
    assert nmi(x, y) < 0.5
    with pytest.raises(UserError, match="distance='l1'"):
        nmi(x, y, distance="l1")
    with pytest.raises(UserError, match="distance='l1'"):
        retrieval_metrics(x, y, distance="l1")
