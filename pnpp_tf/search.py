"""Finds the images of an index nearest to a query image.

    python -m pnpp_tf.search --index=pictures.npz --query=photo.jpg --k=10 --grid=neighbours.png

Embeds the query with the model the index was built with (or --model) and prints the k nearest
indexed images, nearest first, with their cosine distance (1 - cosine similarity: 0 is the same
direction, 2 the opposite). The search is exact; above 100,000 indexed images it runs on faiss
(IndexFlatIP, still exact) when faiss is installed. --grid draws the query and its neighbours.
"""

import os

from absl import logging

from pnpp_tf import flags, plots
from pnpp_tf.config import SearchConfig
from pnpp_tf.errors import UserError
from pnpp_tf.artifacts import load_embedder
from pnpp_tf.retrieval.search_index import DISTANCE, SearchIndex



def run(index_path, query, k=10, model=None, backend="auto"):
    """Searches; returns (index, cosine distances [k], indices [k], backend, note)."""
    if not index_path or not query:
        raise UserError("--index and --query are both required.")
    if k < 1:
        raise UserError(f"--k must be at least 1, got {k}.")
    index_path, query = os.path.expanduser(index_path), os.path.expanduser(query)
    model = os.path.expanduser(model) if model else None
    if not os.path.isfile(query):
        raise UserError(f"--query={query} is not a file.")
    index = SearchIndex.load(index_path)
    meta = index.metadata
    source = model or meta.get("model")
    if not model and not (source and os.path.exists(source)):
        raise UserError(f"The index was built with the model {source}, which no longer exists; "
                         "pass the same model with --model.")
    embedder = load_embedder(source)
    if model and os.path.abspath(embedder.source) != meta.get("model"):
        logging.warning("Embedding the query with %s, but the index was built with %s: distances "
                        "mean something only if both are the same model.", embedder.source,
                        meta.get("model"))
    if embedder.image_size != meta.get("image_size", embedder.image_size):
        raise UserError(f"--model takes {embedder.image_size} px images but the index was built "
                         f"with {meta['image_size']} px crops: it is another model.")
    found = embedder.embed_files([query], on_bad_image="skip")
    if found.skipped:
        raise UserError(f"cannot read --query={query}: {found.skipped[0][1]}")
    note = ""
    if k > len(index):
        note = f" (asked for {k}; the index holds {len(index)})"
        k = len(index)
    distances, indices, used = index.search(found.embeddings, k, backend=backend)
    return index, distances[0], indices[0], used, note


def main(config):
    query = os.path.expanduser(config.query) if config.query else None
    grid = os.path.expanduser(config.grid) if config.grid else None
    index, distances, indices, backend, note = run(config.index, query, config.k, config.model, config.backend)
    neighbours = [index.paths[i] for i in indices]
    if grid:
        try:
            plots.save_search_grid(query, neighbours, distances, grid)
        except OSError as error:
            raise UserError(f"cannot write --grid={config.grid}: {error}") from error
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
    flags.run(main, SearchConfig, "pnpp_tf.search")
