"""Retrieval and clustering metrics for deep metric learning.

Recall@K follows the evaluation of the ProxyNCA++ authors: every query counts
in the denominator, so a query with no positive in the gallery is a miss.
MAP@R and R-Precision follow Musgrave et al., "A Metric Learning Reality
Check" (ECCV 2020); queries without positives are excluded from those two.
"""

import numpy as np
import tensorflow as tf
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score


def retrieval_metrics(query_embeddings, query_labels, gallery_embeddings=None,
                      gallery_labels=None, ks=(1, 2, 4, 8), block_size=1024):
    """Computes Recall@K, MAP@R and R-Precision under cosine similarity.

    Neighbours are ranked by descending cosine similarity, ties broken by
    ascending gallery index, for all metrics. Without a gallery each query is
    searched among all other queries; only its own row is excluded, so exact
    duplicates at other indices still count as neighbours. Queries are
    processed in blocks of `block_size` rows, so memory is
    O(block_size * gallery size) and never O(N^2).

    Args:
        query_embeddings: Float array of shape `(N, D)`.
        query_labels: Int array of shape `(N,)`.
        gallery_embeddings: Optional float array of shape `(M, D)`. If None,
            the queries serve as their own gallery (leave-one-out).
        gallery_labels: Int array of shape `(M,)`; required iff
            `gallery_embeddings` is given.
        ks: Iterable of positive ints, the K values for Recall@K.
        block_size: Positive int, number of query rows per block.

    Returns:
        Dict with Python floats `"recall@K"` for each K in `ks` (denominator:
        all queries, those without positives count as misses), `"map@r"` and
        `"r_precision"` (averaged over queries with R > 0; NaN if there are
        none), and ints `"num_queries"` and `"num_queries_without_positives"`.

    Raises:
        ValueError: On malformed shapes, or if some K exceeds the number of
            candidate neighbours.
    """
    query_embeddings, query_labels = _check_pair(
        query_embeddings, query_labels, "query")
    exclude_self = gallery_embeddings is None
    if exclude_self != (gallery_labels is None):
        raise ValueError("gallery_embeddings and gallery_labels must be given "
                         "together; got gallery_embeddings is None="
                         f"{gallery_embeddings is None}, gallery_labels is "
                         f"None={gallery_labels is None}.")
    if exclude_self:
        gallery_embeddings, gallery_labels = query_embeddings, query_labels
    else:
        gallery_embeddings, gallery_labels = _check_pair(
            gallery_embeddings, gallery_labels, "gallery")
        if gallery_embeddings.shape[1] != query_embeddings.shape[1]:
            raise ValueError(
                "Query and gallery embedding dims differ: "
                f"{query_embeddings.shape[1]} vs {gallery_embeddings.shape[1]}.")
    ks = [int(k) for k in ks]
    num_candidates = len(gallery_labels) - int(exclude_self)
    for k in ks:
        if k < 1:
            raise ValueError(f"Each K must be >= 1, got K={k}.")
        if k > num_candidates:
            raise ValueError(f"K={k} exceeds the number of candidate "
                             f"neighbours ({num_candidates}).")
    block_size = int(block_size)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")

    # R per query comes from label counts alone, so the top-k depth of the
    # MAP@R ranking is known before any similarity is computed.
    gallery_classes, gallery_counts = np.unique(gallery_labels,
                                                return_counts=True)
    pos = np.searchsorted(gallery_classes, query_labels)
    pos = np.minimum(pos, len(gallery_classes) - 1)
    known = gallery_classes[pos] == query_labels
    r = np.where(known, gallery_counts[pos], 0) - int(exclude_self)
    r_max = max(int(r.max()), 1)

    gallery = tf.constant(_l2_normalize(gallery_embeddings))
    gallery_lab = tf.constant(gallery_labels)
    queries = _l2_normalize(query_embeddings)
    ranks, aps, rprecs = [], [], []
    for start in range(0, len(queries), block_size):
        stop = start + block_size
        rank, ap, rprec = _block_metrics(
            tf.constant(queries[start:stop]),
            tf.constant(query_labels[start:stop]), gallery, gallery_lab,
            tf.constant(start, tf.int64), tf.constant(exclude_self),
            tf.constant(r_max, tf.int32))
        ranks.append(rank.numpy())
        aps.append(ap.numpy())
        rprecs.append(rprec.numpy())
    ranks, aps, rprecs = (np.concatenate(x) for x in (ranks, aps, rprecs))

    has_pos = r > 0
    metrics = {f"recall@{k}": float(np.mean(has_pos & (ranks < k)))
               for k in ks}
    if has_pos.any():
        metrics["map@r"] = float(np.mean(aps[has_pos]))
        metrics["r_precision"] = float(np.mean(rprecs[has_pos]))
    else:
        metrics["map@r"] = metrics["r_precision"] = float("nan")
    metrics["num_queries"] = int(len(r))
    metrics["num_queries_without_positives"] = int(np.sum(~has_pos))
    return metrics


def nmi(embeddings, labels, n_clusters=None, seed=0):
    """Normalised mutual information of k-means clusters with the labels.

    Args:
        embeddings: Float array of shape `(N, D)`; L2-normalised before
            clustering so clustering matches the cosine geometry.
        labels: Int array of shape `(N,)`.
        n_clusters: Number of clusters; defaults to the number of distinct
            labels.
        seed: Random state of k-means, making the result deterministic.

    Returns:
        NMI (geometric normalisation) as a Python float in [0, 1].
    """
    embeddings, labels = _check_pair(embeddings, labels, "")
    if n_clusters is None:
        n_clusters = len(np.unique(labels))
    clusters = KMeans(n_clusters=int(n_clusters), n_init=1,
                      random_state=seed).fit_predict(
                          _l2_normalize(embeddings))
    return float(normalized_mutual_info_score(labels, clusters,
                                              average_method="geometric"))


def _check_pair(embeddings, labels, name):
    """Validates and converts an (embeddings, labels) pair to numpy."""
    prefix = f"{name}_" if name else ""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels)
    if embeddings.ndim != 2:
        raise ValueError(f"{prefix}embeddings must be 2-D, got shape "
                         f"{embeddings.shape}.")
    if labels.ndim != 1:
        raise ValueError(f"{prefix}labels must be 1-D, got shape "
                         f"{labels.shape}.")
    if len(labels) != len(embeddings):
        raise ValueError(f"{prefix}labels has length {len(labels)} but "
                         f"{prefix}embeddings has {len(embeddings)} rows.")
    if len(labels) == 0:
        raise ValueError(f"{prefix}embeddings is empty.")
    return embeddings, labels.astype(np.int64)


def _l2_normalize(x):
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


@tf.function(input_signature=[
    tf.TensorSpec([None, None], tf.float32),
    tf.TensorSpec([None], tf.int64),
    tf.TensorSpec([None, None], tf.float32),
    tf.TensorSpec([None], tf.int64),
    tf.TensorSpec([], tf.int64),
    tf.TensorSpec([], tf.bool),
    tf.TensorSpec([], tf.int32),
])
def _block_metrics(queries, query_labels, gallery, gallery_labels, offset,
                   exclude_self, r_max):
    """Per-query rank of the best positive, AP@R and R-Precision for a block.

    Returns:
        Tuple `(rank, ap, rprec)` of shape `(B,)` each. `rank` is the
        0-based position of the first positive in the (score desc, index asc)
        order; `ap`/`rprec` are 0 for queries with R = 0.
    """
    scores = tf.matmul(queries, gallery, transpose_b=True)
    n_gallery = tf.shape(gallery, out_type=tf.int64)[0]
    cols = tf.range(n_gallery)[tf.newaxis, :]
    rows = offset + tf.range(tf.shape(queries, out_type=tf.int64)[0])
    is_self = tf.logical_and(exclude_self, cols == rows[:, tf.newaxis])
    neg_inf = tf.constant(-np.inf, tf.float32)
    scores = tf.where(is_self, neg_inf, scores)
    positive = tf.logical_and(
        gallery_labels[tf.newaxis, :] == query_labels[:, tf.newaxis],
        tf.logical_not(is_self))
    r = tf.reduce_sum(tf.cast(positive, tf.float32), axis=1)

    # Recall@K only needs where the first positive lands, not a sorted list:
    # count items that beat it, including equal-score items at lower index.
    best = tf.reduce_max(tf.where(positive, scores, neg_inf), axis=1,
                         keepdims=True)
    best_idx = tf.reduce_min(
        tf.where(tf.logical_and(positive, scores == best), cols, n_gallery),
        axis=1, keepdims=True)
    ahead = tf.logical_or(scores > best,
                          tf.logical_and(scores == best, cols < best_idx))
    rank = tf.reduce_sum(tf.cast(ahead, tf.int64), axis=1)

    # top_k puts equal values lower-index first, matching the tie-break.
    _, top_idx = tf.math.top_k(scores, k=r_max, sorted=True)
    rel = tf.cast(tf.gather(gallery_labels, top_idx) ==
                  query_labels[:, tf.newaxis], tf.float32)
    position = tf.cast(tf.range(1, r_max + 1), tf.float32)[tf.newaxis, :]
    within_r = tf.cast(position <= r[:, tf.newaxis], tf.float32)
    rel = rel * within_r
    precision_at = tf.cumsum(rel, axis=1) / position
    ap = tf.math.divide_no_nan(tf.reduce_sum(precision_at * rel, axis=1), r)
    rprec = tf.math.divide_no_nan(tf.reduce_sum(rel, axis=1), r)
    return rank, ap, rprec
