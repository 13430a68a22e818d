"""Which queries of a labelled index fail worst: every item (at most `max_queries`) searched
against the rest, leave-one-out, with the index's own stored embeddings (nothing re-embedded).

The class of an item is its parent folder's name, as the folder dataset labels it. A query's
first positive rank is how many other items rank ahead of its first same-class item, in the exact
engine's order (cosine similarity descending, ties by ascending item number): 0 is a hit at
Recall@1. Computed once, on first use, in blocks of queries against the index shard by shard.
"""

import os
import threading

import numpy as np

from pnpp_tf.retrieval import neighbours

DEFAULT_MAX_QUERIES = 5000
_QUERY_BLOCK = 256


def item_class(relative_path):
    """The class of an item: the name of the folder holding it ("" for a file at the root)."""
    return os.path.basename(os.path.dirname(relative_path))


class Failures:
    """The leave-one-out failures of `index` (a `Catalogue` or `SearchIndex`), computed lazily."""

    def __init__(self, index, max_queries=DEFAULT_MAX_QUERIES):
        self.index = index
        self.max_queries = max_queries
        root = index.manifest.get("images_root") or "/"
        paths = (index.relative_paths() if hasattr(index, "relative_paths")
                 else [os.path.relpath(path, root) for path in index.paths])
        names = [item_class(path) for path in paths]
        self.class_names, codes = np.unique(np.asarray(names, dtype=object).astype(str), return_inverse=True)
        self.labels = codes.astype(np.int64)
        counts = np.bincount(self.labels) if len(self.labels) else np.zeros(0, np.int64)
        self.labelled = bool(names and all(names) and len(self.class_names) >= 2 and counts.max() >= 2)
        self.num_classes = len(self.class_names) if self.labelled else 0
        self._lock = threading.Lock()
        self._ranks = None

    def queries(self):
        """The items searched: all, or `max_queries` evenly spaced ones."""
        n = len(self.index)
        if n <= self.max_queries:
            return np.arange(n, dtype=np.int64)
        return np.unique(np.linspace(0, n - 1, self.max_queries).round().astype(np.int64))

    def gallery_blocks(self):
        """(first item, float32 unit rows) of the whole index, in item order."""
        if hasattr(self.index, "shards"):
            for shard, offset in zip(self.index.shards, self.index.offsets):
                yield int(offset), shard.unit_rows()
        else:
            yield 0, neighbours.unit_rows(np.asarray(self.index.embeddings, np.float32), "index embeddings")

    def rows(self, items):
        """float32 unit rows of `items`."""
        if hasattr(self.index, "shards"):
            return np.stack([shard.unit_rows(np.asarray([row]))[0]
                             for shard, row in (self.index.locate(int(i)) for i in items)])
        return neighbours.unit_rows(np.asarray(self.index.embeddings[items], np.float32), "index embeddings")

    def ranks(self):
        """(query items int64 [Q], first positive ranks int64 [Q]; -1: the class has no other item)."""
        with self._lock:
            if self._ranks is None:
                queries = self.queries()
                ranks = np.concatenate([self._block_ranks(queries[start:start + _QUERY_BLOCK])
                                        for start in range(0, len(queries), _QUERY_BLOCK)] or [np.zeros(0, np.int64)])
                self._ranks = queries, ranks
            return self._ranks

    def _block_ranks(self, items):
        rows, labels = self.rows(items), self.labels[items]
        best = np.full(len(items), -np.inf, np.float32)
        best_item = np.full(len(items), np.iinfo(np.int64).max, np.int64)
        for offset, gallery in self.gallery_blocks():  # the best positive: highest score, then lowest item
            sims, ids, positive = self._scores(rows, items, labels, offset, gallery)
            sims = np.where(positive, sims, -np.inf)
            column = np.argmax(sims, axis=1)
            score = sims[np.arange(len(items)), column]
            better = score > best
            best, best_item = np.where(better, score, best), np.where(better, ids[column], best_item)
        ahead = np.zeros(len(items), np.int64)
        for offset, gallery in self.gallery_blocks():  # the negatives ranked ahead of it
            sims, ids, positive = self._scores(rows, items, labels, offset, gallery)
            before = (sims > best[:, None]) | ((sims == best[:, None]) & (ids[None, :] < best_item[:, None]))
            ahead += np.sum(before & ~positive & np.isfinite(sims), axis=1)
        return np.where(np.isfinite(best), ahead, -1)

    def _scores(self, rows, items, labels, offset, gallery):
        ids = np.arange(offset, offset + len(gallery), dtype=np.int64)
        sims = rows @ gallery.T
        sims[ids[None, :] == items[:, None]] = -np.inf  # leave the query out
        return sims, ids, self.labels[ids][None, :] == labels[:, None]

    def report(self, limit, shown, relative):
        """The JSON answer of /api/failures: the `limit` worst queries, each with its `shown`
        nearest other items (hit: same class), per-class and overall Recall@1."""
        queries, ranks = self.ranks()
        counted = ranks >= 0
        hits = ranks == 0
        classes = []
        for code in np.unique(self.labels[queries[counted]]):
            mine = counted & (self.labels[queries] == code)
            classes.append({"class": str(self.class_names[code]), "queries": int(mine.sum()),
                            "recall_at_1": round(float(hits[mine].mean()), 6)})
        classes.sort(key=lambda entry: (entry["recall_at_1"], entry["class"]))
        order = [i for i in np.lexsort((queries, -ranks)) if counted[i]][:limit]
        worst = queries[order]
        found = []
        if len(worst):
            _, items, _ = self.index.search(self.rows(worst), min(shown + 1, len(self.index)), backend="exact")
            found = [[int(i) for i in row if i >= 0 and i != query][:shown] for query, row in zip(worst, items)]
        failures = []
        for position, query, listed in zip(order, worst, found):
            mine = self.labels[query]
            scores = self.rows(listed) @ self.rows([query])[0] if listed else []
            failures.append({
                "item": int(query), "path": relative(int(query)), "class": str(self.class_names[mine]),
                "first_positive_rank": int(ranks[position]), "url": f"/image/{int(query)}",
                "neighbours": [{"rank": rank, "item": item, "path": relative(item), "url": f"/image/{item}",
                                "class": str(self.class_names[self.labels[item]]),
                                "hit": bool(self.labels[item] == mine), "distance": round(float(1 - score), 6)}
                               for rank, (item, score) in enumerate(zip(listed, scores), start=1)]})
        return {"queries": int(counted.sum()), "of": len(self.index), "sampled": len(queries) < len(self.index),
                "without_positive": int((~counted).sum()),
                "recall_at_1": round(float(hits[counted].mean()), 6) if counted.any() else None,
                "classes": classes, "failures": failures}
