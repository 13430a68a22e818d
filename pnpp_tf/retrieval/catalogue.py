"""A catalogue index: a directory of shards and a manifest, searched memory-mapped.

    catalogue = Catalogue.open("photos.index")
    distances, indices, backend = catalogue.search(query_embeddings, k=10)   # "auto": its structure
    catalogue.path(indices[0, 0])          # the nearest image's file

Layout (`pnpp_tf.index` writes it, adding and removing shards as the folder changes):

    photos.index/
      manifest.json       the truth: model, crop size, dimension, dtype, backend, the shards in order
      shard-000000/ ...   `pnpp_tf.retrieval.shards`: embeddings, paths, keys, approximate structure

The manifest is replaced in one rename after a shard is written whole, so a kill at any moment
leaves the catalogue of the last manifest (a shard directory it does not list is one that was
being written, and the next `pnpp_tf.index` removes it).

Items are numbered in manifest order: shard by shard, row by row. Every backend ranks by the exact
engine's rule (`pnpp_tf.retrieval.neighbours`): descending cosine similarity of the stored rows
decoded to unit float32, ties by ascending item number. "exact" scores every row of each shard
(the mapped float32 rows themselves, or blocks decoded from float16/int8) and merges the lists;
"hnsw" and "ivfpq" ask each shard's approximate structure for candidates
(`pnpp_tf.retrieval.ann`), keep each query's best by the structures' own scores over all shards
(its shortlist), score the shortlist exactly and rank it the same way, so the only difference
from "exact" is an item the shortlist missed.
"""

import concurrent.futures
import dataclasses
import os
import typing

import numpy as np
from absl import logging

from pnpp_tf.errors import UserError
from pnpp_tf.io_utils import read_json_object
from pnpp_tf.retrieval import ann, neighbours
from pnpp_tf.retrieval.shards import Shard

FORMAT = "pnpp_tf catalogue index"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SEARCH_BACKENDS = ("auto", "exact", "hnsw", "ivfpq")
# Queries scored together by an exact search: 256 x 65,536 rows of scores is 64 MB.
_QUERY_BLOCK = 256
_EXACT_SCORES = 1 << 24
# Shortlisted rows gathered at a time to be re-scored: 2**24 floats is 64 MB (e.g. 109 queries x
# 300 candidates x 512).
_RESCORE_FLOATS = 1 << 24
# Rows decoded at a time from float16/int8 by an exact search: 16,384 x 512 floats is 32 MB.
_DECODE_BLOCK = 1 << 14


def is_catalogue(path):
    """True if `path` is a catalogue directory (it holds a manifest)."""
    return bool(path) and os.path.isfile(os.path.join(path, MANIFEST))


@dataclasses.dataclass
class Catalogue:
    """An opened catalogue index (see the module).

    Attributes:
        directory: the catalogue's directory.
        manifest: the parsed manifest.json (`read_manifest`).
        shards: the opened `Shard`s, in manifest order.
        damaged: [(shard name, why)] of the shards that could not be opened; the rest are
            searched, and their items numbered as if the damaged ones were empty.
        search_settings: approximate search settings (`ann.SEARCH_SETTINGS`) that replace the
            ones the catalogue was built with; a setting of 0 or None keeps the built one.
    """

    directory: str
    manifest: dict
    shards: list
    damaged: list
    search_settings: dict = dataclasses.field(default_factory=dict)
    _structures: dict = dataclasses.field(default_factory=dict, init=False, repr=False)
    _pool: typing.Any = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self):
        self._offsets = np.concatenate([[0], np.cumsum([len(shard) for shard in self.shards])]).astype(np.int64)

    @classmethod
    def open(cls, directory, flag="--index", search_settings=None):
        """Opens the catalogue at `directory`, each shard memory-mapped.

        A damaged shard is logged and left out (`damaged`); if every shard is damaged, the
        catalogue cannot be searched.

        Args:
            directory: the catalogue's directory.
            flag: how messages name it.
            search_settings: optional {"expansion_search": int, "probes": int}, search-time
                settings of the approximate backends (`ann.AnnParams`) to use instead of the
                built ones (a structure need not be rebuilt for them); 0 or None keeps one.

        Raises:
            UserError: not a catalogue, a newer format, no shard could be opened, or a bad
                search setting.
        """
        manifest = read_manifest(directory, flag)
        shards, damaged = [], []
        for entry in manifest["shards"]:
            try:
                shards.append(Shard.open(os.path.join(directory, entry["name"])))
            except UserError as error:
                logging.warning("%s; searching the other shards.", error)
                damaged.append((entry["name"], str(error)))
        if manifest["shards"] and not shards:
            raise UserError(f"{flag}={directory}: every shard is damaged, e.g. {damaged[0][1]}")
        return cls(directory, manifest, shards, damaged, ann.search_settings(search_settings))

    def __len__(self):
        return int(self._offsets[-1])

    @property
    def root(self):
        """The folder the items' relative paths start from."""
        return self.manifest["images_root"]

    @property
    def offsets(self):
        """int64 [S + 1]: shard s holds items offsets[s]:offsets[s + 1]."""
        return self._offsets

    def locate(self, item):
        """(shard, row) of item number `item`."""
        if not 0 <= item < len(self):
            raise IndexError(f"item {item} is not in a catalogue of {len(self)} items")
        shard = int(np.searchsorted(self.offsets, item, side="right")) - 1
        return self.shards[shard], int(item - self.offsets[shard])

    def relative_path(self, item):
        """Item `item`'s path relative to `root`."""
        shard, row = self.locate(item)
        return shard.relative_path(row)

    def path(self, item):
        """Item `item`'s file."""
        return os.path.join(self.root, self.relative_path(item))

    def relative_paths(self):
        """Every item's relative path, in item order."""
        return [path for shard in self.shards for path in shard.relative_paths()]

    def unit_rows(self):
        """float32 [N, D]: every item's stored row decoded to unit length, in item order.

        The whole collection in memory: for the exact in-graph gallery of an export, or tests.
        """
        if not self.shards:
            return np.zeros((0, self.manifest["embedding_dim"]), np.float32)
        return np.concatenate([shard.unit_rows() for shard in self.shards])

    def search(self, queries, k=10, backend="auto", rescore=None):
        """The `k` nearest items of each query (see the module for the order).

        Args:
            queries: float [Q, D] embeddings (or one [D]); L2-normalised here.
            k: neighbours per query, 1 to `len(self)`.
            backend: one of `SEARCH_BACKENDS`; "auto" is the catalogue's approximate backend if
                it was built with one, "exact" otherwise.
            rescore: for an approximate backend, how many candidates of each query, the best
                by the structures' own scores over all shards, are re-scored exactly; None:
                `ann.rescore_depth(k, backend)`.

        Returns:
            (cosine distances float32 [Q, k], int64 item numbers [Q, k], the backend used). An
            approximate backend whose shortlists held fewer than k items pads with item -1 at
            distance inf.

        Raises:
            UserError: a bad k or backend, a backend the catalogue has no structure for, or
                queries of another width.
        """
        used = self.resolve_backend(backend)
        queries = neighbours.unit_rows(np.atleast_2d(np.asarray(queries, np.float32)), "query embeddings")
        dim = self.manifest["embedding_dim"]
        if queries.shape[1] != dim:
            raise UserError(f"The queries are {queries.shape[1]}-d embeddings but the catalogue {self.directory} "
                            f"holds {dim}-d ones: was it built with another model?")
        if not 1 <= int(k) <= len(self):
            raise UserError(f"--k={k} must be between 1 and the {len(self)} items of {self.directory}.")
        k = int(k)
        if rescore is not None and int(rescore) < k:
            raise UserError(f"--rescore={rescore} must be at least --k={k}.")
        if used == "exact":
            lists = [exact_shard(shard, queries, min(k, len(shard))) for shard in self.shards]
            scores, items = self._in_items(lists)
        else:
            depth = ann.rescore_depth(k, used) if rescore is None else int(rescore)
            items = self._shortlist(queries, used, depth)
            scores = self._rescore(queries, items)
        scores, items = merge_lists(scores, items, k)
        return np.maximum(1.0 - scores, 0.0).astype(np.float32), items, used

    def resolve_backend(self, backend):
        """"exact", or the approximate backend `backend` names, checked against the catalogue."""
        if backend not in SEARCH_BACKENDS:
            raise UserError(f"--backend={backend!r} is not one of {', '.join(SEARCH_BACKENDS)} for a catalogue index.")
        built = (self.manifest.get("approximate") or {}).get("backend")
        if backend == "auto":
            return built or "exact"
        if backend != "exact" and backend != built:
            raise UserError(f"--backend={backend}: the catalogue {self.directory} was built "
                            f"{'with ' + built if built else 'without an approximate structure'}; "
                            f"index it again with python -m pnpp_tf.index --backend={backend}.")
        return backend

    def _in_items(self, lists):
        """Per-shard (scores [Q, c_s], local rows [Q, c_s]) as (scores, item numbers) side by side."""
        scores = np.concatenate([scores for scores, _ in lists], axis=1)
        items = np.concatenate([np.where(rows >= 0, rows + offset, -1)
                                for (_, rows), offset in zip(lists, self._offsets)], axis=1)
        return scores, items

    def _shortlist(self, queries, backend, depth):
        """int64 [Q, <=depth]: each query's `depth` best items over all shards by the structures'
        own scores (comparable across the shards of one catalogue), -1 where there are fewer.

        One shortlist per query rather than one per shard: with 16 shards, 16 times fewer rows
        are re-scored for the same depth.
        """
        assigned = self._assign(queries, backend)

        def search(shard):
            structure = self._structure(shard, backend)
            found, scores = structure.candidates(queries, min(depth, len(shard)), with_scores=True,
                                                 assigned=assigned.get(structure.quantizer_key))
            return scores, found

        scores, items = self._in_items(self._each_shard(search, parallel=len(queries) < ann.threads()))
        if scores.shape[1] > depth:
            best = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
            items = np.take_along_axis(items, best, axis=1)
        return items

    def _rescore(self, queries, items):
        """float32 [Q, C]: each query's exact similarity to each of its `items` (-inf for -1)."""
        scores = np.full(items.shape, -np.inf, np.float32)
        shard_of = np.searchsorted(self._offsets, items, side="right") - 1
        # In blocks of queries: a block's gathered rows are [queries, candidates, D] floats.
        per_block = max(1, _RESCORE_FLOATS // max(1, items.shape[1] * queries.shape[1]))
        for start in range(0, len(queries), per_block):
            block, owner = items[start:start + per_block], shard_of[start:start + per_block]
            rows = np.zeros((*block.shape, queries.shape[1]), np.float32)
            for number in np.unique(owner[block >= 0]):
                held = (owner == number) & (block >= 0)
                # Each row decoded once however many queries shortlist it.
                unique, inverse = np.unique(block[held] - self._offsets[number], return_inverse=True)
                rows[held] = self.shards[number].unit_rows(unique)[inverse]
            found = np.einsum("qcd,qd->qc", rows, queries[start:start + len(block)])
            scores[start:start + len(block)] = np.where(block >= 0, found, -np.inf)
        return scores

    def _assign(self, queries, backend):
        """{quantizer key: the queries' IVF lists}: one assignment for all shards sharing a quantiser."""
        assigned = {}
        if backend == "ivfpq":
            for shard in self.shards:
                structure = self._structure(shard, backend)
                key = structure.quantizer_key
                if key and key not in assigned:
                    assigned[key] = structure.assign(queries)
        return assigned

    def _each_shard(self, search, parallel):
        """[search(shard) for each shard], on `ann.threads()` threads if `parallel`.

        The approximate libraries share out queries among their threads: for fewer queries than
        threads, the shards are searched side by side instead (faiss, usearch and numpy's
        products release the GIL). Exact search is left to the BLAS's own threads.
        """
        workers = min(ann.threads(), len(self.shards))
        if not parallel or workers < 2:
            return [search(shard) for shard in self.shards]
        if self._pool is None or self._pool[0] != workers:
            # Kept for the catalogue's life: starting threads for every query would cost more
            # than a small shard's search. Its threads are idle between searches and end with it.
            self._pool = (workers, concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="catalogue"))
        return list(self._pool[1].map(search, self.shards))

    def read_into_memory(self, backend="auto"):
        """Reads every shard's rows, and its structure for `backend`, into memory.

        For a process that would rather hold the catalogue in its own memory than in the page
        cache (which the kernel may evict under pressure); searches return the same lists.
        """
        used = self.resolve_backend(backend)
        for shard in self.shards:
            shard.read_into_memory()
            if used != "exact":
                self._structures[shard.directory] = self._load_structure(shard, used, mmap=False)

    def _structure(self, shard, backend):
        """The shard's approximate structure, loaded (memory-mapped) once per opened catalogue."""
        if shard.directory not in self._structures:
            self._structures[shard.directory] = self._load_structure(shard, backend, mmap=True)
        return self._structures[shard.directory]

    def _load_structure(self, shard, backend, mmap):
        params = ann.AnnParams.from_json({**self.manifest["approximate"]["params"], **self.search_settings})
        return ann.Structure.load(backend, shard.structure_path(backend), mmap=mmap, params=params)


def exact_shard(shard, queries, k):
    """The `k` best rows of `shard` for each query, every row scored, in the one order.

    Args:
        shard: a `Shard`.
        queries: float32 [Q, D] unit rows.
        k: how many to keep, 1 to len(shard).

    Returns:
        (float32 similarities [Q, k], int64 rows [Q, k]).

    Memory: one block of at most 2**24 scores, and for float16/int8 one decoded block of rows;
    float32 rows are multiplied straight from the mapped file.
    """
    results = []
    for start in range(0, len(queries), _QUERY_BLOCK):
        block = queries[start:start + _QUERY_BLOCK]
        rows_per_block = max(k, _EXACT_SCORES // len(block))
        if shard.dtype != "float32":
            rows_per_block = max(k, min(rows_per_block, _DECODE_BLOCK))
        best = None
        for first in range(0, len(shard), rows_per_block):
            scores = block @ shard.unit_block(first, first + rows_per_block).T
            found = select_best(scores, min(k, scores.shape[1]))
            found = (found[0], found[1] + first)
            best = found if best is None else merge_lists(np.concatenate([best[0], found[0]], axis=1),
                                                          np.concatenate([best[1], found[1]], axis=1), k)
        results.append(best)
    return np.concatenate([scores for scores, _ in results]), np.concatenate([rows for _, rows in results])


def select_best(scores, k):
    """(values, int64 columns) of the `k` best of each row of `scores`, by (score desc, column asc).

    `np.argpartition` keeps some k best, but of columns tied with the k-th score it may keep a
    higher one than the rule does; those rows (rare: a tie across the cut) are chosen again
    from every column reaching the k-th score.
    """
    if k >= scores.shape[1]:
        picked = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    else:
        picked = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        values = np.take_along_axis(scores, picked, axis=1)
        kth = values.min(axis=1, keepdims=True)
        cut_tie = (scores == kth).sum(axis=1) > (values == kth).sum(axis=1)
        for row in np.flatnonzero(cut_tie):
            reaching = np.flatnonzero(scores[row] >= kth[row, 0])
            picked[row] = reaching[np.lexsort((reaching, -scores[row, reaching]))[:k]]
    picked = np.asarray(picked, np.int64)
    return merge_lists(np.take_along_axis(scores, picked, axis=1), picked, k)


def merge_lists(scores, items, k):
    """The `k` best of each row of (scores, items) by (score desc, item asc); padding (-inf) last."""
    order = np.lexsort((items, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(items, order, axis=1)


def read_manifest(directory, flag="--index"):
    """The manifest of the catalogue at `directory`, checked.

    Raises:
        UserError: not a catalogue index, or one of a newer format.
    """
    if not directory or not os.path.isdir(directory):
        raise UserError(f"{flag}={directory} is not a catalogue index directory; build one with "
                        "python -m pnpp_tf.index.")
    if not is_catalogue(directory):
        raise UserError(f"{flag}={directory} holds no {MANIFEST}: it is not a catalogue index (or its first "
                        "shard was never finished); build it with python -m pnpp_tf.index.")
    manifest = read_json_object(os.path.join(directory, MANIFEST), "catalogue manifest")
    if manifest.get("format") != FORMAT:
        raise UserError(f"{flag}={directory}: {MANIFEST} is not a pnpp_tf catalogue manifest.")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise UserError(f"{flag}={directory} was written by a newer pnpp_tf (format "
                        f"{manifest['format_version']}, this one reads {FORMAT_VERSION}); upgrade pnpp_tf.")
    return manifest
