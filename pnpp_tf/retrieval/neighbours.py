"""The one exact k-nearest-neighbour engine, behind both the retrieval metrics and search.

    from pnpp_tf.retrieval import neighbours
    similarities, indices = neighbours.nearest(embeddings[:5], embeddings, k=10,
                                               exclude=np.arange(5))  # 5 of them as queries

One order ranks every neighbour list, whichever backend computes it: descending score, ties
broken by ascending gallery index. The score is the distance's (`DISTANCES`): "cosine", the
float32 dot product of the unit rows that `unit_rows` makes of the embeddings; "euclidean", on
the raw rows, -||q - g||^2 ranked as 2 q.g - ||g||^2 (the query's own ||q||^2 changes no rank),
the gallery's norm term subtracted in the same pass over the block. So the lists `python -m pnpp_tf.search` prints are the ones Recall@K
and MAP@R count (`pnpp_tf.retrieval.metrics`, which asks for the position of each query's first match
instead of a list K long: the number of candidates ahead of it in that same order).

Backends (`BACKENDS`): "exact" computes each block of scores with one matrix multiply and
selects from them in an XLA-compiled TensorFlow program, on the available device; "faiss" uses
faiss' IndexFlatIP or, for "euclidean", IndexFlatL2 (also exact), re-sorted into the same order; "auto" is faiss above
`FAISS_MIN_GALLERY` gallery rows when it is installed, "exact" otherwise. The two agree exactly
whenever they compute the same float32 similarities, and otherwise only where two similarities
are closer than float32 rounding. Memory is bounded by blocks of queries: no N x N matrix.
"""

import numpy as np
import tensorflow as tf
from absl import logging

from pnpp_tf.errors import UserError

BACKENDS = ("auto", "exact", "faiss")
DISTANCES = ("cosine", "euclidean")
# Earlier names, still accepted: evaluation's backend was called "tf".
ALIASES = {"tf": "exact"}
# "auto" picks faiss for galleries larger than this, when faiss is installed.
FAISS_MIN_GALLERY = 100_000
# Scores held per block when block_size is None: 2**26 float32 = 256 MB.
_AUTO_BLOCK_SCORES = 1 << 26
_MAX_AUTO_BLOCK_ROWS = 1024
# Columns per chunk in the two-stage top-k selection.
_TOP_K_CHUNK = 32
# Rows per chunk of the elementwise passes over whole embedding matrices.
_CHUNK_ROWS = 1 << 14
# faiss: least depth of the first search when ranks are wanted, and the factor by which
# unsettled queries go deeper.
_FAISS_FIRST_K = 32
_FAISS_DEEPER = 8
# RECIPE: x / max(||x||, 1e-12), as `pnpp_tf.modeling.losses.l2_normalize` does in the graph.
_MIN_NORM = 1e-12


def choose_backend(backend, num_gallery, faiss_min_gallery=None):
    """The backend that searches a gallery of `num_gallery` rows: "exact" or "faiss".

    Args:
        backend: one of `BACKENDS` or of `ALIASES`.
        num_gallery: rows of the gallery.
        faiss_min_gallery: the size above which "auto" picks faiss; None: `FAISS_MIN_GALLERY`.

    Returns:
        "exact" or "faiss".

    Raises:
        UserError: `backend` is unknown, or is "faiss" and faiss is not installed.
    """
    name = ALIASES.get(backend, backend)
    if name not in BACKENDS:
        raise UserError(f"backend={backend!r} is not one of {', '.join(BACKENDS)} (or tf, the "
                        "former name of exact).")
    if name == "faiss":
        import_faiss(required=True)
    if name != "auto":
        return name
    threshold = FAISS_MIN_GALLERY if faiss_min_gallery is None else faiss_min_gallery
    faiss = num_gallery > threshold and import_faiss() is not None
    logging.info("Nearest neighbours over %d items: %s (auto: faiss above %d if installed)",
                 num_gallery, "faiss IndexFlatIP, exact" if faiss else "exact, TensorFlow",
                 threshold)
    return "faiss" if faiss else "exact"


def check_distance(distance):
    """Returns `distance` if it is one of `DISTANCES`; raises `UserError` otherwise."""
    if distance not in DISTANCES:
        raise UserError(f"distance={distance!r} is not one of {', '.join(DISTANCES)}.")
    return distance


def import_faiss(required=False):
    """The faiss module; None if it is not installed, or with `required` a `UserError`."""
    try:
        import faiss  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        if required:
            raise UserError("backend='faiss' needs faiss: pip install 'pnpp_tf[faiss]' "
                            "(or faiss-cpu).") from error
        return None
    return faiss


def check_rows(x, name="embeddings"):
    """Checks an embedding matrix.

    Args:
        x: array-like `(N, D)` with N >= 1.
        name: how messages call `x`.

    Returns:
        `x` as a float32 array (not copied if it is one).

    Raises:
        UserError: `x` is not 2-D, is empty, or has a row with NaN or infinite values.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise UserError(f"{name} must be 2-D, got shape {x.shape}.")
    if not len(x):
        raise UserError(f"{name} is empty.")
    # In chunks: a full-size boolean temporary would be a quarter of the embeddings' size.
    finite = np.concatenate([np.isfinite(x[start:start + _CHUNK_ROWS]).all(axis=1)
                             for start in range(0, len(x), _CHUNK_ROWS)])
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise UserError(f"{name} has {len(bad)} row(s) with NaN or infinite values, e.g. row "
                        f"{bad[0]}; did training diverge?")
    return x


def unit_rows(x, name="embeddings"):
    """The one numpy L2 normaliser: `check_rows`, then each row scaled to unit length.

    Args:
        x: array-like `(N, D)` with N >= 1.
        name: how messages call `x`.

    Returns:
        x / max(||x||, 1e-12) row by row (a zero row stays zero), as a new float32 array
        computed in chunks, so that no second full-size temporary exists.

    Raises:
        UserError: as `check_rows`.
    """
    x = check_rows(x, name)
    out = np.empty_like(x)
    for start in range(0, len(x), _CHUNK_ROWS):
        part = x[start:start + _CHUNK_ROWS]
        norm = np.sqrt(np.einsum("ij,ij->i", part, part))[:, None]
        np.divide(part, np.maximum(norm, _MIN_NORM), out=out[start:start + _CHUNK_ROWS])
    return out


def nearest(queries, gallery, k, exclude=None, backend="exact", block_size=None, distance="cosine"):
    """The `k` nearest gallery rows of each query, in the one order (see the module).

    Args:
        queries: float `(Q, D)`, finite; for "cosine" normalised here by `unit_rows`.
        gallery: float `(N, D)`, finite; likewise. May be `queries` itself, which is then
            prepared once.
        k: neighbours per query, 1 to N (N - 1 with an exclusion).
        exclude: optional int array `(Q,)`, a gallery index to leave out for each query (-1:
            none), e.g. the query itself when the queries are the gallery.
        backend: "exact" or "faiss" (see `choose_backend`, which resolves "auto").
        block_size: query rows per block; None: at most 1024 rows whose scores fit in 256 MB.
        distance: one of `DISTANCES`.

    Returns:
        (float32 similarities `(Q, k)`: cosines, or for "euclidean" -||q - g||^2; int64
        gallery indices `(Q, k)`).

    Raises:
        UserError: on a bad `k`, `block_size` or `distance`.
    """
    similarities, indices = [], []
    for _, _, sims, found, _ in blocks(queries, gallery, k, exclude, backend, block_size,
                                       distance=distance):
        similarities.append(sims)
        indices.append(found)
    return np.concatenate(similarities), np.concatenate(indices)


def blocks(queries, gallery, k, exclude=None, backend="exact", block_size=None, matches=None,
           rank_limit=None, distance="cosine"):
    """`nearest` one block of queries at a time, and where each query's first match ranks.

    Args:
        queries, gallery, k, exclude, backend, block_size, distance: as in `nearest`.
        matches: optional, what each query's matches are, for the ranks: an object with
            `count` (int array `(Q,)`, each query's matches among its candidates),
            `table(start, stop)` (int32 `(stop - start, P)` gallery indices of the matches of
            queries `start:stop`, excluded ones and padding -1) and `contains(indices, rows)`
            (bool: whether each gallery index of `indices` matches its query in `rows`), such
            as `pnpp_tf.retrieval.metrics`'s same-label positives.
        rank_limit: ranks from this one on may be reported as any value at least as large,
            which spares faiss deep searches; None: all ranks are exact.

    Yields:
        (start, stop, similarities `(stop - start, k)`, indices `(stop - start, k)`, ranks): the
        queries `start:stop` and their neighbours as `nearest` returns them. `ranks` (None
        without `matches`) is int64 `(stop - start,)`: the 0-based position of each query's
        first match in its full neighbour list (exclusion applied), i.e. the number of
        candidates ahead of it; N for a query without matches.
    """
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"Queries {queries.shape} and gallery {gallery.shape} must be 2-D "
                         "arrays of the same width.")
    num_gallery = len(gallery)
    if exclude is not None:
        exclude = np.asarray(exclude, np.int64).reshape(len(queries))
        if not (exclude >= 0).any():
            exclude = None
    candidates = num_gallery - int(exclude is not None)
    if not 1 <= int(k) <= candidates:
        raise UserError(f"k={k} must be between 1 and the {candidates} candidate neighbours.")
    if block_size is None:
        block_size = min(_MAX_AUTO_BLOCK_ROWS, max(1, _AUTO_BLOCK_SCORES // num_gallery))
    if int(block_size) < 1:
        raise UserError(f"block_size must be >= 1, got {block_size}.")
    if backend not in ("exact", "faiss"):
        raise ValueError(f"backend must be resolved to exact or faiss, got {backend!r}.")
    euclidean = check_distance(distance) == "euclidean"
    search = _faiss_blocks if backend == "faiss" else _exact_blocks
    limit = num_gallery if rank_limit is None else min(int(rank_limit), num_gallery)
    for start, stop, sims, found, ranks in search(queries, gallery, int(k), exclude,
                                                  int(block_size), matches, limit, euclidean):
        if matches is not None:
            ranks = np.where(matches.count[start:stop] > 0, ranks, num_gallery).astype(np.int64)
        yield start, stop, sims.astype(np.float32), found.astype(np.int64), ranks


def _exact_blocks(queries, gallery, k, exclude, block_size, matches, rank_limit, euclidean):
    del rank_limit  # ranks are counted exactly, whatever their size
    # The unit rows are temporaries: only the tensors are held while searching.
    prepare = check_rows if euclidean else unit_rows
    gallery_tensor = tf.constant(prepare(gallery))
    query_tensor = gallery_tensor if queries is gallery else tf.constant(prepare(queries))
    gallery_norms = _squared_norms(gallery_tensor) if euclidean else None
    num_queries, num_gallery = len(queries), len(gallery)
    # The excluded item is dropped from each list afterwards, so one more is selected.
    depth = k + int(exclude is not None)
    rows = min(block_size, num_queries)
    # Chunked selection pays off only when it leaves far fewer candidates than columns.
    chunk = _TOP_K_CHUNK if 2 * depth * _TOP_K_CHUNK <= num_gallery else 0
    for start in range(0, num_queries, rows):
        stop = min(start + rows, num_queries)
        block = query_tensor[start:stop]
        table = matches.table(start, stop) if matches is not None else np.full(
            (stop - start, 1), -1, np.int32)
        skip = np.full(stop - start, -1, np.int32) if exclude is None else exclude[
            start:stop].astype(np.int32)
        if stop - start < rows:
            # Padding the last block to full size keeps one compiled program for all blocks.
            pad = rows - (stop - start)
            block = tf.pad(block, [[0, pad], [0, 0]])
            table = np.pad(table, [[0, pad], [0, 0]], constant_values=-1)
            skip = np.pad(skip, [0, pad], constant_values=-1)
        rank, sims, found = (
            t.numpy()[:stop - start] for t in _rank_and_top(
                block, gallery_tensor, tf.constant(table), tf.constant(skip), depth, chunk,
                gallery_norms))
        if euclidean:  # the rank-free query term, for the values only: -||q - g||^2
            sims = sims - _squared_norms(block).numpy()[:stop - start, None]
        if exclude is not None:
            sims, found = _drop_excluded(sims, found, skip[:stop - start], k)
        yield start, stop, sims, found, rank if matches is not None else None


# No autograph: the Python branches below are on static values, and tracing reads no source.
def _squared_norms(rows):
    return tf.reduce_sum(tf.square(rows), axis=1)


@tf.function(jit_compile=True, autograph=False)
def _rank_and_top(queries, gallery, match_index, skip_index, depth, chunk, gallery_norms=None):
    """One block: the rank of each query's first match, and its top `depth` neighbours.

    XLA fuses the counting into one pass over the block's scores, which are computed once and
    never copied; as a plain graph every elementwise step makes its own pass (1.5x slower on
    2 CPU cores at SOP scale). Search, which wants no ranks, runs this same program (with no
    matches) so that its scores are computed exactly as the metrics' are.

    Args:
        queries: `(B, D)` unit vectors (raw rows with `gallery_norms`).
        gallery: `(M, D)` unit vectors (raw rows with `gallery_norms`).
        match_index: int32 `(B, P)` gallery indices of the matches, -1 padded.
        skip_index: int32 `(B,)` gallery index excluded from each query's candidates, or -1.
        depth: Python int, neighbours returned per query.
        chunk: Python int, column chunk of the two-stage top-k selection; 0 for plain top_k.
        gallery_norms: None (cosine: the score is q.g), or float32 `(M,)` ||g||^2 (euclidean:
            the score is 2 q.g - ||g||^2).

    Returns:
        int32 `(B,)` ranks (0-based position of the first match in the (score desc, index asc)
        order, exclusion applied; undefined without matches), and float32 similarities and
        int32 indices `(B, depth)` of the neighbours in that order, exclusion not applied.
    """
    scores = tf.matmul(queries, gallery, transpose_b=True)
    if gallery_norms is not None:
        scores = 2.0 * scores - gallery_norms[tf.newaxis, :]
    num_gallery = tf.shape(gallery)[0]
    neg_inf = tf.constant(-np.inf, tf.float32)
    is_match = match_index >= 0
    match_scores = tf.where(
        is_match, tf.gather(scores, tf.maximum(match_index, 0), batch_dims=1), neg_inf)
    best = tf.reduce_max(match_scores, axis=1, keepdims=True)
    best_index = tf.reduce_min(
        tf.where(is_match & (match_scores == best), match_index, num_gallery),
        axis=1, keepdims=True)

    def ahead(score, index):
        return (score > best) | ((score == best) & (index < best_index))

    columns = tf.range(num_gallery)[tf.newaxis, :]
    count = tf.reduce_sum(tf.cast(ahead(scores, columns), tf.int32), axis=1)
    # The excluded item is subtracted rather than masked out: masking would materialise a
    # second score block.
    has_skip = skip_index >= 0
    skip_scores = tf.gather(scores, tf.maximum(skip_index, 0)[:, tf.newaxis], batch_dims=1)
    skip_ahead = has_skip[:, tf.newaxis] & ahead(skip_scores, skip_index[:, tf.newaxis])
    rank = count - tf.cast(skip_ahead[:, 0], tf.int32)
    values, indices = _top(scores, depth, chunk)
    return rank, values, indices


def _top(scores, depth, chunk):
    """Values and column indices of the `depth` best scores per row, (score desc, index asc).

    top_k lists equal values lower index first, the tie-break of the ranks. With `chunk`, it
    first picks the `depth` best chunks of columns by their maximum (ties: lower chunk first),
    then the best of their columns: a quarter of plain top_k's cost on a 60,000-column block.
    Exact, ties included: a column outside the chosen chunks is beaten by the maxima of all
    `depth` chosen ones (by score, or on equal score by index, as its chunk lost the tie).
    """
    if not chunk:
        return tf.math.top_k(scores, k=depth, sorted=True)
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
    top_values, position = tf.math.top_k(values, k=depth, sorted=True)
    return top_values, tf.gather(index, position, batch_dims=1)


def _drop_excluded(sims, found, skip, k):
    """Removes each row's excluded index from its lists (or the last entry if absent)."""
    keep = found != skip[:, None]
    keep[:, -1] &= ~keep.all(axis=1)
    return sims[keep].reshape(len(found), k), found[keep].reshape(len(found), k)


def _faiss_blocks(queries, gallery, k, exclude, block_size, matches, rank_limit, euclidean):
    """`_exact_blocks` on faiss' IndexFlatIP (IndexFlatL2, scores -||q - g||^2), in the same order.

    faiss returns the best by score but orders equal scores arbitrarily, and may cut a run of
    equal scores anywhere. Lists are therefore re-sorted by (score desc, index asc) and trusted
    only above their last score; a query whose trusted part is too short is searched again
    deeper, until it is long enough or holds the whole gallery.
    """
    faiss = import_faiss(required=True)
    index = (faiss.IndexFlatL2 if euclidean else faiss.IndexFlatIP)(gallery.shape[1])
    prepare = check_rows if euclidean else unit_rows
    prepared = prepare(gallery)
    index.add(prepared)
    queries = prepared if queries is gallery else prepare(queries)
    del prepared  # faiss holds its own copy
    num_gallery, num_queries = len(gallery), len(queries)
    # One more than needed, so that the needed ones can all lie above the last score. With
    # ranks, most first matches are near the top: a shallow search settles most queries, and
    # only the rest are searched again deeper (faiss' cost grows with its depth).
    first_k = k + int(exclude is not None) + 1
    if matches is not None:
        first_k = max(first_k, _FAISS_FIRST_K)
    for start in range(0, num_queries, block_size):
        stop = min(start + block_size, num_queries)
        sims = np.empty((stop - start, k), np.float32)
        found = np.empty((stop - start, k), np.int64)
        ranks = np.empty(stop - start, np.int64)
        pending = np.arange(start, stop)
        depth = min(num_gallery, first_k)
        while len(pending):
            scores, neighbours = index.search(queries[pending], depth)
            if euclidean:  # ascending distances: as scores, descending, missing ones last
                scores = -scores
            done, row_sims, row_found, rank = _settle(
                scores, neighbours, pending, exclude, k, matches, rank_limit,
                complete=depth == num_gallery)
            settled = pending[done] - start
            sims[settled], found[settled] = row_sims[done], row_found[done]
            if matches is not None:
                ranks[settled] = rank[done]
            pending = pending[~done]
            depth = min(num_gallery, _FAISS_DEEPER * depth)
        yield start, stop, sims, found, ranks if matches is not None else None


def _settle(scores, neighbours, rows, exclude, k, matches, rank_limit, complete):
    """The lists and ranks of faiss results, in the one order, and which rows they are exact for."""
    tied = np.any(scores[:, 1:] == scores[:, :-1], axis=1)
    if tied.any():
        # lexsort's last key is primary: score descending, then index ascending.
        order = np.lexsort((neighbours[tied], -scores[tied]), axis=-1)
        scores[tied] = np.take_along_axis(scores[tied], order, axis=1)
        neighbours[tied] = np.take_along_axis(neighbours[tied], order, axis=1)
    keep = neighbours >= 0
    if exclude is not None:
        keep &= neighbours != exclude[rows, None]
    # Items scoring exactly the last score may be missing from the list; all above it are in.
    trusted = keep & (complete | (scores > scores[:, -1:]))
    num_trusted = trusted.sum(axis=1)
    done = complete | (num_trusted >= k)
    # Each row compacted to its kept entries (stable, so in order), cut to k.
    compact = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    row_sims = np.take_along_axis(scores, compact, axis=1)
    row_found = np.take_along_axis(neighbours, compact, axis=1)
    rank = None
    if matches is not None:
        position = np.cumsum(keep, axis=1) - 1
        is_match = keep & trusted & matches.contains(np.maximum(neighbours, 0), rows)
        first = np.where(is_match, position, np.iinfo(np.int64).max).min(axis=1)
        hit = first < num_trusted
        rank = np.where(hit, first, num_trusted)
        # A query without matches has no rank to find, however deep the search.
        done &= complete | (matches.count[rows] <= 0) | hit | (num_trusted >= rank_limit)
    return done, row_sims, row_found, rank
