"""Finds the images of an index nearest to a query image.

    python -m pnpp_tf.search --index=pictures.npz --query=photo.jpg --k=10 --grid=neighbours.png

Embeds the query with the model the index was built with (or --model) and prints the k nearest
indexed images, nearest first, with their cosine distance (1 - cosine similarity: 0 is the same
direction, 2 the opposite). The search is exact; above 100,000 indexed images it runs on faiss
(IndexFlatIP, still exact) when faiss is installed. --grid draws the query and its neighbours.
"""

import os
import sys

from absl import app, flags, logging

from pnpp_tf import plots
from pnpp_tf.indexing.embeddings import embed_paths
from pnpp_tf.indexing.neighbours import BACKENDS, DISTANCE
from pnpp_tf.indexing.saved_embedder import load_embedder
from pnpp_tf.indexing.search_index import SearchIndex

FLAGS = flags.FLAGS


def define_flags():
    """Defines the command line's flags (only when run as a program: importing defines none)."""
    flags.DEFINE_string("index", None, "An index written by python -m pnpp_tf.index.")
    flags.DEFINE_string("query", None, "The query image.")
    flags.DEFINE_integer("k", 10, "How many neighbours to list.")
    flags.DEFINE_string("grid", None, "Optional PNG: the query and its neighbours.")
    flags.DEFINE_string("model", None, "The model to embed the query with (default: the one the "
                        "index was built with; it must be the same model).")
    flags.DEFINE_enum("backend", "auto", BACKENDS,
                      "auto: exact numpy search, faiss above 100,000 images if installed.")


def run(index_path, query, k=10, model=None, backend="auto"):
    """Searches; returns (index, cosine distances [k], indices [k], backend, note)."""
    if not index_path or not query:
        raise ValueError("--index and --query are both required.")
    if k < 1:
        raise ValueError(f"--k must be at least 1, got {k}.")
    index_path, query = os.path.expanduser(index_path), os.path.expanduser(query)
    model = os.path.expanduser(model) if model else None
    if not os.path.isfile(query):
        raise ValueError(f"--query={query} is not a file.")
    index = SearchIndex.load(index_path)
    meta = index.metadata
    source = model or meta.get("model")
    if not model and not (source and os.path.exists(source)):
        raise ValueError(f"The index was built with the model {source}, which no longer exists; "
                         "pass the same model with --model.")
    embedder = load_embedder(source)
    if model and os.path.abspath(embedder.source) != meta.get("model"):
        logging.warning("Embedding the query with %s, but the index was built with %s: distances "
                        "mean something only if both are the same model.", embedder.source,
                        meta.get("model"))
    if embedder.image_size != meta.get("image_size", embedder.image_size):
        raise ValueError(f"--model takes {embedder.image_size} px images but the index was built "
                         f"with {meta['image_size']} px crops: it is another model.")
    embedding, _, skipped = embed_paths(embedder, [query], verbose=0)
    if skipped:
        raise ValueError(f"cannot read --query={query}: {skipped[0][1]}")
    note = ""
    if k > len(index):
        note = f" (asked for {k}; the index holds {len(index)})"
        k = len(index)
    distances, indices, used = index.search(embedding, k, backend=backend)
    return index, distances[0], indices[0], used, note


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    query = os.path.expanduser(FLAGS.query) if FLAGS.query else None
    grid = os.path.expanduser(FLAGS.grid) if FLAGS.grid else None
    try:
        index, distances, indices, backend, note = run(
            FLAGS.index, query, FLAGS.k, FLAGS.model, FLAGS.backend)
        neighbours = [index.paths[i] for i in indices]
        if grid:
            try:
                plots.save_search_grid(query, neighbours, distances, grid)
            except OSError as error:
                raise ValueError(f"cannot write --grid={FLAGS.grid}: {error}") from None
    except ValueError as error:
        print(f"pnpp_tf.search: error: {error}", file=sys.stderr)
        sys.exit(2)
    how = "faiss IndexFlatIP, exact" if backend == "faiss" else "exact"
    print(f"Query: {os.path.abspath(query)}")
    print(f"The {len(indices)} nearest of {len(index)} indexed images{note} ({how} search); "
          f"distance = {DISTANCE}:")
    print(f"{'rank':>4}  {'distance':>8}  image")
    for rank, (distance, path) in enumerate(zip(distances, neighbours), start=1):
        print(f"{rank:>4}  {distance:8.4f}  {path}")
    if grid:
        print(f"Grid of the query and its neighbours: {grid}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
