"""Tests for pnpp_tf.evaluation against a brute-force numpy reference."""

import importlib.util
import os

import numpy as np
import pytest

try:
    from pnpp_tf import evaluation
except ImportError:  # package __init__ not there yet: load the module by path
    _path = os.path.join(os.path.dirname(__file__), "..", "pnpp_tf",
                         "evaluation.py")
    _spec = importlib.util.spec_from_file_location("evaluation", _path)
    evaluation = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(evaluation)

retrieval_metrics = evaluation.retrieval_metrics
nmi = evaluation.nmi

KS = (1, 2, 4, 8)


def reference_metrics(q, ql, g=None, gl=None, ks=KS):
    """The obvious O(N*M) implementation with explicit loops."""
    q = np.asarray(q, np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    self_mode = g is None
    if self_mode:
        g, gl = q, ql
    else:
        g = np.asarray(g, np.float64)
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    # Broadcast-and-sum rather than BLAS matmul: identical rows then give
    # bit-identical scores, so exact duplicates really tie.
    sim = (q[:, None, :] * g[None, :, :]).sum(axis=-1)
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


@pytest.mark.parametrize("block_size", [7, 1024])
def test_random_no_gallery(block_size):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 16)).astype(np.float32)
    y = rng.integers(0, 6, size=60)
    assert_same(retrieval_metrics(x, y, block_size=block_size),
                reference_metrics(x, y))


@pytest.mark.parametrize("block_size", [7, 1024])
def test_random_with_gallery(block_size):
    rng = np.random.default_rng(1)
    q = rng.normal(size=(45, 12))
    ql = rng.integers(0, 7, size=45)  # class 6 never in gallery -> R = 0
    g = rng.normal(size=(50, 12))
    gl = rng.integers(0, 6, size=50)
    got = retrieval_metrics(q, ql, g, gl, block_size=block_size)
    want = reference_metrics(q, ql, g, gl)
    assert want["num_queries_without_positives"] > 0
    assert_same(got, want)


@pytest.mark.parametrize("with_gallery", [False, True])
def test_exact_duplicates(with_gallery):
    rng = np.random.default_rng(2)
    base = quantised(rng, 10)
    x = np.concatenate([base, base, base[:5]])  # duplicates at other indices
    y = rng.integers(0, 4, size=len(x))
    if with_gallery:
        args = (x[:12], y[:12], x, y)
    else:
        args = (x, y)
    assert_same(retrieval_metrics(*args, block_size=7),
                reference_metrics(*args))


def test_quantised_many_ties():
    rng = np.random.default_rng(3)
    x = quantised(rng, 80, dim=6)  # only 60 distinct vectors: many ties
    y = rng.integers(0, 5, size=80)
    assert_same(retrieval_metrics(x, y, block_size=7),
                reference_metrics(x, y))


def test_duplicates_random_floats():
    rng = np.random.default_rng(4)
    base = rng.normal(size=(20, 10)).astype(np.float32)
    x = np.concatenate([base, base[::2], base[:3]])
    y = rng.integers(0, 5, size=len(x))
    assert_same(retrieval_metrics(x, y, block_size=7),
                reference_metrics(x, y))


def test_singleton_classes():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 8))
    y = np.concatenate([rng.integers(0, 4, size=20), np.arange(100, 110)])
    got = retrieval_metrics(x, y, block_size=7)
    assert got["num_queries_without_positives"] == 10
    assert_same(got, reference_metrics(x, y))


def test_no_positives_at_all():
    x = np.eye(3)
    got = retrieval_metrics(x, [0, 1, 2], ks=(1, 2))
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


def test_tie_break_by_index():
    # Query 0 has two equal-score neighbours: the negative at index 1 comes
    # first, so Recall@1 misses; swapping the order makes it a hit.
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    got = retrieval_metrics(x[:1], [0], x[1:], [1, 0], ks=(1, 2))
    assert got["recall@1"] == 0.0 and got["recall@2"] == 1.0
    assert got["map@r"] == 0.0
    got = retrieval_metrics(x[:1], [0], x[1:], [0, 1], ks=(1, 2))
    assert got["recall@1"] == 1.0 and got["map@r"] == 1.0


def test_self_excluded_by_index_only():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    got = retrieval_metrics(x, [0, 0, 1], ks=(1,))
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
