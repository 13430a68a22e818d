"""Retrieval and clustering metrics for deep metric learning, exact and in bounded memory.

Recall@K follows the evaluation of the ProxyNCA++ authors: every query counts in the denominator,
so a query with no positive in the gallery is a miss. MAP@R and R-Precision follow Musgrave et
al., "A Metric Learning Reality Check" (ECCV 2020); queries without positives are excluded from
those two.

Neither metric needs a sorted list of K neighbours. Recall@K needs only the rank of each query's
best positive (how many items beat it), MAP@R only the top R, where R is at most the largest
class. So each block of queries costs one matrix multiply, one fused counting pass over its
scores and a top-R selection, compiled together with XLA; no N x N matrix is ever held.
"""

import numpy as np
import tensorflow as tf
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

BACKENDS = ("tf", "faiss")
# Scores held per block when block_size is None: 2**26 float32 = 256 MB.
_AUTO_BLOCK_SCORES = 1 << 26
_MAX_AUTO_BLOCK_ROWS = 1024
# Columns per chunk in the two-stage top-R selection.
_TOP_K_CHUNK = 32
# Rows per chunk of the elementwise passes over whole embedding matrices.
_CHUNK_ROWS = 1 << 14
# faiss backend: depth of the first search, and the factor by which unsettled queries go deeper.
_FAISS_FIRST_K = 32
_FAISS_DEEPER = 8


def retrieval_metrics(query_embeddings, query_labels, gallery_embeddings=None,
                      gallery_labels=None, ks=(1, 2, 4, 8), block_size=None, backend="tf"):
    """Computes Recall@K, MAP@R and R-Precision under cosine similarity.

    Neighbours are ranked by descending cosine similarity, ties broken by ascending gallery
    index, for all metrics. Without a gallery each query is searched among all other queries;
    only its own row is excluded, so exact duplicates at other indices still count as
    neighbours. Queries are processed in blocks of `block_size` rows, so memory is
    O(block_size * gallery size) and never O(N^2).

    Args:
        query_embeddings: Float array of shape `(N, D)`.
        query_labels: Int array of shape `(N,)`.
        gallery_embeddings: Optional float array of shape `(M, D)`. If None, the queries serve
            as their own gallery (leave-one-out).
        gallery_labels: Int array of shape `(M,)`; required iff `gallery_embeddings` is given.
        ks: Iterable of positive ints, the K values for Recall@K.
        block_size: Positive int, query rows per block; None picks the largest block (at most
            1024 rows) whose scores fit in 256 MB.
        backend: "tf" (matrix multiply and top-k in TensorFlow, on the available device) or
            "faiss" (exact inner-product search with `faiss-cpu`; same tie-break). The two agree
            exactly whenever both compute the same float32 similarities, and otherwise differ
            only where two similarities are closer than float32 rounding.

    Returns:
        Dict with Python floats `"recall@K"` for each K in `ks` (denominator: all queries, those
        without positives count as misses), `"map@r"` and `"r_precision"` (averaged over queries
        with R > 0; NaN if there are none), and ints `"num_queries"` and
        `"num_queries_without_positives"`.

    Raises:
        ValueError: On malformed shapes, non-finite embeddings, an unknown backend, or if some K
            exceeds the number of candidate neighbours.
        ImportError: If `backend="faiss"` and faiss is not installed.
    """
    query_embeddings, query_labels = _check_pair(query_embeddings, query_labels, "query")
    exclude_self = gallery_embeddings is None
    if exclude_self != (gallery_labels is None):
        raise ValueError("gallery_embeddings and gallery_labels must be given together; got "
                         f"gallery_embeddings is None={gallery_embeddings is None}, "
                         f"gallery_labels is None={gallery_labels is None}.")
    if exclude_self:
        gallery_embeddings, gallery_labels = query_embeddings, query_labels
    else:
        gallery_embeddings, gallery_labels = _check_pair(
            gallery_embeddings, gallery_labels, "gallery")
        if gallery_embeddings.shape[1] != query_embeddings.shape[1]:
            raise ValueError("Query and gallery embedding dims differ: "
                             f"{query_embeddings.shape[1]} vs {gallery_embeddings.shape[1]}.")
    ks = [int(k) for k in ks]
    num_candidates = len(gallery_labels) - int(exclude_self)
    for k in ks:
        if k < 1:
            raise ValueError(f"Each K must be >= 1, got K={k}.")
        if k > num_candidates:
            raise ValueError(f"K={k} exceeds the number of candidate "
                             f"neighbours ({num_candidates}).")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if block_size is None:
        block_size = min(_MAX_AUTO_BLOCK_ROWS, max(1, _AUTO_BLOCK_SCORES // len(gallery_labels)))
    block_size = int(block_size)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")

    positives = _Positives(gallery_labels, query_labels, exclude_self)
    search = _search_tf if backend == "tf" else _search_faiss
    ranks, relevant = search(query_embeddings, gallery_embeddings, positives, exclude_self,
                             max(ks), block_size)

    r = positives.r
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


def nmi(embeddings, labels, n_clusters=None, seed=0):
    """Normalised mutual information of k-means clusters with the labels.

    Args:
        embeddings: Float array of shape `(N, D)`; L2-normalised before clustering so
            clustering matches the cosine geometry.
        labels: Int array of shape `(N,)`.
        n_clusters: Number of clusters; defaults to the number of distinct labels.
        seed: Random state of k-means, making the result deterministic.

    Returns:
        NMI (geometric normalisation) as a Python float in [0, 1].
    """
    embeddings, labels = _check_pair(embeddings, labels, "")
    if n_clusters is None:
        n_clusters = len(np.unique(labels))
    clusters = KMeans(n_clusters=int(n_clusters), n_init=1,
                      random_state=seed).fit_predict(_l2_normalize(embeddings))
    return float(normalized_mutual_info_score(labels, clusters, average_method="geometric"))


class _Positives:
    """Which gallery items share each query's label, without any query x gallery matrix.

    Attributes:
        r: int array `(N,)`, R of each query (its positives, itself excluded).
        r_max: the largest R (at least 1), the depth of the MAP@R ranking.
        width: the largest gallery class, the width of `indices` rows.
    """

    def __init__(self, gallery_labels, query_labels, exclude_self):
        self._exclude_self = exclude_self
        self._query_labels = query_labels
        self._gallery_labels = gallery_labels
        # Gallery indices grouped by class, ascending within a class (stable sort).
        self._order = np.argsort(gallery_labels, kind="stable").astype(np.int32)
        classes, self._start, self._count = np.unique(
            gallery_labels[self._order], return_index=True, return_counts=True)
        slot = np.minimum(np.searchsorted(classes, query_labels), len(classes) - 1)
        known = classes[slot] == query_labels
        self._slot = slot
        self._query_count = np.where(known, self._count[slot], 0)
        self.r = self._query_count - int(exclude_self)
        self.r_max = max(int(self.r.max()), 1)
        self.width = int(self._count.max())

    def indices(self, start, stop):
        """Int32 `(stop - start, width)`: gallery indices of each query's positives, -1 padded."""
        column = np.arange(self.width)
        valid = column < self._query_count[start:stop, None]
        flat = self._start[self._slot[start:stop], None] + np.where(valid, column, 0)
        table = np.where(valid, self._order[flat], -1).astype(np.int32)
        if self._exclude_self:
            table[table == np.arange(start, stop)[:, None]] = -1
        return table

    def relevant(self, neighbours, rows):
        """Bool array: whether each gallery index in `neighbours` is a positive of its query.

        Args:
            neighbours: int array `(len(rows), k)` of gallery indices.
            rows: the queries, a slice or an index array.
        """
        return self._gallery_labels[neighbours] == self._query_labels[rows, None]


def _search_tf(queries, gallery, positives, exclude_self, k_max, block_size):
    """Best-positive ranks and top-R relevance with blockwise XLA-compiled TensorFlow."""
    del k_max  # ranks are counted exactly, whatever their size
    gallery = tf.constant(_l2_normalize(gallery))
    queries = gallery if exclude_self else tf.constant(_l2_normalize(queries))
    num_queries = int(queries.shape[0])
    # Self is dropped from the top list afterwards, so one more is selected.
    depth = positives.r_max + int(exclude_self)
    rows = min(block_size, num_queries)
    # Chunked selection pays off only when it leaves far fewer candidates than columns.
    chunk = _TOP_K_CHUNK if 2 * depth * _TOP_K_CHUNK <= int(gallery.shape[0]) else 0
    ranks, relevant = [], []
    for start in range(0, num_queries, rows):
        stop = min(start + rows, num_queries)
        block = queries[start:stop]
        table = positives.indices(start, stop)
        self_index = np.arange(start, stop, dtype=np.int32) if exclude_self else np.full(
            stop - start, -1, np.int32)
        if stop - start < rows:
            # Padding the last block to full size keeps one compiled program for all blocks.
            pad = rows - (stop - start)
            block = tf.pad(block, [[0, pad], [0, 0]])
            table = np.pad(table, [[0, pad], [0, 0]], constant_values=-1)
            self_index = np.pad(self_index, [0, pad], constant_values=-1)
        rank, top = _rank_and_top(block, gallery, tf.constant(table), tf.constant(self_index),
                                  depth, chunk)
        rank, top = rank.numpy()[:stop - start], top.numpy()[:stop - start]
        if exclude_self:
            top = _drop_self(top, self_index[:stop - start], positives.r_max)
        ranks.append(rank)
        relevant.append(positives.relevant(top, slice(start, stop)))
    return np.concatenate(ranks), np.concatenate(relevant)


# No autograph: the Python branches below are on static values, and tracing reads no source.
@tf.function(jit_compile=True, autograph=False)
def _rank_and_top(queries, gallery, positive_index, self_index, depth, chunk):
    """One block: the rank of each query's best positive, and its top `depth` neighbours.

    XLA fuses the counting into one pass over the block's scores, which are computed once and
    never copied; as a plain graph every elementwise step makes its own pass (1.5x slower on
    2 CPU cores at SOP scale).

    Args:
        queries: `(B, D)` unit vectors.
        gallery: `(M, D)` unit vectors.
        positive_index: int32 `(B, P)` gallery indices of the positives, -1 padded.
        self_index: int32 `(B,)` gallery index of the query itself (excluded), or -1.
        depth: Python int, neighbours returned per query.
        chunk: Python int, column chunk of the two-stage top-k selection; 0 for plain top_k.

    Returns:
        int32 `(B,)` ranks (0-based position of the best positive in the (score desc, index asc)
        order, self excluded; undefined without positives) and int32 `(B, depth)` neighbour
        indices in that order, self included.
    """
    scores = tf.matmul(queries, gallery, transpose_b=True)
    num_gallery = tf.shape(gallery)[0]
    neg_inf = tf.constant(-np.inf, tf.float32)
    is_positive = positive_index >= 0
    positive_scores = tf.where(
        is_positive, tf.gather(scores, tf.maximum(positive_index, 0), batch_dims=1), neg_inf)
    best = tf.reduce_max(positive_scores, axis=1, keepdims=True)
    best_index = tf.reduce_min(
        tf.where(is_positive & (positive_scores == best), positive_index, num_gallery),
        axis=1, keepdims=True)

    def ahead(score, index):
        return (score > best) | ((score == best) & (index < best_index))

    columns = tf.range(num_gallery)[tf.newaxis, :]
    count = tf.reduce_sum(tf.cast(ahead(scores, columns), tf.int32), axis=1)
    # Self is subtracted rather than masked out: masking would materialise a second score block.
    has_self = self_index >= 0
    self_scores = tf.gather(scores, tf.maximum(self_index, 0)[:, tf.newaxis], batch_dims=1)
    self_ahead = has_self[:, tf.newaxis] & ahead(self_scores, self_index[:, tf.newaxis])
    rank = count - tf.cast(self_ahead[:, 0], tf.int32)
    return rank, _top_indices(scores, depth, chunk)


def _top_indices(scores, depth, chunk):
    """Column indices of the `depth` best scores per row, in (score desc, index asc) order.

    top_k lists equal values lower index first, the tie-break of the ranks. With `chunk`, it
    first picks the `depth` best chunks of columns by their maximum (ties: lower chunk first),
    then the best of their columns: a quarter of plain top_k's cost on a 60,000-column block.
    Exact, ties included: a column outside the chosen chunks is beaten by the maxima of all
    `depth` chosen ones (by score, or on equal score by index, as its chunk lost the tie).
    """
    if not chunk:
        return tf.math.top_k(scores, k=depth, sorted=True)[1]
    rows, columns = scores.shape
    whole = columns // chunk * chunk
    chunks = tf.reshape(scores[:, :whole], [rows, whole // chunk, chunk])
    _, best_chunks = tf.math.top_k(tf.reduce_max(chunks, axis=2), k=depth)
    # Ascending chunk order keeps the candidates in column order, so ties stay by index.
    best_chunks = tf.sort(best_chunks, axis=1)
    values = tf.reshape(tf.gather(chunks, best_chunks, batch_dims=1), [rows, depth * chunk])
    index = tf.reshape(best_chunks[:, :, tf.newaxis] * chunk + tf.range(chunk), [rows, -1])
    if whole < columns:  # the last, partial chunk is always a candidate
        values = tf.concat([values, scores[:, whole:]], axis=1)
        index = tf.concat([index, tf.tile(tf.range(whole, columns)[tf.newaxis], [rows, 1])], 1)
    _, position = tf.math.top_k(values, k=depth, sorted=True)
    return tf.gather(index, position, batch_dims=1)


def _drop_self(top, self_index, width):
    """Removes each row's own index from its neighbour list (or the last entry if absent)."""
    keep = top != self_index[:, None]
    keep[:, -1] &= ~keep.all(axis=1)
    return top[keep].reshape(len(top), width)


def _search_faiss(queries, gallery, positives, exclude_self, k_max, block_size):
    """Best-positive ranks and top-R relevance from faiss' exact inner-product search.

    faiss returns the k best by score but orders equal scores arbitrarily, and may cut a run of
    equal scores at k. Lists are therefore re-sorted by (score desc, index asc) and trusted only
    above their last score; a query whose trusted part is too short is searched again deeper.
    """
    try:
        import faiss  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise ImportError("backend='faiss' needs faiss: pip install 'pnpp_tf[faiss]' "
                          "(or faiss-cpu).") from error
    gallery = _l2_normalize(gallery)
    queries = gallery if exclude_self else _l2_normalize(queries)
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    num_gallery = len(gallery)
    num_queries = len(queries)
    ranks = np.empty(num_queries, np.int64)
    relevant = np.empty((num_queries, positives.r_max), bool)
    for start in range(0, num_queries, block_size):
        pending = np.arange(start, min(start + block_size, num_queries))
        # Most best positives are near the top: a shallow search settles most queries, and only
        # the rest are searched again deeper (faiss' cost grows with k).
        k = min(num_gallery, max(_FAISS_FIRST_K, positives.r_max + int(exclude_self)))
        while len(pending):
            scores, neighbours = index.search(queries[pending], k)
            done, rank, rel = _read_faiss_lists(
                scores, neighbours, pending, positives, exclude_self, k_max,
                complete=k == num_gallery)
            ranks[pending[done]] = rank[done]
            relevant[pending[done]] = rel[done]
            pending = pending[~done]
            k = min(num_gallery, _FAISS_DEEPER * k)
    return ranks, relevant


def _read_faiss_lists(scores, neighbours, rows, positives, exclude_self, k_max, complete):
    """Ranks and top-R relevance of faiss results, and which rows they are exact for."""
    tied = np.any(scores[:, 1:] == scores[:, :-1], axis=1)
    if tied.any():
        # lexsort's last key is primary: score descending, then index ascending.
        order = np.lexsort((neighbours[tied], -scores[tied]), axis=-1)
        scores[tied] = np.take_along_axis(scores[tied], order, axis=1)
        neighbours[tied] = np.take_along_axis(neighbours[tied], order, axis=1)
    keep = neighbours >= 0
    if exclude_self:
        keep &= neighbours != rows[:, None]
    # Items scoring exactly the last score may be missing from the list; all above it are in.
    trusted = keep & (complete | (scores > scores[:, -1:]))
    num_trusted = trusted.sum(axis=1)
    position = np.cumsum(keep, axis=1) - 1
    rel = keep & positives.relevant(np.maximum(neighbours, 0), rows)
    first = np.where(rel & trusted, position, np.iinfo(np.int64).max).min(axis=1)
    found = first < num_trusted
    rank = np.where(found, first, num_trusted)
    r = positives.r[rows]
    # A query without positives is a miss however deep the search.
    done = complete | (r <= 0) | ((num_trusted >= r) & (found | (num_trusted >= k_max)))
    # Compact each row to its kept entries (stable, so order is preserved), then cut to R_max.
    compact = np.argsort(~keep, axis=1, kind="stable")[:, :positives.r_max]
    top_rel = np.take_along_axis(rel, compact, axis=1)
    return done, rank, top_rel


def _average_precision_at_r(relevant, r):
    """AP@R and R-Precision (Musgrave et al.) from the top-R_max relevance of each query."""
    position = np.arange(1, relevant.shape[1] + 1)
    relevant = relevant & (position <= r[:, None])
    hits = np.cumsum(relevant, axis=1)
    ap = np.sum(np.where(relevant, hits / position, 0.0), axis=1) / r
    return ap, hits[:, -1] / r


def _check_pair(embeddings, labels, name):
    """Validates and converts an (embeddings, labels) pair to numpy."""
    prefix = f"{name}_" if name else ""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels)
    if embeddings.ndim != 2:
        raise ValueError(f"{prefix}embeddings must be 2-D, got shape {embeddings.shape}.")
    if labels.ndim != 1:
        raise ValueError(f"{prefix}labels must be 1-D, got shape {labels.shape}.")
    if len(labels) != len(embeddings):
        raise ValueError(f"{prefix}labels has length {len(labels)} but "
                         f"{prefix}embeddings has {len(embeddings)} rows.")
    if len(labels) == 0:
        raise ValueError(f"{prefix}embeddings is empty.")
    # In chunks: a full-size boolean temporary would be a quarter of the embeddings' size.
    finite = np.concatenate([np.isfinite(embeddings[start:start + _CHUNK_ROWS]).all(axis=1)
                             for start in range(0, len(embeddings), _CHUNK_ROWS)])
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{prefix}embeddings has {len(bad)} row(s) with NaN or infinite "
                         f"values, e.g. row {bad[0]}; did training diverge?")
    return embeddings, labels.astype(np.int64)


def _l2_normalize(x, chunk=_CHUNK_ROWS):
    """Unit rows as a new float32 array, in chunks so no second full-size temporary exists."""
    out = np.empty_like(x, dtype=np.float32)
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk]
        norm = np.sqrt(np.einsum("ij,ij->i", part, part))[:, None]
        np.divide(part, np.maximum(norm, 1e-12), out=out[start:start + chunk])
    return out
