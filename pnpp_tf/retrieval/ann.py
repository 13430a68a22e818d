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
The shards of a catalogue share one trained quantiser (`build(trained=)`, and
`pnpp_tf.retrieval.ivf`), so a query is assigned to lists once. Before a shard of `IVFPQ_MIN_ROWS`
rows has trained one (too few rows to train 256 PQ centroids per sub-vector), a shard gets an
exact faiss IndexFlatIP instead, at most 20 MB for D = 512. Loaded memory-mapped with faiss'
IO_FLAG_MMAP_IFC.

Defaults, measured on 200,000 x 512 clustered unit rows: with HNSW M 32, efConstruction 128 and
efSearch 64 its own top 10 hold 0.99 of the exact one at f32/f16 (efSearch 32: 0.97; M 16 or
efConstruction 64: 0.94-0.98) and 100 candidates 0.997+ at every dtype; IVF-PQ's 100 hold 0.999
(50 only 0.94, hence `RESCORE`). usearch over faiss' HNSW: as fast at f16/i8 (faiss 2x at
f32), and f16/i8 without training a quantiser. IVF probes: 128 of the 1,024 lists a 65,536-row
first shard trains; at 1,000,000 x 512 rows with class structure (tools/bench_ann.py, local
intrinsic dimension 16; one shortlist of 100 per query) 32 probes found 0.73 of the exact top 10,
64 0.85, 128 0.91 and 256 0.93, and 128 with 300 re-scored (`RESCORE`) 0.95.

Threads: the libraries' own, `threads()` of them (`set_threads`; default os.cpu_count()), but
never more than a call has queries (both share out queries, not one query's work), and HNSW
graphs are built on one (see `build`). faiss' OpenMP thread count is set for each call, in the
calling thread only, and put back afterwards. usearch searches of one structure are serialised
(a lock), so threads may share structures, and search different shards side by side.
"""

import dataclasses
import operator
import os
import threading

import numpy as np

from pnpp_tf.errors import UserError
from pnpp_tf.retrieval import ivf

APPROXIMATE = ("hnsw", "ivfpq")
DTYPES = ("float32", "float16", "int8")
_FILES = {"hnsw": "hnsw.usearch", "ivfpq": "ivfpq.faiss"}
_USEARCH_DTYPES = {"float32": "f32", "float16": "f16", "int8": "i8"}
_USEARCH_ADD_THREADS = 1
# The flag each AnnParams field is set by, for messages.
FLAGS = {"connectivity": "--hnsw_connectivity", "expansion_add": "--hnsw_expansion_add",
         "expansion_search": "--hnsw_expansion_search", "lists": "--ivf_lists",
         "probes": "--ivf_probes", "pq_bytes": "--pq_bytes"}
MIN_POINTS_PER_LIST = ivf.MIN_POINTS_PER_LIST
IVFPQ_MIN_ROWS = ivf.MIN_TRAINING_ROWS  # 9,984: a first shard smaller gets an exact flat index
# The catalogue re-scores rescore_depth(k, backend) = max(factor * k, depth) candidates per query.
# HNSW shortlists by the stored vectors themselves; IVF-PQ by 64-byte codes, whose order over a
# million rows needs 3x the depth (tools/bench_ann.py, 1M x 512, 128 probes: recall@10 0.914 at
# 100, 0.952 at 300).
RESCORE = {"hnsw": (10, 100), "ivfpq": (30, 300)}
_threads = None
# The settings a search may change without rebuilding a structure.
SEARCH_SETTINGS = ("expansion_search", "probes")


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
    probes: int = 128
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


def search_settings(settings):
    """The given search-time settings (`SEARCH_SETTINGS`) of {name: value}, 0s and Nones left out.

    Raises:
        ValueError: an unknown name.
        UserError: a value that is not a positive integer (naming its flag).
    """
    given = {name: value for name, value in (settings or {}).items() if value not in (0, None)}
    unknown = sorted(set(given) - set(SEARCH_SETTINGS))
    if unknown:
        raise ValueError(f"search settings {unknown} are not among {SEARCH_SETTINGS}.")
    AnnParams(**given)  # checks the values, naming the flags
    return given


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


def rescore_depth(k, backend="hnsw"):
    """How many candidates to re-score exactly for the top `k`: max(10 k, 100) for HNSW,
    max(30 k, 300) for IVF-PQ (`RESCORE`)."""
    factor, least = RESCORE[_check_backend(backend)]
    return max(factor * int(k), least)


auto_lists = ivf.auto_lists


def build(backend, embeddings, params=None, dtype="float32", trained=None):
    """Builds `backend`'s structure over one shard; an HNSW graph on one thread (reproducible).

    Args:
        backend: one of `APPROXIMATE`.
        embeddings: float32 [n, D] unit rows, n >= 1; row i gets local id i.
        params: an `AnnParams`; None: the defaults.
        dtype: the catalogue's storage dtype, one of `DTYPES`: the precision of the HNSW graph's
            vectors (ivfpq stores PQ codes whatever it is).
        trained: optional ivfpq `Structure` of another shard of the same catalogue whose trained
            quantiser the new one copies rather than training its own (see `pnpp_tf.retrieval.ivf`);
            ignored for hnsw, and unless it is an IVF-PQ index.

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
        template = trained._index if trained is not None and trained.quantizer_key else None
        index = ivf.build(x, params, threads(), template)
    return Structure(backend, index, params)


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
        self._quantizer_key = None
        if backend == "hnsw":
            index.expansion_search = params.expansion_search
            self.dim = int(index.ndim)
            self.kind = f"usearch HNSW, {index.dtype.name.lower()}, M {index.connectivity}"
            return
        self.dim = int(index.d)
        self.kind = ivf.describe(index)
        if ivf.is_ivf(index):
            index.nprobe = min(params.probes, index.nlist)
        self._quantizer_key = ivf.quantizer_key(index)

    def __len__(self):
        return int(len(self._index) if self.backend == "hnsw" else self._index.ntotal)

    @property
    def quantizer_key(self):
        """For an IVF-PQ structure, what identifies its coarse quantiser: structures with equal
        keys take one `assign`ment; None for HNSW and flat structures."""
        return self._quantizer_key

    def assign(self, queries):
        """The lists an IVF-PQ structure probes for float32 unit `queries` [Q, D]: an opaque
        value for `candidates(assigned=)` of structures with the same `quantizer_key`."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        return ivf.assign(self._index, q, min(threads(), max(1, len(q))))

    def save(self, path):
        """Writes the structure to the one file `path` (not atomically: the catalogue stages)."""
        if self.backend == "hnsw":
            self._index.save(os.fspath(path))
            return
        ivf.write(self._index, path)

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
        return cls(backend, ivf.read(path, mmap, threads()), params)

    def candidates(self, queries, depth, num_threads=None, assigned=None, with_scores=False):
        """Each query's shortlist of local row ids, best first by the approximate score.

        Args:
            queries: float32 [Q, D] unit rows.
            depth: candidates per query (>= 1); see `rescore_depth`.
            num_threads: threads for this call; None: `threads()`.
            assigned: IVF-PQ only, optional: `assign(queries)` of a structure with the same
                `quantizer_key`, so that shards sharing a quantiser assign a query once.

            with_scores: also return the approximate scores, which rank candidates of shards of
                one catalogue against one another (same library, storage and, for IVF-PQ, a
                shared quantiser; estimates of one inner product otherwise).

        Returns:
            int64 [Q, depth] row ids in 0..n-1; -1 fills the end of a row where fewer were found:
            past n, and for IVF-PQ where the probed lists hold fewer than `depth` rows. With
            `with_scores`, (ids, float32 [Q, depth] scores, higher better, -inf where no id).

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
        scores = np.full((len(q), depth), -np.inf, dtype=np.float32)
        count = min(depth, len(self))
        if len(q):  # both libraries share out queries, not one query's work: no more threads than queries
            self._search(q, count, min(num_threads or threads(), len(q)), assigned, found, scores)
        return (found, scores) if with_scores else found

    def _search(self, q, count, num_threads, assigned, found, scores):
        """Fills `found` and `scores` with `candidates`' answer on `num_threads` threads."""
        if self.backend == "hnsw":
            with self._lock:
                matches = self._index.search(q, count, threads=num_threads)
            keys = np.asarray(matches.keys, dtype=np.int64).reshape(len(q), -1)
            distances = np.asarray(matches.distances, dtype=np.float32).reshape(len(q), -1)
            # One query gets a usearch Matches, whose keys are only those found; several a
            # BatchMatches, whose rows are padded with key 0 past their `counts`.
            counts = np.asarray(getattr(matches, "counts", keys.shape[1])).reshape(-1, 1)
            held = np.arange(keys.shape[1]) < counts
            found[:, :keys.shape[1]] = np.where(held, keys, -1)
            scores[:, :keys.shape[1]] = np.where(held, -distances, -np.inf)  # a distance: lower is nearer
            return
        scores[:, :count], found[:, :count] = ivf.search(self._index, q, count, num_threads, assigned)
        scores[found < 0] = -np.inf


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
