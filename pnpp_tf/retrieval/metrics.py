"""Retrieval and clustering metrics for deep metric learning, exact and in bounded memory.

Recall@K follows the evaluation of the ProxyNCA++ authors: every query counts in the denominator,
so a query with no positive in the gallery is a miss. MAP@R and R-Precision follow Musgrave et
al., "A Metric Learning Reality Check" (ECCV 2020); queries without positives are excluded from
those two.

As in pytorch-metric-learning, one k-nearest-neighbour search (`pnpp_tf.retrieval.neighbours`, the engine
`python -m pnpp_tf.search` uses too, with its one tie rule) is behind every metric. Neither
metric needs a sorted list of K neighbours, though: Recall@K needs only the rank of each query's
best positive (how many candidates are ahead of it in the engine's order), MAP@R only the top R,
where R is at most the largest class. So the engine is asked for the top R_max and that rank,
one block of queries at a time; no N x N matrix is ever held.
"""

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

from pnpp_tf.retrieval import neighbours
from pnpp_tf.errors import UserError

# The choices of evaluate's --backend: the engine's, and "tf", their former name of "exact".
BACKENDS = neighbours.BACKENDS + tuple(neighbours.ALIASES)


def retrieval_metrics(query_embeddings, query_labels, gallery_embeddings=None,
                      gallery_labels=None, ks=(1, 2, 4, 8), block_size=None, backend="exact",
                      distance="cosine"):
    """Computes Recall@K, MAP@R and R-Precision under cosine or Euclidean distance.

    Neighbours are ranked by descending cosine similarity (or ascending Euclidean distance of
    the raw embeddings), ties broken by ascending gallery index, for all metrics
    (`pnpp_tf.retrieval.neighbours`): a query's Recall@K is a hit exactly when
    `neighbours.nearest` lists one of its positives among its K nearest. Without a gallery each
    query is searched among all other queries; only its own row is excluded, so exact
    duplicates at other indices still count as neighbours. Queries are processed in blocks of
    `block_size` rows, so memory is O(block_size * gallery size) and never O(N^2).

    Args:
        query_embeddings: Float array of shape `(N, D)`.
        query_labels: Int array of shape `(N,)`.
        gallery_embeddings: Optional float array of shape `(M, D)`. If None, the queries serve
            as their own gallery (leave-one-out).
        gallery_labels: Int array of shape `(M,)`; required iff `gallery_embeddings` is given.
        ks: Iterable of positive ints, the K values for Recall@K.
        block_size: Positive int, query rows per block; None picks the largest block (at most
            1024 rows) whose scores fit in 256 MB.
        backend: One of `BACKENDS`: "exact" (or its former name "tf": matrix multiply and
            top-k in TensorFlow, on the available device), "faiss" (exact inner-product search
            with `faiss-cpu`, same order) or "auto" (faiss above
            `neighbours.FAISS_MIN_GALLERY` gallery items if installed). The two agree exactly
            whenever both compute the same float32 similarities, and otherwise differ only
            where two similarities are closer than float32 rounding.
        distance: "cosine" (of the L2-normalised embeddings) or "euclidean" (of the embeddings
            as given: the authors' protocol on the raw embedding layer's output).

    Returns:
        Dict with Python floats `"recall@K"` for each K in `ks` (denominator: all queries, those
        without positives count as misses), `"map@r"` and `"r_precision"` (averaged over queries
        with R > 0; NaN if there are none), and ints `"num_queries"` and
        `"num_queries_without_positives"`.

    Raises:
        UserError: On malformed shapes, non-finite embeddings, an unknown backend or distance, faiss asked
            for but not installed, a bad block size, or a K below 1 or above the number of
            candidate neighbours.
    """
    neighbours.check_distance(distance)
    queries, query_labels = _check_pair(query_embeddings, query_labels, "query")
    exclude_self = gallery_embeddings is None
    if exclude_self != (gallery_labels is None):
        raise UserError("gallery_embeddings and gallery_labels must be given together; got "
                        f"gallery_embeddings is None={gallery_embeddings is None}, "
                        f"gallery_labels is None={gallery_labels is None}.")
    if exclude_self:
        gallery, gallery_labels = queries, query_labels
    else:
        gallery, gallery_labels = _check_pair(gallery_embeddings, gallery_labels, "gallery")
        if gallery.shape[1] != queries.shape[1]:
            raise UserError("Query and gallery embedding dims differ: "
                            f"{queries.shape[1]} vs {gallery.shape[1]}.")
    ks = [int(k) for k in ks]
    num_candidates = len(gallery_labels) - int(exclude_self)
    for k in ks:
        if k < 1:
            raise UserError(f"Each K must be >= 1, got K={k}.")
        if k > num_candidates:
            raise UserError(f"K={k} exceeds the number of candidate "
                            f"neighbours ({num_candidates}).")
    backend = neighbours.choose_backend(backend, len(gallery))
    exclude = np.arange(len(queries)) if exclude_self else None
    positives = _Positives(query_labels, gallery_labels, exclude)
    r = positives.count
    r_max = max(int(r.max()), 1)
    ranks = np.empty(len(queries), np.int64)
    relevant = np.empty((len(queries), r_max), bool)
    for start, stop, _, found, rank in neighbours.blocks(
            queries, gallery, r_max, exclude, backend, block_size, positives, max(ks), distance):
        ranks[start:stop] = rank
        relevant[start:stop] = positives.contains(found, slice(start, stop))

    has_pos = r > 0
    metrics = {f"recall@{k}": float(np.mean(has_pos & (ranks < k))) for k in ks}
    if has_pos.any():
        ap, r_precision = _average_precision_at_r(relevant[has_pos], r[has_pos])
        metrics["map@r"] = float(np.mean(ap))
        metrics["r_precision"] = float(np.mean(r_precision))
    else:
        metrics["map@r"] = metrics["r_precision"] = float("nan")
    metrics["num_queries"] = int(len(r))
    metrics["num_queries_without_positives"] = int(np.sum(~has_pos))
    return metrics


def nmi(embeddings, labels, n_clusters=None, seed=0, distance="cosine"):
    """Normalised mutual information of k-means clusters with the labels.

    Args:
        embeddings: Float array of shape `(N, D)`.
        labels: Int array of shape `(N,)`.
        n_clusters: Number of clusters; defaults to the number of distinct labels.
        seed: Random state of k-means, making the result deterministic.
        distance: the geometry of the retrieval metrics: "cosine" clusters the L2-normalised
            embeddings, "euclidean" the embeddings as given (the authors' k-means on the raw
            embedding layer's output).

    Returns:
        NMI (geometric normalisation) as a Python float in [0, 1].
    """
    neighbours.check_distance(distance)
    embeddings, labels = _check_pair(embeddings, labels, "")
    if n_clusters is None:
        n_clusters = len(np.unique(labels))
    points = neighbours.unit_rows(embeddings) if distance == "cosine" else embeddings
    clusters = KMeans(n_clusters=int(n_clusters), n_init=1, random_state=seed).fit_predict(points)
    return float(normalized_mutual_info_score(labels, clusters, average_method="geometric"))


class _Positives:
    """Which gallery items share each query's label, without any query x gallery matrix.

    The `matches` of `neighbours.blocks`.

    Args:
        query_labels: int array `(Q,)`.
        gallery_labels: int array `(M,)`.
        exclude: None, or int array `(Q,)`: the gallery index that is no candidate of each
            query (here, the query itself).

    Attributes:
        count: int array `(Q,)`, R of each query (its positives, the excluded one left out).
        width: the largest gallery class, the width of `table` rows.
    """

    def __init__(self, query_labels, gallery_labels, exclude):
        self._exclude = exclude
        self._query_labels = query_labels
        self._gallery_labels = gallery_labels
        # Gallery indices grouped by class, ascending within a class (stable sort).
        self._order = np.argsort(gallery_labels, kind="stable").astype(np.int32)
        classes, self._start, class_count = np.unique(
            gallery_labels[self._order], return_index=True, return_counts=True)
        slot = np.minimum(np.searchsorted(classes, query_labels), len(classes) - 1)
        self._slot = slot
        self._class_count = np.where(classes[slot] == query_labels, class_count[slot], 0)
        self.count = self._class_count
        if exclude is not None:
            same = (exclude >= 0) & (gallery_labels[np.maximum(exclude, 0)] == query_labels)
            self.count = self._class_count - same
        self.width = int(class_count.max())

    def table(self, start, stop):
        """Int32 `(stop - start, width)`: gallery indices of each query's positives, -1 padded."""
        column = np.arange(self.width)
        valid = column < self._class_count[start:stop, None]
        flat = self._start[self._slot[start:stop], None] + np.where(valid, column, 0)
        table = np.where(valid, self._order[flat], -1).astype(np.int32)
        if self._exclude is not None:
            table[table == self._exclude[start:stop, None]] = -1
        return table

    def contains(self, indices, rows):
        """Bool array: whether each gallery index in `indices` is a positive of its query.

        Args:
            indices: int array `(len(rows), k)` of gallery indices.
            rows: the queries, a slice or an index array.
        """
        return self._gallery_labels[indices] == self._query_labels[rows, None]


def _average_precision_at_r(relevant, r):
    """AP@R and R-Precision (Musgrave et al.) from the top-R_max relevance of each query."""
    position = np.arange(1, relevant.shape[1] + 1)
    relevant = relevant & (position <= r[:, None])
    hits = np.cumsum(relevant, axis=1)
    ap = np.sum(np.where(relevant, hits / position, 0.0), axis=1) / r
    return ap, hits[:, -1] / r


def _check_pair(embeddings, labels, name):
    """Validates an (embeddings, labels) pair: (float32 embeddings, int64 labels)."""
    prefix = f"{name}_" if name else ""
    embeddings = neighbours.check_rows(embeddings, f"{prefix}embeddings")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise UserError(f"{prefix}labels must be 1-D, got shape {labels.shape}.")
    if len(labels) != len(embeddings):
        raise UserError(f"{prefix}labels has length {len(labels)} but "
                        f"{prefix}embeddings has {len(embeddings)} rows.")
    return embeddings, labels.astype(np.int64)
