"""The k nearest indexed images of a query, and how far they are: search's side of the engine.

The search itself is `pnpp_tf.neighbours`, the engine behind the retrieval metrics too, with
their backends and tie rule: descending cosine similarity, ties by ascending index, exact on
either backend. This module adds search's choice of backend (faiss above `FAISS_MIN_IMAGES`
indexed images when it is installed, or when asked for) and its distances.
"""

import numpy as np

from pnpp_tf import neighbours
from pnpp_tf.errors import UserError
from pnpp_tf.neighbours import BACKENDS, import_faiss  # noqa: F401 (re-exported for search)

# Above this many indexed images "auto" searches with faiss IndexFlatIP, when it is installed.
FAISS_MIN_IMAGES = neighbours.FAISS_MIN_GALLERY
DISTANCE = "cosine distance (1 - cosine similarity; 0 = same direction, 2 = opposite)"


def cosine_distance(similarities):
    """The `DISTANCE` of cosine similarities: 1 - similarity, never below 0."""
    return np.maximum(1.0 - similarities, 0.0)


def nearest(queries, gallery, k=10, exclude=None, backend="auto"):
    """The `k` most cosine-similar gallery rows of each query.

    Ranked by descending similarity, ties by ascending index, on either backend: the order in
    which `pnpp_tf.evaluation.retrieval_metrics` counts the same embeddings' neighbours.

    Args:
        queries: float [Q, D] (or one query [D]); L2-normalised here.
        gallery: float [N, D]; L2-normalised here.
        k: neighbours per query; at most N (N - 1 with `exclude`).
        exclude: optional int [Q], a gallery index to leave out for each query (-1: none), e.g.
            the query itself when the queries are gallery items.
        backend: one of `BACKENDS`: "auto", "exact" (TensorFlow, blockwise) or "faiss"
            (IndexFlatIP).

    Returns:
        (float32 similarities [Q, k], int64 indices [Q, k], the backend used).

    Raises:
        UserError: on a bad k or backend, faiss asked for but missing, non-finite embeddings,
            or queries of another width than the gallery's.
    """
    queries = neighbours.check_rows(np.atleast_2d(np.asarray(queries, np.float32)),
                                    "query embeddings")
    gallery = neighbours.check_rows(gallery, "index embeddings")
    if queries.shape[1] != gallery.shape[1]:
        raise UserError(
            f"Query embeddings are {queries.shape[1]}-d but the index holds "
            f"{gallery.shape[1]}-d embeddings: was it built with another model?")
    used = neighbours.choose_backend(backend, len(gallery), FAISS_MIN_IMAGES)
    similarities, indices = neighbours.nearest(queries, gallery, k, exclude, used)
    return similarities, indices, used
