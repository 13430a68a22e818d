"""Approximate nearest-neighbour structures for one shard of a catalogue index: HNSW and IVF-PQ.

    import os
    from pnpp_tf.retrieval import ann

    params = ann.AnnParams()       # or ann.AnnParams.from_json(manifest["approximate"]["params"])
    structure = ann.build("hnsw", embeddings, params, dtype="float16")  # float32 [n, D] unit rows
    path = os.path.join(shard_dir, ann.structure_file("hnsw"))
    structure.save(path)
    structure = ann.Structure.load("hnsw", path, params=params)         # memory-mapped
    rows = structure.candidates(queries, ann.rescore_depth(k=10))       # int64 [Q, 100], -1 padded

A structure only shortlists: `candidates` gives each query's local row ids (0..n-1), best first by
the library's approximate score, and the catalogue re-scores them exactly with its stored
embeddings. Cosine similarity is the dot product of the unit rows.

Backends (`APPROXIMATE`), both `pip install 'pnpp_tf[ann]'`:
"hnsw": a usearch HNSW graph holding the vectors at the catalogue's storage dtype (f32, f16, or i8
as round(127 x) of the unit row, under usearch's cosine metric; inner product otherwise). The
whole file is memory-mapped on load (Index.restore(view=True)).
"ivfpq": a faiss IndexIVFPQ over inner products with 8-bit codes. `AnnParams.lists` = 0 picks
`auto_lists(n)` = round(4 sqrt(n)) lists, and any value is capped at n // 39 (faiss' k-means wants
39 training points per centroid); `pq_bytes` = 0 picks the largest divisor of D at most D // 8.
Shards of fewer than `IVFPQ_MIN_ROWS` rows (too few to train 256 PQ centroids per sub-vector)
get an exact faiss IndexFlatIP instead, at most 20 MB for D = 512. Loaded memory-mapped with
faiss' IO_FLAG_MMAP_IFC.

Defaults, measured on 200,000 x 512 clustered unit rows: with HNSW M 32, efConstruction 128 and
efSearch 64 its own top 10 hold 0.99 of the exact one at f32/f16 (efSearch 32: 0.97; M 16 or
efConstruction 64: 0.94-0.98) and 100 candidates 0.997+ at every dtype; IVF-PQ's 100 hold 0.999
(50 only 0.94, hence `RESCORE_DEPTH`), 16 probes being 4x where that stopped rising. usearch over
faiss' HNSW: as fast at f16/i8 (faiss 2x at f32), and f16/i8 without training a quantiser.

Threads: the libraries' own, `threads()` of them (`set_threads`; default os.cpu_count()), but
never more than a call has queries (both share out queries, not one query's work), and HNSW
graphs are built on one (see `build`). faiss' OpenMP thread count is set for each call, in the
calling thread only, and put back afterwards. usearch searches of one structure are serialised
(a lock), so threads may share structures, and search different shards side by side.
"""

import contextlib
import dataclasses
import math
import operator
import os
import struct
import threading

import numpy as np
from absl import logging

from pnpp_tf.errors import UserError

APPROXIMATE = ("hnsw", "ivfpq")
DTYPES = ("float32", "float16", "int8")
_FILES = {"hnsw": "hnsw.usearch", "ivfpq": "ivfpq.faiss"}
_USEARCH_DTYPES = {"float32": "f32", "float16": "f16", "int8": "i8"}
_USEARCH_ADD_THREADS = 1
# The flag each AnnParams field is set by, for messages.
FLAGS = {"connectivity": "--hnsw_connectivity", "expansion_add": "--hnsw_expansion_add",
         "expansion_search": "--hnsw_expansion_search", "lists": "--ivf_lists",
         "probes": "--ivf_probes", "pq_bytes": "--pq_bytes"}
# faiss' k-means warns below 39 training points per centroid (and fails below 1).
MIN_POINTS_PER_LIST = 39
_PQ_BITS = 8  # 8-bit PQ codes: 256 centroids per sub-vector, trained on the shard itself
IVFPQ_MIN_ROWS = MIN_POINTS_PER_LIST * (1 << _PQ_BITS)  # 9,984
_PQ_DIMS_PER_BYTE = 8  # auto pq_bytes: the largest divisor of D at most D // 8
# The catalogue re-scores rescore_depth(k) = max(RESCORE_FACTOR * k, RESCORE_DEPTH) candidates.
RESCORE_DEPTH = 100
RESCORE_FACTOR = 10
# faiss ignores bytes after an index, so ivfpq files end with this and the faiss part's length:
# a file cut short is then caught before faiss maps it (measured: with IO_FLAG_MMAP_IFC, faiss
# 1.15 reads an IVF-PQ file one byte short without an error).
_TRAILER = struct.Struct("<8sQ")
_MAGIC = b"PNPPIVF1"
_threads = None


@dataclasses.dataclass(frozen=True)
class AnnParams:
    """Build and search settings of the approximate structures (one flag each, `FLAGS`).

    Attributes:
        connectivity: HNSW M, the links per node (--hnsw_connectivity, >= 2).
        expansion_add: HNSW efConstruction, the candidate list while adding (--hnsw_expansion_add).
        expansion_search: HNSW efSearch (--hnsw_expansion_search); a search of depth d uses
            max(expansion_search, d).
        lists: IVF lists (--ivf_lists); 0: `auto_lists(n)`. Capped at n // 39 per shard.
        probes: IVF lists searched per query (--ivf_probes); capped at the lists.
        pq_bytes: PQ code bytes per vector (--pq_bytes); must divide D; 0: largest divisor of D
            at most D // 8.
    """

    connectivity: int = 32
    expansion_add: int = 128
    expansion_search: int = 64
    lists: int = 0
    probes: int = 16
    pq_bytes: int = 0

    def __post_init__(self):
        least = {"connectivity": 2, "expansion_add": 1, "expansion_search": 1, "lists": 0,
                 "probes": 1, "pq_bytes": 0}
        for name, minimum in least.items():
            value = getattr(self, name)
            number = _integer(value)
            if number is None or number < minimum:
                what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
                auto = " (0: automatic)" if minimum == 0 else ""
                raise UserError(f"{FLAGS[name]}={value!r} must be {what}{auto}.")
            object.__setattr__(self, name, number)  # a NumPy integer becomes an int, for JSON

    def to_json(self):
        """The fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d):
        """An `AnnParams` from `to_json`'s dict; missing fields take their defaults.

        Raises:
            UserError: `d` is not a dict, has an unknown field or a bad value.
        """
        if not isinstance(d, dict):
            raise UserError(f"ANN parameters must be a JSON object, got {type(d).__name__}.")
        unknown = sorted(set(d) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"ANN parameters {', '.join(unknown)} are unknown to this pnpp_tf: "
                            "written by a newer version? Upgrade pnpp_tf or build again.")
        return cls(**d)


def set_threads(count=None):
    """Sets the threads every later build and search uses; None: os.cpu_count()."""
    global _threads  # pylint: disable=global-statement - one setting per process
    if count is not None and (_integer(count) or 0) < 1:
        raise UserError(f"threads={count!r} must be a positive integer.")
    _threads = None if count is None else _integer(count)


def threads():
    """The threads builds and searches use: `set_threads`' value, or os.cpu_count()."""
    return _threads or os.cpu_count() or 1


def structure_file(backend):
    """The file name of `backend`'s structure inside a shard directory."""
    return _FILES[_check_backend(backend)]


def rescore_depth(k):
    """How many candidates to re-score exactly for the top `k`: max(10 k, 100)."""
    return max(RESCORE_FACTOR * int(k), RESCORE_DEPTH)


def auto_lists(n):
    """IVF lists for a shard of `n` rows when --ivf_lists=0: round(4 sqrt(n)), at most n // 39."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))


def build(backend, embeddings, params=None, dtype="float32"):
    """Builds `backend`'s structure over one shard; an HNSW graph on one thread (reproducible).

    Args:
        backend: one of `APPROXIMATE`.
        embeddings: float32 [n, D] unit rows, n >= 1; row i gets local id i.
        params: an `AnnParams`; None: the defaults.
        dtype: the catalogue's storage dtype, one of `DTYPES`: the precision of the HNSW graph's
            vectors (ivfpq stores PQ codes whatever it is).

    Returns:
        A `Structure`.

    Raises:
        UserError: the library is missing, a parameter does not fit the embeddings, or the
            embeddings are not a non-empty finite 2-D array.
    """
    backend = _check_backend(backend)
    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
    params = AnnParams() if params is None else params
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or not x.size or not np.isfinite(x).all():
        raise UserError(f"embeddings must be a non-empty finite 2-D array, got shape {x.shape}.")
    if backend == "hnsw":
        index_class = _import_usearch()
        index = index_class(ndim=x.shape[1], metric="cos" if dtype == "int8" else "ip",
                            dtype=_USEARCH_DTYPES[dtype], connectivity=params.connectivity,
                            expansion_add=params.expansion_add)
        # One thread, whatever threads() says: concurrent adds strand nodes that no search reaches
        # (unum-cloud/USearch#735, open in 2.26; measured on 50,000 rows: 8 never found as their
        # own nearest with 2 threads, none with 1), and one thread builds the same graph every
        # time. Cost measured at 200,000 x 512 f16 on 2 busy cores: 108 s instead of 94 s.
        index.add(np.arange(len(x), dtype=np.uint64), x, threads=_USEARCH_ADD_THREADS)
    else:
        index = _build_ivfpq(_import_faiss(), x, params)
    return Structure(backend, index, params)


def _build_ivfpq(faiss, x, params):
    n, dim = x.shape
    pq_bytes = params.pq_bytes or max(m for m in range(1, max(1, dim // _PQ_DIMS_PER_BYTE) + 1)
                                      if dim % m == 0)
    # Checked on every shard, the small ones too, so that a bad flag fails on the first.
    if dim % pq_bytes:
        raise UserError(f"--pq_bytes={pq_bytes} does not divide the embedding dimension {dim}: "
                        f"pick a divisor of {dim} (e.g. {dim // _PQ_DIMS_PER_BYTE or 1} if it "
                        "is one), or 0 for automatic.")
    with _faiss_threads(faiss):
        if n < IVFPQ_MIN_ROWS:
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


class Structure:
    """One shard's approximate structure: built by `build` or read by `load`.

    Attributes:
        backend: one of `APPROXIMATE`.
        dim: the embedding dimension D.
        kind: what it is, for logs (e.g. "faiss IVF-PQ, 1789 lists, 64-byte codes").
        params: the `AnnParams` whose search settings `candidates` uses.
    """

    def __init__(self, backend, index, params):
        self.backend = backend
        self.params = params
        self._index = index
        # usearch's search reserves per-thread contexts in the index: one search at a time.
        self._lock = threading.Lock()
        self._search_params = None
        if backend == "hnsw":
            index.expansion_search = params.expansion_search
            self.dim = int(index.ndim)
            self.kind = f"usearch HNSW, {index.dtype.name.lower()}, M {index.connectivity}"
            return
        faiss = _import_faiss()
        self.dim = int(index.d)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is None:
            self.kind = "faiss flat inner product (exact)"
        else:
            self.kind = f"faiss IVF-PQ, {ivf.nlist} lists, {index.pq.M}-byte codes"
            self._search_params = faiss.SearchParametersIVF(nprobe=min(params.probes, ivf.nlist))

    def __len__(self):
        return int(len(self._index) if self.backend == "hnsw" else self._index.ntotal)

    def save(self, path):
        """Writes the structure to the one file `path` (not atomically: the catalogue stages)."""
        if self.backend == "hnsw":
            self._index.save(os.fspath(path))
            return
        _import_faiss().write_index(self._index, os.fspath(path))
        size = os.path.getsize(path)
        with open(path, "ab") as file:
            file.write(_TRAILER.pack(_MAGIC, size))

    @classmethod
    def load(cls, backend, path, mmap=True, params=None):
        """Reads a structure `save` wrote.

        Args:
            backend: the backend it was built with, one of `APPROXIMATE`.
            path: its file.
            mmap: search it memory-mapped, so that loading adds little to resident memory
                (pages are read as searches touch them); False: read it into memory.
            params: the `AnnParams` whose search settings (expansion_search, probes) apply;
                None: the defaults.

        Returns:
            A `Structure`.

        Raises:
            UserError: the library is missing, or the file is missing, cut short or not such a
                structure.
        """
        backend = _check_backend(backend)
        path = os.fspath(path)
        params = AnnParams() if params is None else params
        if not os.path.isfile(path):
            raise UserError(f"{path} does not exist: the catalogue shard is incomplete; build "
                            "the catalogue again.")
        again = "if it was cut short or damaged, build the catalogue again"
        if backend == "hnsw":
            index_class = _import_usearch()
            try:
                index = index_class.restore(path, view=bool(mmap))
            except (RuntimeError, ValueError) as error:
                raise UserError(f"{path} is not a whole usearch HNSW index ({error}); "
                                f"{again}.") from error
            if index is None:
                raise UserError(f"{path} is not a usearch HNSW index; {again}.")
            return cls(backend, index, params)
        faiss = _import_faiss()
        size = os.path.getsize(path)
        with open(path, "rb") as file:
            file.seek(max(0, size - _TRAILER.size))
            magic, length = _TRAILER.unpack(file.read().rjust(_TRAILER.size, b"\0"))
        if magic != _MAGIC or length != size - _TRAILER.size:
            raise UserError(f"{path} is not a whole ivfpq structure (its {size} bytes do not end "
                            f"with pnpp_tf's length mark); {again}.")
        # IO_FLAG_MMAP_IFC (faiss >= 1.11) maps the file and points the lists and codes into it;
        # IO_FLAG_MMAP would copy the coarse centroids to the heap. Older faiss: read in memory.
        mapped = getattr(faiss, "IO_FLAG_MMAP_IFC", 0)
        flags = mapped | faiss.IO_FLAG_READ_ONLY if mmap and mapped else 0
        try:
            with _faiss_threads(faiss):
                index = faiss.read_index(path, flags)
        except RuntimeError as error:
            # faiss' message starts with the C++ function and source line: keep what failed.
            reason = str(error).strip().rsplit("Error: ", 1)[-1][:200]
            raise UserError(f"{path} is not a whole faiss index ({reason}); {again}.") from error
        if not isinstance(index, (faiss.IndexIVFPQ, faiss.IndexFlatIP)):
            raise UserError(f"{path} holds a faiss {type(index).__name__}, not an ivfpq "
                            f"structure; {again}.")
        return cls(backend, index, params)

    def candidates(self, queries, depth, num_threads=None):
        """Each query's shortlist of local row ids, best first by the approximate score.

        Args:
            queries: float32 [Q, D] unit rows.
            depth: candidates per query (>= 1); see `rescore_depth`.
            num_threads: threads for this call; None: `threads()`.

        Returns:
            int64 [Q, depth] row ids in 0..n-1; -1 fills the end of a row where fewer were found:
            past n, and for IVF-PQ where the probed lists hold fewer than `depth` rows.

        Raises:
            UserError: `queries` are not finite [Q, D] rows of this structure's D.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim or not np.isfinite(q).all():
            raise UserError(f"queries must be finite rows of {self.dim} values (the catalogue's "
                            f"embedding size), got shape {q.shape}.")
        depth = operator.index(depth)
        if depth < 1:
            raise ValueError(f"depth={depth} must be positive.")
        found = np.full((len(q), depth), -1, dtype=np.int64)
        count = min(depth, len(self))
        if not len(q):
            return found
        # Both libraries share out queries, not one query's work: more threads than queries idle.
        num_threads = min(num_threads or threads(), len(q))
        if self.backend == "hnsw":
            with self._lock:
                matches = self._index.search(q, count, threads=num_threads)
            keys = np.asarray(matches.keys, dtype=np.int64).reshape(len(q), -1)
            # One query gets a usearch Matches, whose keys are only those found; several a
            # BatchMatches, whose rows are padded with key 0 past their `counts`.
            counts = np.asarray(getattr(matches, "counts", keys.shape[1])).reshape(-1, 1)
            found[:, :keys.shape[1]] = np.where(np.arange(keys.shape[1]) < counts, keys, -1)
            return found
        with _faiss_threads(_import_faiss(), num_threads):
            _, ids = self._index.search(q, count, params=self._search_params)
        found[:, :count] = ids
        return found


@contextlib.contextmanager
def _faiss_threads(faiss, count=None):
    """faiss' OpenMP threads set to `count` (None: `threads()`) inside, and put back after.

    OpenMP keeps the thread count per calling thread (its nthreads-var is a data-environment
    ICV), so threads searching different shards at once each set their own without a lock.
    """
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count or threads())
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _integer(value):
    """`value` as an int if it is an integer (not a bool), else None."""
    try:
        return None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        return None


def _check_backend(backend):
    if backend not in APPROXIMATE:
        raise UserError(f"backend={backend!r} is not one of {', '.join(APPROXIMATE)}.")
    return backend


def _import_usearch():
    try:
        from usearch.index import Index  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise UserError("--backend=hnsw needs usearch: pip install 'pnpp_tf[ann]' "
                        "(or usearch).") from error
    return Index


def _import_faiss():
    try:
        import faiss  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise UserError("--backend=ivfpq needs faiss: pip install 'pnpp_tf[ann]' "
                        "(or faiss-cpu).") from error
    return faiss
