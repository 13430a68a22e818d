"""pnpp_tf.retrieval.neighbours, the one k-NN engine, against a naive loop with an explicit tie rule; and
search's neighbour lists against Recall@K and MAP@R on the same embeddings."""

import sys

import numpy as np
import pytest

from conftest import rows_to_normalise
from pnpp_tf.retrieval.metrics import BACKENDS as METRICS_BACKENDS, retrieval_metrics
from pnpp_tf.retrieval import neighbours
from pnpp_tf.errors import UserError
from pnpp_tf.retrieval import search_index
from pnpp_tf.retrieval.search_index import SearchIndex

HAVE_FAISS = neighbours.import_faiss() is not None
BACKENDS = ["exact", pytest.param("faiss", marks=pytest.mark.skipif(
    not HAVE_FAISS, reason="faiss is not installed (pip install 'pnpp_tf[faiss]')"))]


def quantised(rng, n, dim=6):
    """Unit vectors with 4 entries of +-0.5: every dot product is exact in float32, whatever
    the order of summation, so every backend and the reference see the same ties."""
    x = np.zeros((n, dim), np.float32)
    for row in x:
        row[rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return x


def naive_order(query, gallery, skip=-1):
    """All candidate indices of one query: similarity descending, then index ascending."""
    sims = [float(np.dot(query.astype(np.float64), row.astype(np.float64))) for row in gallery]
    candidates = [j for j in range(len(gallery)) if j != skip]
    return sorted(candidates, key=lambda j: (-sims[j], j)), sims


def naive_nearest(queries, gallery, k, exclude=None):
    indices, sims = [], []
    for i, query in enumerate(queries):
        order, row_sims = naive_order(query, gallery, -1 if exclude is None else exclude[i])
        indices.append(order[:k])
        sims.append([row_sims[j] for j in order[:k]])
    return np.array(sims), np.array(indices)


def ties_cross_the_cut(queries, gallery, k):
    """Whether some query's k-th and (k+1)-th similarities are equal: the case to get right."""
    sims = np.sort(queries.astype(np.float64) @ gallery.T.astype(np.float64), axis=1)[:, ::-1]
    return bool(np.any(sims[:, k - 1] == sims[:, k]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [1, 7, None])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_nearest_matches_the_naive_order(backend, block_size, k):
    rng = np.random.default_rng(0)
    gallery = quantised(rng, 120)
    gallery[60:90] = gallery[:30]  # exact duplicates at other indices
    queries = np.concatenate([gallery[:10], quantised(rng, 13)])
    assert ties_cross_the_cut(queries, gallery, k)
    sims, indices = neighbours.nearest(queries, gallery, k, backend=backend,
                                       block_size=block_size)
    want_sims, want_indices = naive_nearest(queries, gallery, k)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(sims, want_sims)  # exact: all products are multiples of 1/4
    assert sims.dtype == np.float32 and indices.dtype == np.int64


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_excludes_one_index_per_query(backend):
    rng = np.random.default_rng(1)
    gallery = quantised(rng, 50)
    gallery[25:] = gallery[:25]
    exclude = np.array([0, -1, 30, 7, -1, 49])
    queries = gallery[[0, 1, 30, 7, 4, 49]]
    for k in (1, 3, 49):
        got = neighbours.nearest(queries, gallery, k, exclude, backend, block_size=4)
        want = naive_nearest(queries, gallery, k, exclude)
        np.testing.assert_array_equal(got[1], want[1])
        assert not np.any(got[1] == exclude[:, None])


def test_chunked_selection_keeps_the_order(monkeypatch):
    # 4-column chunks make the two-stage top-k selection run on small data, with runs of equal
    # scores across chunk boundaries and a partial last chunk.
    monkeypatch.setattr(neighbours, "_TOP_K_CHUNK", 4)
    rng = np.random.default_rng(2)
    gallery = quantised(rng, 203)
    gallery[100:150] = gallery[:50]
    got = neighbours.nearest(gallery[:30], gallery, 6, np.arange(30), block_size=8)
    np.testing.assert_array_equal(got[1], naive_nearest(gallery[:30], gallery, 6,
                                                        np.arange(30))[1])


class LabelMatches:
    """The `matches` of `neighbours.blocks` in the plainest way: a full boolean matrix."""

    def __init__(self, query_labels, gallery_labels, exclude):
        self.same = query_labels[:, None] == gallery_labels[None, :]
        if exclude is not None:
            rows = np.flatnonzero(exclude >= 0)
            self.same[rows, exclude[rows]] = False
        self.count = self.same.sum(axis=1)

    def table(self, start, stop):
        width = max(int(self.same.sum(axis=1).max()), 1)
        table = np.full((stop - start, width), -1, np.int32)
        for row, i in enumerate(range(start, stop)):
            found = np.flatnonzero(self.same[i])
            table[row, :len(found)] = found
        return table

    def contains(self, indices, rows):
        return np.take_along_axis(self.same[rows], indices, axis=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank_limit", [None, 3])
def test_ranks_are_first_match_positions(backend, rank_limit):
    rng = np.random.default_rng(3)
    gallery = quantised(rng, 150)
    gallery[75:] = gallery[:75]
    labels = rng.integers(0, 40, size=150)
    exclude = np.arange(150)
    matches = LabelMatches(labels, labels, exclude)
    ranks = np.concatenate([rank for *_, rank in neighbours.blocks(
        gallery, gallery, 2, exclude, backend, 16, matches, rank_limit)])
    for i in range(150):
        order, _ = naive_order(gallery[i], gallery, skip=i)
        hits = [position for position, j in enumerate(order) if labels[j] == labels[i]]
        want = hits[0] if hits else 150
        if rank_limit is not None and want >= rank_limit:
            assert ranks[i] >= rank_limit, i
        else:
            assert ranks[i] == want, i


def recall_and_map_from_lists(indices, query_labels, gallery_labels, ks, r):
    """Recall@K and MAP@R counted on neighbour lists, as one reads them off search's output."""
    relevant = gallery_labels[indices] == query_labels[:, None]
    recall = {k: float(np.mean(relevant[:, :k].any(axis=1))) for k in ks}
    aps = [sum(relevant[i, :j + 1].sum() / (j + 1) for j in range(r[i]) if relevant[i, j]) / r[i]
           for i in range(len(r)) if r[i] > 0]
    return recall, float(np.mean(aps))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_gallery", [False, True])
def test_search_lists_are_what_recall_at_k_counts(tmp_path, backend, with_gallery):
    """Duplicated embeddings tie exactly: a positive and a negative copy of one vector sit at
    equal similarity, and only the one tie rule decides which of them a list of K shows."""
    rng = np.random.default_rng(4)
    base = quantised(rng, 60, dim=8)
    x = np.concatenate([base, base, base[:30]])
    y = rng.integers(0, 25, size=len(x))
    ks = (1, 2, 4, 8, 16)
    if with_gallery:
        queries, query_labels, gallery, gallery_labels = x[:40], y[:40], x[40:], y[40:]
        exclude = None
        r = (query_labels[:, None] == gallery_labels[None, :]).sum(axis=1)
    else:
        queries, query_labels, gallery, gallery_labels = x, y, x, y
        exclude = np.arange(len(x))
        r = (y[:, None] == y[None, :]).sum(axis=1) - 1
    index = SearchIndex(gallery, [f"img_{i}.png" for i in range(len(gallery))], {})
    _, lists, used = index.search(queries, k=max(max(ks), int(r.max())), exclude=exclude,
                                  backend=backend)
    assert used == backend
    metrics = retrieval_metrics(
        queries, query_labels, *((gallery, gallery_labels) if with_gallery else ()), ks=ks,
        backend=backend, block_size=16)
    recall, map_at_r = recall_and_map_from_lists(lists, query_labels, gallery_labels, ks, r)
    for k in ks:
        assert metrics[f"recall@{k}"] == recall[k], k
    assert metrics["map@r"] == pytest.approx(map_at_r, abs=1e-12)
    # The tie rule decides something here: reversing it changes some query's top 1.
    sims = queries.astype(np.float64) @ gallery.T.astype(np.float64)
    if exclude is not None:
        sims[exclude, exclude] = -np.inf
    last = len(gallery) - 1 - np.argmax(sims[:, ::-1], axis=1)
    assert np.any(gallery_labels[last] != gallery_labels[lists[:, 0]])


@pytest.mark.skipif(not HAVE_FAISS, reason="faiss is not installed")
def test_backends_give_the_same_lists_on_ties():
    rng = np.random.default_rng(5)
    x = quantised(rng, 300, dim=8)
    x[200:] = x[:100]
    for k in (1, 10, 120):
        exact = neighbours.nearest(x, x, k, np.arange(300), "exact")
        faiss = neighbours.nearest(x, x, k, np.arange(300), "faiss")
        np.testing.assert_array_equal(exact[1], faiss[1])
        np.testing.assert_array_equal(exact[0], faiss[0])


def test_one_backend_vocabulary(monkeypatch):
    assert neighbours.BACKENDS == ("auto", "exact", "faiss")
    assert set(METRICS_BACKENDS) == {"auto", "exact", "faiss", "tf"}
    assert neighbours.choose_backend("tf", 10) == "exact"
    assert neighbours.choose_backend("exact", 10**9) == "exact"
    assert neighbours.choose_backend("auto", 100, faiss_min_gallery=1000) == "exact"
    assert neighbours.choose_backend("auto", 2000, faiss_min_gallery=1000) == (
        "faiss" if HAVE_FAISS else "exact")
    with pytest.raises(UserError, match="backend='annoy'"):
        neighbours.choose_backend("annoy", 10)
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    assert neighbours.import_faiss() is None
    assert neighbours.choose_backend("auto", 2000, faiss_min_gallery=1000) == "exact"
    with pytest.raises(UserError, match=r"pnpp_tf\[faiss\]") as raised:
        neighbours.choose_backend("faiss", 10)
    assert isinstance(raised.value.__cause__, ImportError)
    with pytest.raises(UserError, match=r"pnpp_tf\[faiss\]"):
        search_index.cosine_neighbours(np.eye(3), np.eye(3), k=1, backend="faiss")


def test_bad_k_and_block_size_are_user_errors():
    x = neighbours.unit_rows(np.eye(4))
    for k in (0, 4):
        with pytest.raises(UserError, match=f"k={k} .*3 candidate"):
            neighbours.nearest(x, x, k, np.arange(4))
    neighbours.nearest(x, x, 4)  # without an exclusion all 4 are candidates
    with pytest.raises(UserError, match="block_size must be >= 1, got 0"):
        neighbours.nearest(x, x, 1, block_size=0)


def test_unit_rows_is_the_naive_normaliser():
    x, want = rows_to_normalise(seed=6, rows=7)
    got = neighbours.unit_rows(x)
    assert got.dtype == np.float32 and got is not x
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert not got[1].any()  # the zero row stays zero
    with pytest.raises(UserError, match=r"query has 2 row\(s\).*row 1"):
        neighbours.unit_rows(np.array([[1.0, 0.0], [np.nan, 0.0], [np.inf, 1.0]]), "query")
    with pytest.raises(UserError, match=r"must be 2-D, got shape \(3,\)"):
        neighbours.unit_rows(np.ones(3))
    with pytest.raises(UserError, match="is empty"):
        neighbours.unit_rows(np.ones((0, 3)))


# --- Euclidean distance on the raw rows ---------------------------------------------------------


def integer_rows(rng, n, dim=5):
    """Raw rows of small integers, scaled by 1 to 3: norms differ, and every product, norm and
    squared distance is an exact small integer in float32, so every backend and the reference
    see the same ties. Row i + n // 2 is 2x row i: the same direction (a cosine tie), farther."""
    x = (rng.integers(-2, 3, size=(n, dim)) * rng.integers(1, 4, size=(n, 1))).astype(np.float32)
    x[n // 2:n // 2 + n // 4] = 2 * x[:n // 4]
    return x


def naive_euclidean(queries, gallery, k, exclude=None):
    """Each query's k nearest by ||q - g||^2 (exact integers in float64), then by index."""
    indices, sims = [], []
    for i, query in enumerate(queries.astype(np.float64)):
        distances = [float(np.sum((query - row) ** 2)) for row in gallery.astype(np.float64)]
        skip = -1 if exclude is None else exclude[i]
        order = sorted((j for j in range(len(gallery)) if j != skip), key=lambda j: (distances[j], j))
        indices.append(order[:k])
        sims.append([-distances[j] for j in order[:k]])
    return np.array(sims), np.array(indices)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [1, 7, None])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_euclidean_nearest_matches_the_naive_order(backend, block_size, k):
    rng = np.random.default_rng(10)
    gallery = integer_rows(rng, 120)
    gallery[100:] = gallery[:20]  # exact duplicates at other indices
    queries = np.concatenate([gallery[:10], integer_rows(rng, 13)])
    got = neighbours.nearest(queries, gallery, k, backend=backend, block_size=block_size,
                             distance="euclidean")
    want = naive_euclidean(queries, gallery, k)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])  # -||q - g||^2, exact integers
    distances = -want[0]
    assert np.any(distances[:, :-1] == distances[:, 1:]) or k == 1  # ties inside the lists


@pytest.mark.parametrize("backend", BACKENDS)
def test_euclidean_excludes_the_query_itself_by_index(backend):
    rng = np.random.default_rng(11)
    x = integer_rows(rng, 60)
    x[30:40] = x[:10]  # duplicates of a query stay candidates: at distance 0, ahead of the rest
    exclude = np.arange(60)
    for k in (1, 4, 59):
        got = neighbours.nearest(x, x, k, exclude, backend, block_size=16, distance="euclidean")
        want = naive_euclidean(x, x, k, exclude)
        np.testing.assert_array_equal(got[1], want[1])
        assert not np.any(got[1] == exclude[:, None])
    assert np.all(got[1][:10, 0] == np.arange(30, 40))


@pytest.mark.parametrize("backend", BACKENDS)
def test_euclidean_ranks_by_distance_not_by_direction(backend):
    # Same direction, different norms: a cosine tie broken by index, but Euclidean picks the
    # row of the query's own length.
    gallery = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    query = np.array([[1.0, 0.0]], np.float32)
    assert neighbours.nearest(query, gallery, 3, backend=backend)[1].tolist() == [[0, 1, 2]]
    sims, found = neighbours.nearest(query, gallery, 3, backend=backend, distance="euclidean")
    assert found.tolist() == [[1, 0, 2]] and sims.tolist() == [[0.0, -1.0, -2.0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_euclidean_ranks_are_first_match_positions(backend):
    rng = np.random.default_rng(12)
    x = integer_rows(rng, 90)
    x[60:] = x[:30]
    labels = rng.integers(0, 25, size=90)
    exclude = np.arange(90)
    ranks = np.concatenate([rank for *_, rank in neighbours.blocks(
        x, x, 2, exclude, backend, 16, LabelMatches(labels, labels, exclude), distance="euclidean")])
    _, order = naive_euclidean(x, x, 89, exclude)
    for i in range(90):
        hits = [position for position, j in enumerate(order[i]) if labels[j] == labels[i]]
        assert ranks[i] == (hits[0] if hits else 90), i


def test_unknown_distance_is_a_user_error():
    x = np.eye(3, dtype=np.float32)
    with pytest.raises(UserError, match="distance='manhattan' is not one of cosine, euclidean"):
        neighbours.nearest(x, x, 1, distance="manhattan")
