"""The k nearest neighbours by cosine similarity: exact blockwise in numpy, or on faiss.

Rows are L2-normalised here, so cosine similarity is their dot product. faiss (IndexFlatIP, still
exact) is used above `FAISS_MIN_IMAGES` gallery rows when it is installed, or when asked for.
"""

import numpy as np
from absl import logging

# Above this many indexed images a faiss IndexFlatIP searches, when faiss is installed.
FAISS_MIN_IMAGES = 100_000
# Scores held per block of the exact search: 2**24 float32 = 64 MB.
_BLOCK_SCORES = 1 << 24
DISTANCE = "cosine distance (1 - cosine similarity; 0 = same direction, 2 = opposite)"
BACKENDS = ("auto", "exact", "faiss")


def cosine_distance(similarities):
    """The `DISTANCE` of cosine similarities: 1 - similarity, never below 0."""
    return np.maximum(1.0 - similarities, 0.0)


def choose_backend(num_gallery, backend="auto"):
    """"exact" or "faiss" for a search among `num_gallery` items; logs the choice.

    "auto" means faiss when it is installed and more than `FAISS_MIN_IMAGES` items are searched.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "auto":
        if num_gallery > FAISS_MIN_IMAGES:
            if import_faiss() is not None:
                logging.info("Search: faiss IndexFlatIP (exact inner product) over %d images "
                             "(more than %d)", num_gallery, FAISS_MIN_IMAGES)
                return "faiss"
            logging.info("Search: exact blockwise over %d images; faiss is not installed "
                         "(pip install 'pnpp_tf[faiss]' for faster search above %d images)",
                         num_gallery, FAISS_MIN_IMAGES)
            return "exact"
        logging.info("Search: exact blockwise over %d images (faiss, if installed, is used "
                     "above %d)", num_gallery, FAISS_MIN_IMAGES)
        return "exact"
    if backend == "faiss" and import_faiss() is None:
        raise ValueError("backend='faiss' needs faiss: pip install 'pnpp_tf[faiss]' "
                         "(or faiss-cpu).")
    logging.info("Search: %s over %d images (requested)", backend, num_gallery)
    return backend


def nearest(queries, gallery, k=10, exclude=None, backend="auto"):
    """The `k` most cosine-similar gallery rows of each query.

    Ranked by descending similarity; the exact backend breaks ties by ascending index, faiss
    in its own order.

    Args:
        queries: float [Q, D]; L2-normalised here.
        gallery: float [N, D]; L2-normalised here.
        k: neighbours per query; at most N (N - 1 with `exclude`).
        exclude: optional int [Q], a gallery index to leave out for each query (-1: none), e.g.
            the query itself when the queries are gallery items.
        backend: "auto", "exact" (blockwise numpy matrix products) or "faiss" (IndexFlatIP).

    Returns:
        (float32 similarities [Q, k], int64 indices [Q, k], the backend used).
    """
    queries = _unit_rows(np.atleast_2d(np.asarray(queries, np.float32)))
    gallery = _unit_rows(np.asarray(gallery, np.float32))
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"Query embeddings are {queries.shape[1]}-d but the index holds "
                         f"{gallery.shape[1]}-d embeddings: was it built with another model?")
    exclude = None if exclude is None else np.asarray(exclude, np.int64).reshape(len(queries))
    candidates = len(gallery) - (1 if exclude is not None and (exclude >= 0).any() else 0)
    k = int(k)
    if not 1 <= k <= candidates:
        raise ValueError(f"k={k} must be between 1 and the {candidates} candidate images.")
    backend = choose_backend(len(gallery), backend)
    search = _nearest_faiss if backend == "faiss" else _nearest_exact
    similarities, indices = search(queries, gallery, k, exclude)
    return similarities, indices, backend


def import_faiss():
    """The faiss module, or None if it is not installed."""
    try:
        import faiss  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    return faiss


def _nearest_exact(queries, gallery, k, exclude):
    rows = max(1, _BLOCK_SCORES // max(len(gallery), 1))
    out_scores = np.empty((len(queries), k), np.float32)
    out_indices = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), rows):
        stop = min(start + rows, len(queries))
        scores = queries[start:stop] @ gallery.T
        if exclude is not None:
            block = np.arange(stop - start)
            skip = exclude[start:stop]
            scores[block[skip >= 0], skip[skip >= 0]] = -np.inf
        if k < scores.shape[1]:
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            # argpartition may cut a run of equal scores anywhere: take every item tied with the
            # k-th score, so the (score desc, index asc) order below is exact.
            kth = np.take_along_axis(scores, part, axis=1).min(axis=1, keepdims=True)
            if (np.sum(scores >= kth, axis=1) > k).any():
                part = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        else:
            part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        top = np.take_along_axis(scores, part, axis=1)
        order = np.lexsort((part, -top), axis=-1)[:, :k]
        out_indices[start:stop] = np.take_along_axis(part, order, axis=1)
        out_scores[start:stop] = np.take_along_axis(top, order, axis=1)
    return out_scores, out_indices


def _nearest_faiss(queries, gallery, k, exclude):
    faiss = import_faiss()
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery))
    extra = int(exclude is not None)
    scores, indices = index.search(np.ascontiguousarray(queries), k + extra)
    if extra:
        keep = indices != exclude[:, None]
        # Where the excluded item is not in the list, drop its last entry instead.
        keep[:, -1] &= ~keep.all(axis=1)
        scores = scores[keep].reshape(len(queries), k)
        indices = indices[keep].reshape(len(queries), k)
    return scores.astype(np.float32), indices.astype(np.int64)


def _unit_rows(x):
    if x.ndim != 2 or not len(x):
        raise ValueError(f"Embeddings must be a non-empty [N, D] array, got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError("Embeddings hold NaN or infinite values.")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
