"""Finds the indexed images nearest to query images.

    python -m pnpp_tf.search --index=pictures.index --query=photo.jpg --k=10 --grid=neighbours.png
    python -m pnpp_tf.search --index=pictures.index --query=queries/ --output=answers.jsonl

Embeds the queries with the model the index was built with (or --model) and lists the k nearest
indexed images, nearest first, with their cosine distance (1 - cosine similarity: 0 is the same
direction, 2 the opposite). One query image prints a table (and --grid draws it). A folder of
images, or a text file listing one image path per line, is embedded --batch_size at a time and
answered as JSON lines, one per query in order, to --output or stdout:

    {"query": "/q/a.jpg", "neighbours": ["/p/x.jpg", ...], "distances": [0.02, ...], "items": [17, ...]}
    {"query": "/q/broken.jpg", "error": "Unknown image file format ..."}

--threshold=t also decides which neighbours are matches: those whose cosine similarity is at
least t, i.e. whose distance is at most 1 - t (a threshold `pnpp_tf.evaluate --calibrate` chose
on labelled data). The table gains a "match" column, each JSON line a "matches" list of booleans.

--backend=auto searches with the index's approximate structure when it was built with one
(pnpp_tf.index --backend=hnsw or ivfpq), re-scoring each shortlist exactly, and exactly otherwise.
"""

import json
import os
import sys
import time

import numpy as np
from absl import logging

from pnpp_tf import flags, plots
from pnpp_tf.artifacts import load_embedder
from pnpp_tf.catalogue_config import SearchConfig
from pnpp_tf.data.folder import IMAGE_EXTENSIONS
from pnpp_tf.errors import UserError
from pnpp_tf.retrieval.catalogue import Catalogue, is_catalogue
from pnpp_tf.retrieval.embed import find_images
from pnpp_tf.retrieval.search_index import DISTANCE, SearchIndex

# Queries embedded and searched together when answering many: bounds memory, whatever their number.
_QUERY_CHUNK = 4096
_HOW = {"exact": "exact", "faiss": "faiss IndexFlatIP, exact", "hnsw": "HNSW shortlists re-scored exactly",
        "ivfpq": "IVF-PQ shortlists re-scored exactly"}


class Searcher:
    """An index and the model that embeds its queries, opened once for any number of queries.

    Args:
        index_path: a catalogue directory, or an earlier single-file .npz index.
        model: the model to embed queries with; None: the one the index records.
        backend: as --backend.
        rescore: candidates re-scored per query (0: the catalogue's default).
        search_settings: a catalogue's approximate search settings, as `Catalogue.open` takes them.
    """

    def __init__(self, index_path, model=None, backend="auto", rescore=0, search_settings=None):
        self.index = open_index(index_path, search_settings)
        meta = self.index.manifest
        source = model or meta.get("model")
        if not model and not (source and os.path.exists(source)):
            raise UserError(f"The index was built with the model {source}, which no longer exists; "
                            "pass the same model with --model.")
        self.embedder = load_embedder(source)
        if model and os.path.abspath(self.embedder.source) != meta.get("model"):
            logging.warning("Embedding the queries with %s, but the index was built with %s: distances "
                            "mean something only if both are the same model.", self.embedder.source, meta.get("model"))
        if self.embedder.image_size != meta.get("image_size", self.embedder.image_size):
            raise UserError(f"--model takes {self.embedder.image_size} px images but the index was built "
                            f"with {meta['image_size']} px crops: it is another model.")
        self.backend = backend
        # Keyword arguments of every `index.search` call (a Catalogue's re-scoring; nothing for a
        # single-file index); the search service passes them too.
        self.search_options = {"rescore": rescore or None} if isinstance(self.index, Catalogue) else {}

    @classmethod
    def from_config(cls, config):
        """The searcher a `CatalogueSearchConfig` (of pnpp_tf.search or pnpp_tf.serve) describes."""
        if not config.index:
            raise UserError("--index is required.")
        return cls(os.path.expanduser(config.index), os.path.expanduser(config.model) if config.model else None,
                   config.backend, config.rescore, config.search_settings())

    def search(self, paths, k, batch_size=64):
        """Yields, for each query file in order, (path, distances [k], items [k], None) or
        (path, None, None, why it could not be read); the backend used is `self.used`."""
        if not 1 <= k <= len(self.index):
            raise UserError(f"--k={k} must be between 1 and the {len(self.index)} images of the index.")
        for start in range(0, len(paths), _QUERY_CHUNK):
            chunk = paths[start:start + _QUERY_CHUNK]
            found = self.embedder.embed_files(chunk, batch_size=batch_size, on_bad_image="skip", verbose=0)
            answers = {}
            if found.paths:
                distances, items, self.used = self.index.search(found.embeddings, k, backend=self.backend,
                                                                **self.search_options)
                answers = {path: (distances[row], items[row]) for row, path in enumerate(found.paths)}
            failed = dict(found.skipped)
            for path in chunk:
                if path in answers:
                    yield path, *answers[path], None
                else:
                    yield path, None, None, failed.get(path, "not embedded")


def open_index(path, search_settings=None):
    """A `Catalogue` (a directory, with `search_settings`) or an earlier `SearchIndex` (.npz file) at `path`."""
    if os.path.isdir(path) or is_catalogue(path):
        return Catalogue.open(path, search_settings=search_settings)
    return SearchIndex.load(path)


def query_files(query):
    """The query images `--query` names: one image, a folder's images, or a list file's lines.

    Returns:
        (paths, True if --query named one image).
    """
    if os.path.isdir(query):
        return find_images(query), False
    if not os.path.isfile(query):
        raise UserError(f"--query={query} is not a file or a folder.")
    if query.lower().endswith(IMAGE_EXTENSIONS):
        return [query], True
    try:
        with open(query, encoding="utf-8") as file:
            lines = [line.strip() for line in file]
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--query={query} is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a "
                        f"readable list of image paths ({error}).") from error
    paths = [os.path.expanduser(line) for line in lines if line and not line.startswith("#")]
    if not paths:
        raise UserError(f"--query={query} lists no image paths (one per line).")
    return paths, False


def run(config, out=None):
    """Answers the queries of `config` (a `SearchConfig`).

    For one query image returns (searcher, distances [k], items [k], backend); for many, writes
    their JSON lines to `out` (or --output) and returns (answered, unreadable, backend).
    """
    if not config.index or not config.query:
        raise UserError("--index and --query are both required.")
    paths, single = query_files(os.path.expanduser(config.query))
    if config.grid and not single:
        raise UserError("--grid draws one query: give --query an image, not a folder or a list.")
    searcher = Searcher.from_config(config)
    if single:
        path, distances, items, why = next(searcher.search(paths, config.k, config.batch_size))
        if why:
            raise UserError(f"cannot read --query={path}: {why}")
        return searcher, distances, items, searcher.used
    return _answer_many(searcher, paths, config, out)


def _answer_many(searcher, paths, config, out):
    answered = unreadable = 0
    target = out or (open(os.path.expanduser(config.output), "w", encoding="utf-8") if config.output else sys.stdout)
    try:
        for path, distances, items, why in searcher.search(paths, config.k, config.batch_size):
            if why:
                line = {"query": path, "error": why}
                unreadable += 1
            else:
                line = {"query": path, "neighbours": [searcher.index.path(i) for i in items],
                        "distances": [round(float(d), 6) for d in distances], "items": [int(i) for i in items]}
                if config.threshold is not None:
                    line["matches"] = [bool(match) for match in is_match(distances, config.threshold)]
                answered += 1
            target.write(json.dumps(line) + "\n")
    except OSError as error:
        raise UserError(f"cannot write --output={config.output}: {error}") from error
    finally:
        if target not in (out, sys.stdout):
            target.close()
    return answered, unreadable, getattr(searcher, "used", None)


def is_match(distances, threshold):
    """Whether each neighbour at these distances (1 - cosine) is a match at a cosine `threshold`,
    decided on the distance as printed."""
    return np.asarray(distances, np.float64) <= 1.0 - threshold


def main(config):
    start = time.perf_counter()
    result = run(config)
    if len(result) == 3:
        answered, unreadable, backend = result
        print(f"Answered {answered} queries ({unreadable} could not be read) in {time.perf_counter() - start:.1f} s, "
              f"{_HOW.get(backend, backend)} search{'; JSON lines in ' + config.output if config.output else ''}.",
              file=sys.stderr)
        return
    searcher, distances, items, backend = result
    query = os.path.abspath(os.path.expanduser(config.query))
    neighbours = [searcher.index.path(i) for i in items]
    if config.grid:
        try:
            plots.save_search_grid(query, neighbours, distances, os.path.expanduser(config.grid))
        except OSError as error:
            raise UserError(f"cannot write --grid={config.grid}: {error}") from error
    print(f"Query: {query}")
    print(f"The {len(items)} nearest of {len(searcher.index)} indexed images ({_HOW.get(backend, backend)} "
          f"search); distance = {DISTANCE}:")
    decided = config.threshold is not None
    if decided:
        print(f"A match: cosine similarity at least {config.threshold:g} (distance at most {1 - config.threshold:g}).")
    print(f"{'rank':>4}  {'distance':>8}  " + ("match  " if decided else "") + "image")
    matches = is_match(distances, config.threshold) if decided else [None] * len(items)
    for rank, (distance, match, path) in enumerate(zip(distances, matches, neighbours), start=1):
        print(f"{rank:>4}  {distance:8.4f}  " + (f"{'yes' if match else 'no':<5}  " if decided else "") + path)
    if config.grid:
        print(f"Grid of the query and its neighbours: {config.grid}")


if __name__ == "__main__":
    flags.run(main, SearchConfig, "pnpp_tf.search")
