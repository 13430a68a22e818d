"""A search index: the embeddings of a collection of images, built, saved, loaded and searched.

    from pnpp_tf.artifacts import load_embedder
    from pnpp_tf.retrieval.embed import find_images
    from pnpp_tf.retrieval.search_index import SearchIndex, build_index

    embedder = load_embedder("runs/demo")     # a model_dir, or an exported SavedModel
    index = build_index(embedder, find_images("photos/"), "photos/")   # skips unreadable files
    index.save("photos.npz")
    index = SearchIndex.load("photos.npz")
    query = embedder.embed_files(["query.jpg"]).embeddings
    distances, neighbours, backend = index.search(query, k=10)

Embeddings are L2-normalised, so cosine similarity is their dot product; distances are reported
as cosine distances (`DISTANCE`), 1 - cos: 0 for the same direction,
2 for opposite ones. A `SearchIndex` is one .npz archive (embeddings, paths and JSON metadata) on a
local disk, written whole or not at all (`pnpp_tf.io_utils.replacing`): an in-memory index for
tools and for the indexes of pnpp_tf before the catalogue (`pnpp_tf.retrieval.catalogue`, what
`pnpp_tf.index` now writes), which `pnpp_tf.search` still reads.
"""

import dataclasses
import json
import os
import time
import zipfile

import numpy as np

from pnpp_tf.data.image_header import DEFAULT_MAX_PIXELS
from pnpp_tf.errors import UserError
from pnpp_tf.io_utils import replacing
from pnpp_tf.retrieval import neighbours

INDEX_FORMAT_VERSION = 1
# Above this many indexed images "auto" searches with faiss IndexFlatIP, when it is installed.
FAISS_MIN_IMAGES = neighbours.FAISS_MIN_GALLERY
DISTANCE = "cosine distance (1 - cosine similarity; 0 = same direction, 2 = opposite)"


@dataclasses.dataclass
class SearchIndex:
    """Embeddings of a collection of images and where they came from.

    Attributes:
        embeddings: float32 [N, D], unit rows.
        paths: the N image paths (absolute when built by `build_index`).
        metadata: a JSON-serialisable dict: "model" (source), "model_kind", "image_size",
            "embedding_dim", "images_root", "num_images", "num_skipped", "skipped" (a list of
            [path, reason]), "created", "distance" and "format_version".
    """

    embeddings: np.ndarray
    paths: list
    metadata: dict

    def __len__(self):
        return len(self.paths)

    @property
    def manifest(self):
        """The metadata, by the name a catalogue (`pnpp_tf.retrieval.catalogue`) gives its own."""
        return self.metadata

    def path(self, item):
        """Image `item`'s path, as a catalogue's `path`."""
        return self.paths[item]

    def save(self, path):
        """Writes the index to `path` (an .npz archive) whole or not at all.

        Raises:
            OutOfSpaceError: the disk filled up; an earlier file at `path` is left as it was.
        """
        arrays = {
            "embeddings": np.asarray(self.embeddings, np.float32),
            "paths": np.asarray(self.paths, dtype=np.str_),
            "metadata": np.asarray(json.dumps(self.metadata, sort_keys=True)),
        }
        needed = sum(array.nbytes for array in arrays.values())
        # A local file object: numpy then appends no ".npz" to the name, and zipfile can seek.
        with replacing(path, needed) as partial, open(partial, "wb") as file:
            np.savez(file, **arrays)

    @classmethod
    def load(cls, path):
        """Reads an index written by `save`.

        Raises:
            UserError: if the file is missing or is not such an index.
        """
        if not path or not os.path.isfile(path):
            raise UserError(f"--index={path} does not exist; build it with "
                             "python -m pnpp_tf.index.")
        try:
            with np.load(path, allow_pickle=False) as archive:
                embeddings = archive["embeddings"].astype(np.float32)
                paths = [str(p) for p in archive["paths"]]
                metadata = json.loads(str(archive["metadata"]))
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as error:
            # A cut-short archive is a BadZipFile, which is none of the others.
            raise UserError(f"--index={path} is not an index written by pnpp_tf.index "
                             f"({type(error).__name__}: {error}); if it was cut short, build it "
                             "again with python -m pnpp_tf.index.") from error
        if not isinstance(metadata, dict):
            raise UserError(f"--index={path} is not an index written by pnpp_tf.index (its "
                             f"metadata is a JSON {type(metadata).__name__}, not an object).")
        if embeddings.ndim != 2 or len(embeddings) != len(paths):
            raise UserError(f"--index={path} is inconsistent: embeddings {embeddings.shape}, "
                             f"{len(paths)} paths.")
        return cls(embeddings, paths, metadata)

    def search(self, queries, k=10, exclude=None, backend="auto"):
        """The `k` nearest indexed images of each query: see `neighbours.nearest`.

        Nearest first, ties by ascending index: the neighbours Recall@K counts for the same
        embeddings.

        Args:
            queries: float [Q, D] embeddings (or one [D]).
            k: neighbours per query, at most the number of indexed images.
            exclude: optional int [Q], an indexed image to leave out for each query (-1: none).
            backend: "auto", "exact" or "faiss" (`neighbours.BACKENDS`).

        Returns:
            (cosine distances [Q, k], indices [Q, k], the backend used).
        """
        similarities, indices, used = cosine_neighbours(queries, self.embeddings, k, exclude, backend)
        return cosine_distance(similarities), indices, used


def build_index(embedder, paths, images_root=None, batch_size=64, verbose=1, max_pixels=DEFAULT_MAX_PIXELS):
    """Embeds `paths` with an `Embedder` (`Embedder.embed_files`, skipping unreadable files and
    those over `max_pixels`) into a `SearchIndex`.

    Raises:
        UserError: if no image could be read.
    """
    found = embedder.embed_files(paths, batch_size=batch_size, max_pixels=max_pixels, on_bad_image="skip",
                                 verbose=verbose)
    embeddings, kept, skipped, embed_seconds = found.embeddings, found.paths, found.skipped, found.seconds
    if not kept:
        raise UserError(f"None of the {len(paths)} images could be read, e.g. "
                         f"{skipped[0][0]} ({skipped[0][1]}).")
    metadata = {
        "format_version": INDEX_FORMAT_VERSION,
        "model": embedder.source,
        "model_kind": embedder.kind,
        "image_size": embedder.image_size,
        "embedding_dim": int(embeddings.shape[1]),
        "images_root": os.path.abspath(images_root) if images_root else None,
        "num_images": len(kept),
        "num_skipped": len(skipped),
        "skipped": [list(item) for item in skipped],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # Reading, decoding and embedding: the images of the folder per second.
        "embed_seconds": embed_seconds,
        "images_per_second": len(kept) / max(embed_seconds, 1e-9),
        "distance": "cosine",
    }
    return SearchIndex(embeddings, kept, metadata)


def cosine_distance(similarities):
    """The `DISTANCE` of cosine similarities: 1 - similarity, never below 0."""
    return np.maximum(1.0 - similarities, 0.0)


def cosine_neighbours(queries, gallery, k=10, exclude=None, backend="auto"):
    """The `k` most cosine-similar gallery rows of each query: search's side of the one k-NN
    engine (`pnpp_tf.retrieval.neighbours`), which also chooses faiss above `FAISS_MIN_IMAGES`.

    Ranked by descending similarity, ties by ascending index, on either backend: the order in
    which `pnpp_tf.retrieval.metrics.retrieval_metrics` counts the same embeddings' neighbours.

    Args:
        queries: float [Q, D] (or one query [D]); L2-normalised here.
        gallery: float [N, D]; L2-normalised here.
        k: neighbours per query; at most N (N - 1 with `exclude`).
        exclude: optional int [Q], a gallery index to leave out for each query (-1: none), e.g.
            the query itself when the queries are gallery items.
        backend: one of `neighbours.BACKENDS`: "auto", "exact" (TensorFlow, blockwise) or
            "faiss" (IndexFlatIP).

    Returns:
        (float32 similarities [Q, k], int64 indices [Q, k], the backend used).

    Raises:
        UserError: on a bad k or backend, faiss asked for but missing, non-finite embeddings,
            or queries of another width than the gallery's.
    """
    queries = neighbours.check_rows(np.atleast_2d(np.asarray(queries, np.float32)), "query embeddings")
    gallery = neighbours.check_rows(gallery, "index embeddings")
    if queries.shape[1] != gallery.shape[1]:
        raise UserError(
            f"Query embeddings are {queries.shape[1]}-d but the index holds "
            f"{gallery.shape[1]}-d embeddings: was it built with another model?")
    used = neighbours.choose_backend(backend, len(gallery), FAISS_MIN_IMAGES)
    similarities, indices = neighbours.nearest(queries, gallery, k, exclude, used)
    return similarities, indices, used
