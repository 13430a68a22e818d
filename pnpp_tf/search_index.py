"""Image search with a trained embedder: load a model, embed a folder, save it, query it.

    embedder = load_embedder("runs/demo")     # a model_dir, or an exported SavedModel
    index = build_index(embedder, find_images("photos/"), "photos/")   # skips unreadable files
    index.save("photos.npz")
    index = SearchIndex.load("photos.npz")
    query, _, _ = embed_paths(embedder, ["query.jpg"])
    distances, neighbours, backend = index.search(query, k=10)

Every image is embedded as evaluation embeds it (`pnpp_tf.data.pipeline`: the shorter side
resized to S·288/256, the central S x S square), and embeddings are L2-normalised, so cosine
similarity is their dot product. Distances are reported as cosine distances, 1 - cos: 0 for the
same direction, 2 for opposite ones.
"""

import dataclasses
import json
import os
import re
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from pnpp_tf.data import pipeline
from pnpp_tf.data.folder import IMAGE_EXTENSIONS
from pnpp_tf.serving import IMAGES_SIGNATURE, OUTPUT, normalized_embeddings

INDEX_FORMAT_VERSION = 1
# Above this many indexed images a faiss IndexFlatIP searches, when faiss is installed.
FAISS_MIN_IMAGES = 100_000
# Scores held per block of the exact search: 2**24 float32 = 64 MB.
_BLOCK_SCORES = 1 << 24
DISTANCE = "cosine distance (1 - cosine similarity; 0 = same direction, 2 = opposite)"
BACKENDS = ("auto", "exact", "faiss")


class Embedder:
    """A trained embedder from a model_dir or an exported SavedModel, returning unit vectors.

    Attributes:
        source: the file or directory it was loaded from (absolute).
        kind: "keras" (embedder.keras) or "saved_model".
        image_size: side S of the square crops it takes.
        embedding_dim: D, or None until the first call for a SavedModel that does not record it.
    """

    def __init__(self, fn, source, kind, image_size, embedding_dim):
        self._fn = fn
        self.source = source
        self.kind = kind
        self.image_size = int(image_size)
        self.embedding_dim = embedding_dim

    def __call__(self, images):
        """float32 images [N, S, S, 3] in [0, 255] -> float32 numpy [N, D], unit rows."""
        return np.asarray(self._fn(tf.convert_to_tensor(images, tf.float32)), np.float32)

    def describe(self):
        return f"{self.kind} {self.source} ({self.image_size} px)"


def load_embedder(model):
    """Loads a trained embedder for search.

    Args:
        model: one of
            - a training run's model_dir (holding embedder.keras), or an .keras file;
            - an exported SavedModel version directory (holding saved_model.pb);
            - an export base directory holding numbered versions: the highest version that is a
              complete SavedModel is used, as TF Serving would.

    Returns:
        An `Embedder`.

    Raises:
        ValueError: if `model` is none of those.
    """
    if not model:
        raise ValueError("--model is required: a training run's model_dir or an exported "
                         "SavedModel.")
    if not os.path.exists(model):
        raise ValueError(f"--model={model} does not exist.")
    path = os.path.abspath(model)
    if os.path.isfile(path):
        if path.endswith(".keras"):
            return _load_keras(path)
        raise ValueError(f"--model={model} is a file but not a .keras model; pass a model_dir or "
                         "an exported SavedModel directory.")
    if os.path.isfile(os.path.join(path, "embedder.keras")):
        return _load_keras(os.path.join(path, "embedder.keras"))
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return _load_saved_model(path)
    versions = sorted((int(name) for name in os.listdir(path) if name.isdigit()
                       and os.path.isfile(os.path.join(path, name, "saved_model.pb"))),
                      reverse=True)
    if versions:
        logging.info("Using version %d of the export %s", versions[0], path)
        return _load_saved_model(os.path.join(path, str(versions[0])))
    raise ValueError(f"--model={model} holds no embedder.keras (a training run's model_dir), no "
                     "saved_model.pb (an exported version) and no numbered version directories "
                     "(an export base directory).")


def _load_keras(path):
    import pnpp_tf.model  # noqa: F401 pylint: disable=import-outside-toplevel - registers its layers

    embedder = keras.saving.load_model(path, compile=False)
    shape = tuple(embedder.input.shape)
    if len(shape) != 4 or shape[1] is None or shape[1] != shape[2]:
        raise ValueError(f"{path} does not take square images [N, S, S, 3]; input shape {shape}.")
    fn = tf.function(lambda images: normalized_embeddings(embedder, images), reduce_retracing=True)
    return Embedder(fn, path, "keras", shape[1], int(embedder.output.shape[-1]))


def _load_saved_model(path):
    loaded = tf.saved_model.load(path)
    if IMAGES_SIGNATURE not in loaded.signatures:
        raise ValueError(f"The SavedModel {path} has no {IMAGES_SIGNATURE!r} signature; export it "
                         "with python -m pnpp_tf.export.")
    signature = loaded.signatures[IMAGES_SIGNATURE]
    inputs = signature.structured_input_signature[1]
    if len(inputs) != 1:
        raise ValueError(f"{path}: {IMAGES_SIGNATURE} takes {sorted(inputs)}; expected one "
                         "images input.")
    (input_name, spec), = inputs.items()
    size = int(loaded.image_size.numpy()) if hasattr(loaded, "image_size") else spec.shape[1]
    if size is None:
        raise ValueError(f"{path} accepts images of any size and records no image_size.")
    dim = int(loaded.embedding_dim.numpy()) if hasattr(loaded, "embedding_dim") else None

    def fn(images):
        outputs = signature(**{input_name: images})
        if OUTPUT not in outputs:
            raise ValueError(f"{path}: {IMAGES_SIGNATURE} returns {sorted(outputs)}, "
                             f"not {OUTPUT!r}.")
        return outputs[OUTPUT]

    # Kept alive with the function: the signature holds only a weak reference to its variables.
    fn.loaded = loaded
    return Embedder(fn, path, "saved_model", size, dim)


def find_images(root):
    """Every image file under `root`, recursively, sorted; extensions as in `IMAGE_EXTENSIONS`.

    Raises:
        ValueError: if `root` is not a directory or holds no image files.
    """
    if not root or not os.path.isdir(root):
        raise ValueError(f"--images={root} is not a directory.")
    paths, others = [], 0
    for folder, dirs, files in os.walk(os.path.abspath(root)):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(folder, name))
            else:
                others += 1
    if others:
        logging.info("Ignored %d file(s) under %s without an image extension (%s)", others, root,
                     ", ".join(IMAGE_EXTENSIONS))
    if not paths:
        raise ValueError(f"--images={root} holds no image files ({', '.join(IMAGE_EXTENSIONS)}).")
    return paths


def embed_paths(embedder, paths, batch_size=64, verbose=1):
    """Embeds image files, skipping those that cannot be decoded.

    Images are decoded and cropped by the evaluation pipeline's functions. A file that fails to
    read or decode is dropped from its batch (the others are kept); its reason is then found by
    decoding it again alone.

    Args:
        embedder: an `Embedder`.
        paths: image file paths.
        batch_size: images per inference batch.
        verbose: 1 shows a progress bar.

    Returns:
        (float32 [n, D] unit embeddings, the n paths embedded, in the order given, and a list of
        (path, reason) for the skipped files).
    """
    paths = list(paths)
    position = {path: i for i, path in enumerate(paths)}
    size = embedder.image_size
    dataset = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string))
    dataset = dataset.map(
        lambda path: (path, pipeline.resize_and_center_crop(pipeline.decode_image(path), size)),
        num_parallel_calls=os.cpu_count() or 1, deterministic=True,
    )
    dataset = dataset.ignore_errors(log_warning=False).batch(batch_size).prefetch(2)
    options = tf.data.Options()
    options.autotune.enabled = False  # as pipeline.eval_dataset: see its _PARALLEL_CALLS note
    dataset = dataset.with_options(options)
    progress = keras.utils.Progbar(len(paths), unit_name="image") if verbose else None
    embeddings, kept = [], []
    for batch_paths, images in dataset:
        embeddings.append(embedder(images))
        kept.extend(p.decode() for p in batch_paths.numpy())
        if progress:
            progress.update(position[kept[-1]] + 1)
    if progress and len(paths) and (not kept or position[kept[-1]] + 1 < len(paths)):
        progress.update(len(paths))
    kept_set = set(kept)
    skipped = [(path, unreadable_reason(path) or "unreadable while indexing")
               for path in paths if path not in kept_set]
    for path, reason in skipped[:20]:
        logging.warning("Skipped unreadable image %s: %s", path, reason)
    if len(skipped) > 20:
        logging.warning("... and %d more unreadable images (all listed in the index)",
                        len(skipped) - 20)
    dim = embedder.embedding_dim or 0
    matrix = np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32)
    return matrix.astype(np.float32), kept, skipped


def unreadable_reason(path):
    """Why the pipeline cannot decode `path`, as one line (or "" if it now can)."""
    try:
        pipeline.decode_image(path)
    except (tf.errors.OpError, OSError) as error:
        message = getattr(error, "message", None) or str(error)
        message = re.sub(r"\{\{[^}]*\}\}\s*", "", message.splitlines()[0] if message else "")
        message = re.sub(r"\s*\[Op:\w+\].*$", "", message).strip()
        return f"{type(error).__name__}: {message}" if message else type(error).__name__
    return ""


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

    def save(self, path):
        """Writes the index to `path` (an .npz archive) whole or not at all."""
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        partial = f"{path}.partial-{os.getpid()}"
        try:
            with open(partial, "wb") as file:
                # A file object, so numpy does not append ".npz" to the name.
                np.savez(
                    file,
                    embeddings=np.asarray(self.embeddings, np.float32),
                    paths=np.asarray(self.paths, dtype=np.str_),
                    metadata=np.asarray(json.dumps(self.metadata, sort_keys=True)),
                )
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)

    @classmethod
    def load(cls, path):
        """Reads an index written by `save`.

        Raises:
            ValueError: if the file is missing or is not such an index.
        """
        if not path or not os.path.isfile(path):
            raise ValueError(f"--index={path} does not exist; build it with "
                             "python -m pnpp_tf.index.")
        try:
            with np.load(path, allow_pickle=False) as archive:
                embeddings = archive["embeddings"].astype(np.float32)
                paths = [str(p) for p in archive["paths"]]
                metadata = json.loads(str(archive["metadata"]))
        except (OSError, KeyError, ValueError) as error:
            raise ValueError(f"--index={path} is not an index written by pnpp_tf.index "
                             f"({type(error).__name__}: {error}).") from None
        if embeddings.ndim != 2 or len(embeddings) != len(paths):
            raise ValueError(f"--index={path} is inconsistent: embeddings {embeddings.shape}, "
                             f"{len(paths)} paths.")
        return cls(embeddings, paths, metadata)

    def search(self, queries, k=10, exclude=None, backend="auto"):
        """The `k` nearest indexed images of each query: see `nearest`.

        Returns:
            (cosine distances [Q, k], indices [Q, k], the backend used).
        """
        similarities, indices, used = nearest(queries, self.embeddings, k, exclude, backend)
        return np.maximum(1.0 - similarities, 0.0), indices, used


def build_index(embedder, paths, images_root=None, batch_size=64, verbose=1):
    """Embeds `paths` (skipping unreadable files) into a `SearchIndex`.

    Raises:
        ValueError: if no image could be read.
    """
    embeddings, kept, skipped = embed_paths(embedder, paths, batch_size, verbose)
    if not kept:
        raise ValueError(f"None of the {len(paths)} images could be read, e.g. "
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
        "distance": "cosine",
    }
    return SearchIndex(embeddings, kept, metadata)


def choose_backend(num_gallery, backend="auto"):
    """"exact" or "faiss" for a search among `num_gallery` items; logs the choice.

    "auto" means faiss when it is installed and more than `FAISS_MIN_IMAGES` items are searched.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "auto":
        if num_gallery > FAISS_MIN_IMAGES:
            if _import_faiss() is not None:
                logging.info("Search: faiss IndexFlatIP (exact inner product) over %d images "
                             "(more than %d)", num_gallery, FAISS_MIN_IMAGES)
                return "faiss"
            logging.info("Search: exact blockwise over %d images; faiss is not installed "
                         "(pip install 'pnpp_tf[faiss]' for faster search above %d images)",
                         num_gallery, FAISS_MIN_IMAGES)
            return "exact"
        logging.info("Search: exact blockwise over %d images (faiss, if installed, is used "
                     "above %d)", num_gallery, FAISS_MIN_IMAGES)
        return "exact"
    if backend == "faiss" and _import_faiss() is None:
        raise ValueError("backend='faiss' needs faiss: pip install 'pnpp_tf[faiss]' "
                         "(or faiss-cpu).")
    logging.info("Search: %s over %d images (requested)", backend, num_gallery)
    return backend


def nearest(queries, gallery, k=10, exclude=None, backend="auto"):
    """The `k` most cosine-similar gallery rows of each query.

    Ranked by descending similarity; the exact backend breaks ties by ascending index, faiss
    in its own order.

    Args:
        queries: float [Q, D]; L2-normalised here.
        gallery: float [N, D]; L2-normalised here.
        k: neighbours per query; at most N (N - 1 with `exclude`).
        exclude: optional int [Q], a gallery index to leave out for each query (-1: none), e.g.
            the query itself when the queries are gallery items.
        backend: "auto", "exact" (blockwise numpy matrix products) or "faiss" (IndexFlatIP).

    Returns:
        (float32 similarities [Q, k], int64 indices [Q, k], the backend used).
    """
    queries = _unit_rows(np.atleast_2d(np.asarray(queries, np.float32)))
    gallery = _unit_rows(np.asarray(gallery, np.float32))
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"Query embeddings are {queries.shape[1]}-d but the index holds "
                         f"{gallery.shape[1]}-d embeddings: was it built with another model?")
    exclude = None if exclude is None else np.asarray(exclude, np.int64).reshape(len(queries))
    candidates = len(gallery) - (1 if exclude is not None and (exclude >= 0).any() else 0)
    k = int(k)
    if not 1 <= k <= candidates:
        raise ValueError(f"k={k} must be between 1 and the {candidates} candidate images.")
    backend = choose_backend(len(gallery), backend)
    search = _nearest_faiss if backend == "faiss" else _nearest_exact
    similarities, indices = search(queries, gallery, k, exclude)
    return similarities, indices, backend


def _nearest_exact(queries, gallery, k, exclude):
    rows = max(1, _BLOCK_SCORES // max(len(gallery), 1))
    out_scores = np.empty((len(queries), k), np.float32)
    out_indices = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), rows):
        stop = min(start + rows, len(queries))
        scores = queries[start:stop] @ gallery.T
        if exclude is not None:
            block = np.arange(stop - start)
            skip = exclude[start:stop]
            scores[block[skip >= 0], skip[skip >= 0]] = -np.inf
        if k < scores.shape[1]:
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            # argpartition may cut a run of equal scores anywhere: take every item tied with the
            # k-th score, so the (score desc, index asc) order below is exact.
            kth = np.take_along_axis(scores, part, axis=1).min(axis=1, keepdims=True)
            if (np.sum(scores >= kth, axis=1) > k).any():
                part = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        else:
            part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        top = np.take_along_axis(scores, part, axis=1)
        order = np.lexsort((part, -top), axis=-1)[:, :k]
        out_indices[start:stop] = np.take_along_axis(part, order, axis=1)
        out_scores[start:stop] = np.take_along_axis(top, order, axis=1)
    return out_scores, out_indices


def _nearest_faiss(queries, gallery, k, exclude):
    faiss = _import_faiss()
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery))
    extra = int(exclude is not None)
    scores, indices = index.search(np.ascontiguousarray(queries), k + extra)
    if extra:
        keep = indices != exclude[:, None]
        # Where the excluded item is not in the list, drop its last entry instead.
        keep[:, -1] &= ~keep.all(axis=1)
        scores = scores[keep].reshape(len(queries), k)
        indices = indices[keep].reshape(len(queries), k)
    return scores.astype(np.float32), indices.astype(np.int64)


def _import_faiss():
    try:
        import faiss  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    return faiss


def _unit_rows(x):
    if x.ndim != 2 or not len(x):
        raise ValueError(f"Embeddings must be a non-empty [N, D] array, got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError("Embeddings hold NaN or infinite values.")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
