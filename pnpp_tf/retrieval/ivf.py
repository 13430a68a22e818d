"""The faiss side of the "ivfpq" backend (`pnpp_tf.retrieval.ann`): build, file, lists, search.

A catalogue's IVF-PQ shards share one trained quantiser: the first shard big enough trains the
coarse centroids and PQ codebooks, and every later shard is a copy of that trained index with
its own rows added (`build(..., trained=)`). A query is then assigned to its lists once
(`assign`) and each shard scans the same lists (`search(..., assigned=)`), as one IVF index
over the whole catalogue would, instead of every shard training and searching its own
quantiser: with 16 shards of 65,536 rows, the coarse centroids alone were 32 MB streamed per
query. A shard written before this, with its own quantiser, is searched with its own
assignment (`quantizer_key` tells them apart).

A file is faiss' own with a trailer: faiss ignores bytes after an index, so the file ends with
a magic and the faiss part's length, and a file cut short is caught before faiss maps it
(measured: with IO_FLAG_MMAP_IFC, faiss 1.15 reads an IVF-PQ file one byte short without an
error).
"""

import contextlib
import hashlib
import math
import os
import struct

from absl import logging

from pnpp_tf.errors import UserError

# faiss' k-means warns below 39 training points per centroid (and fails below 1).
MIN_POINTS_PER_LIST = 39
_PQ_BITS = 8  # 8-bit PQ codes: 256 centroids per sub-vector
MIN_TRAINING_ROWS = MIN_POINTS_PER_LIST * (1 << _PQ_BITS)  # 9,984
_PQ_DIMS_PER_BYTE = 8  # auto pq_bytes: the largest divisor of D at most D // 8
_TRAILER = struct.Struct("<8sQ")
_MAGIC = b"PNPPIVF1"


def import_faiss():
    """The faiss module, or a `UserError` saying how to install it."""
    try:
        import faiss  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise UserError("--backend=ivfpq needs faiss: pip install 'pnpp_tf[ann]' (or faiss-cpu).") from error
    return faiss


def auto_lists(n):
    """IVF lists for `n` training rows when --ivf_lists=0: round(4 sqrt(n)), at most n // 39."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))


def build(x, params, threads, trained=None):
    """A faiss index over the unit rows `x` (float32 [n, D]), row i with id i.

    Args:
        x: the shard's rows.
        params: the `ann.AnnParams` (lists, pq_bytes).
        threads: OpenMP threads for training and adding.
        trained: optional IVF-PQ index of the same catalogue (its rows are not used): a copy
            of its trained quantiser and codebooks gets the rows, with no training.

    Returns:
        An IndexIVFPQ; or, with no `trained` and fewer than `MIN_TRAINING_ROWS` rows (too few
        to train 256 PQ centroids per sub-vector), an exact IndexFlatIP (20 MB at D = 512).
    """
    faiss = import_faiss()
    n, dim = x.shape
    pq_bytes = params.pq_bytes or max(m for m in range(1, max(1, dim // _PQ_DIMS_PER_BYTE) + 1) if dim % m == 0)
    # Checked on every shard, the small ones too, so that a bad flag fails on the first.
    if dim % pq_bytes:
        raise UserError(f"--pq_bytes={pq_bytes} does not divide the embedding dimension {dim}: pick a divisor "
                        f"of {dim} (e.g. {dim // _PQ_DIMS_PER_BYTE or 1} if it is one), or 0 for automatic.")
    with omp_threads(faiss, threads):
        if trained is not None:
            index = faiss.clone_index(trained)
            index.reset()
        elif n < MIN_TRAINING_ROWS:
            index = faiss.IndexFlatIP(dim)
        else:
            lists = min(params.lists or auto_lists(n), n // MIN_POINTS_PER_LIST)
            if params.lists > lists:
                logging.info("--ivf_lists=%d lowered to %d on a shard of %d rows (%d per list)",
                             params.lists, lists, n, MIN_POINTS_PER_LIST)
            index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, lists, pq_bytes, _PQ_BITS,
                                     faiss.METRIC_INNER_PRODUCT)
            index.train(x)
        index.add(x)
    return index


def write(index, path):
    """Writes `index` to `path`, with the length trailer."""
    import_faiss().write_index(index, os.fspath(path))
    size = os.path.getsize(path)
    with open(path, "ab") as file:
        file.write(_TRAILER.pack(_MAGIC, size))


def read(path, mmap, threads):
    """Reads what `write` wrote: inverted lists and codes memory-mapped if `mmap`.

    Raises:
        UserError: the file is cut short, damaged or another kind of faiss index.
    """
    faiss = import_faiss()
    again = "if it was cut short or damaged, build the catalogue again"
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        file.seek(max(0, size - _TRAILER.size))
        magic, length = _TRAILER.unpack(file.read().rjust(_TRAILER.size, b"\0"))
    if magic != _MAGIC or length != size - _TRAILER.size:
        raise UserError(f"{path} is not a whole ivfpq structure (its {size} bytes do not end with "
                        f"pnpp_tf's length mark); {again}.")
    # IO_FLAG_MMAP_IFC (faiss >= 1.11) maps the file and points the lists and codes into it;
    # IO_FLAG_MMAP would copy the coarse centroids to the heap. Older faiss: read in memory.
    mapped = getattr(faiss, "IO_FLAG_MMAP_IFC", 0)
    flags = mapped | faiss.IO_FLAG_READ_ONLY if mmap and mapped else 0
    try:
        with omp_threads(faiss, threads):
            index = faiss.read_index(path, flags)
    except RuntimeError as error:
        # faiss' message starts with the C++ function and source line: keep what failed.
        reason = str(error).strip().rsplit("Error: ", 1)[-1][:200]
        raise UserError(f"{path} is not a whole faiss index ({reason}); {again}.") from error
    if not isinstance(index, (faiss.IndexIVFPQ, faiss.IndexFlatIP)):
        raise UserError(f"{path} holds a faiss {type(index).__name__}, not an ivfpq structure; {again}.")
    return index


def describe(index):
    """What `index` is, for logs."""
    if not is_ivf(index):
        return "faiss flat inner product (exact)"
    return f"faiss IVF-PQ, {index.nlist} lists, {index.pq.M}-byte codes"


def is_ivf(index):
    return hasattr(index, "nlist")


def quantizer_key(index):
    """A digest of an IVF index's coarse centroids (equal for shards built from one trained
    index, so a query's assignment serves them all); None for a flat index."""
    if not is_ivf(index):
        return None
    centroids = index.quantizer.reconstruct_n(0, index.nlist)
    return f"{index.nlist}:{hashlib.sha1(centroids.tobytes()).hexdigest()}"


def assign(index, queries, threads):
    """(centroid similarities, list ids), each [Q, nprobe]: the lists an IVF index probes."""
    with omp_threads(import_faiss(), threads):
        return index.quantizer.search(queries, index.nprobe)


def search(index, queries, count, threads, assigned=None):
    """Each query's `count` best rows by the index's own estimate of the inner product.

    Args:
        assigned: optional `assign` of an index with the same `quantizer_key`; None: its own.

    Returns:
        (float32 [Q, count] estimated inner products, -inf where none; int64 [Q, count] ids, -1
        where none).
    """
    with omp_threads(import_faiss(), threads):
        if assigned is None or not is_ivf(index):
            scores, ids = index.search(queries, count)
        else:
            centroid_scores, lists = assigned
            scores, ids = index.search_preassigned(queries, count, lists, centroid_scores)
    return scores.astype("float32", copy=False), ids


@contextlib.contextmanager
def omp_threads(faiss, count):
    """faiss' OpenMP threads set to `count` inside, and put back after.

    OpenMP keeps the thread count per calling thread (its nthreads-var is a data-environment
    ICV), so threads searching different shards at once each set their own without a lock.
    """
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
