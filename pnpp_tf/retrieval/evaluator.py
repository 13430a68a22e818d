"""Embeds an evaluation split with a model and scores it: the bridge from models to metrics."""

import dataclasses
import time
import weakref

import keras
import numpy as np
import tensorflow as tf

from pnpp_tf import evaluation, neighbours
from pnpp_tf.data import image_check, pipeline
from pnpp_tf.errors import UserError


class RetrievalEvaluator:
    """Measures zero-shot retrieval on one evaluation protocol.

    Without a gallery, every query image is searched among all the other query images (CUB, Cars,
    SOP); with one, queries are searched in the gallery only (In-Shop).

    Args:
        query: a `pnpp_tf.data.Split` of query images.
        image_size: side of the embedder's input images.
        ks: the K of Recall@K.
        gallery: optional `Split` to search in.
        batch_size: images per inference batch.
        max_pixels: an image file over this many pixels stops the evaluation undecoded
            (`pipeline.eval_dataset`); the start-up check should have left it out.
        distance: the default of `measure`: "cosine" or "euclidean" (`DISTANCES`).
        faults: a `pnpp_tf.data.faults.ImageFaults` knowing the splits' images: an image that
            stops reading between two measurements is named, and left out from then on if it
            says "skip". None: the pipeline's error propagates.
    """

    def __init__(self, query, image_size, ks, gallery=None, batch_size=64,
                 max_pixels=pipeline.DEFAULT_MAX_PIXELS, distance="cosine", faults=None):
        self.distance = neighbours.check_distance(distance)
        self.ks = tuple(int(k) for k in ks)
        self.image_size, self.batch_size, self.max_pixels = image_size, batch_size, max_pixels
        self.faults = faults
        self._use(query, gallery)

    def _use(self, query, gallery):
        check_ks(self.ks, len(query), len(gallery) if gallery else None)
        self.query, self.gallery = query, gallery
        self._query_images = pipeline.eval_dataset(query.paths, self.image_size, self.batch_size, self.max_pixels)
        self._gallery_images = (pipeline.eval_dataset(gallery.paths, self.image_size, self.batch_size,
                                                      self.max_pixels) if gallery else None)

    def embed(self, model, verbose=0):
        """The model's embeddings of the queries and (or None) of the gallery (L2-normalised if the
        model normalises, as `ProxyNCAModel` does; the metrics normalise in any case).

        Raises:
            UserError: an image stopped reading and `faults` says "error".
        """
        while True:
            try:
                return self._embed(model, verbose)
            except tf.errors.OpError as error:
                if self.faults is None:
                    raise
                splits = [split for split in (self.query, self.gallery) if split]
                bad = set(self.faults.bad_images(error, [p for split in splits for p in split.paths],
                                                 "evaluation; the last checkpoint is intact"))
                self._use(*(_without(split, bad) if split else None for split in (self.query, self.gallery)))

    def _embed(self, model, verbose):
        queries = embed_images(model, self._query_images, len(self.query), verbose)
        if self._gallery_images is None:
            return queries, None
        return queries, embed_images(model, self._gallery_images, len(self.gallery), verbose)

    def measure(self, model, with_nmi=False, verbose=0, distance=None):
        """Retrieval metrics of `model` (Recall@K, MAP@R, R-Precision, optionally NMI).

        Args:
            model: maps an image batch to embeddings, e.g. a `ProxyNCAModel`.
            with_nmi: also cluster the embeddings (k-means) and report "nmi".
            verbose: Keras progress bar while embedding (0 silent, 1 bar).
            distance: "cosine" or "euclidean"; None: the evaluator's. "euclidean" measures the
                raw embedding, the authors' protocol: a model with an `embedder` (a
                `ProxyNCAModel`, whose own output is L2-normalised) through that embedder.

        Returns:
            A dict of metric name to float, named as in `pnpp_tf.evaluation.retrieval_metrics`.
        """
        distance = neighbours.check_distance(distance or self.distance)
        if distance == "euclidean":
            model = getattr(model, "embedder", model)
        queries, gallery = self.embed(model, verbose)
        gallery_labels = self.gallery.labels if self.gallery else None
        metrics = evaluation.retrieval_metrics(
            queries, self.query.labels, gallery, gallery_labels, ks=self.ks, distance=distance
        )
        if with_nmi:
            all_embeddings = queries if gallery is None else np.concatenate([queries, gallery])
            all_labels = self.query.labels if gallery is None else np.concatenate(
                [self.query.labels, gallery_labels]
            )
            metrics["nmi"] = evaluation.nmi(all_embeddings, all_labels, distance=distance)
        return metrics


def _without(split, paths):
    """`split` without the images of `paths`."""
    keep = np.array([path not in paths for path in split.paths], dtype=bool)
    return dataclasses.replace(split, paths=[p for p, k in zip(split.paths, keep) if k], labels=split.labels[keep])


def check_ks(ks, num_queries, num_gallery=None):
    """Raises `UserError` unless every query has more than max(ks) candidates to rank.

    Args:
        ks: the K of Recall@K.
        num_queries: query images.
        num_gallery: gallery images, or None when the queries are searched among themselves.
    """
    candidates = num_gallery if num_gallery is not None else num_queries - 1
    if max(ks) > candidates:
        raise UserError(
            f"Recall@{max(ks)} needs more than K candidates per query, but only {candidates} "
            f"{'gallery images' if num_gallery is not None else 'other evaluation images'} exist; "
            "lower --eval_ks."
        )


def embed_images(model, dataset, num_images, verbose=0):
    """Runs `model` in inference mode over a dataset of image batches, on the default device.

    The model is traced once and the trace reused by every later call with the same model and
    image shape (see `inference_function`), so the per-epoch evaluation during training does not
    pay seconds of ResNet-50 tracing each time.

    A plain loop rather than `model.predict`, so that every worker of a multi-worker strategy
    embeds the whole split instead of its shard.

    Args:
        model: maps an image batch to embeddings.
        dataset: a `tf.data.Dataset` of image batches.
        num_images: how many images the dataset holds (for the progress bar).
        verbose: 1 shows a progress bar.

    Returns:
        A float32 numpy array [num_images, dim].
    """
    return _embed_batches(model, dataset, num_images, verbose)[0]


# Why an image left out of the embedding pass has no problem when checked again just after.
CHANGED_DURING_RUN = "failed while embedding but decodes now: did the file change during the run?"


def embed_decodable(model, paths, image_size, batch_size=64, max_pixels=pipeline.DEFAULT_MAX_PIXELS,
                    verbose=0, stop_at_bad=False):
    """Embeds the images of `paths` that decode, decoding each file once, and names the others.

    The embedding pass leaves out, rather than stopping at, a file that cannot be read, decoded or
    cropped, or whose header gives more than `max_pixels` pixels (`pipeline.eval_dataset` with
    `skip_unreadable`). Only those few are decoded again, by `image_check.check_images`, for the
    reason they fail: a check of every image before embedding would decode each one twice.

    Args:
        model: maps an image batch to embeddings.
        paths: image file paths.
        image_size: side of the model's input images.
        batch_size: images per inference batch.
        max_pixels: the pixel budget (--max_pixels): a larger image is a bad one.
        verbose: 1 shows a progress bar.
        stop_at_bad: stop embedding at the first bad image and only check the images after it,
            for a caller that refuses a split with any bad image (--on_bad_image=error): it then
            learns all of them for the price of decoding the rest, without running the model.

    Returns:
        (float32 embeddings [n, dim] of the good images, in the order of `paths`; an
        `image_check.ImageCheck` of all of `paths`, whose `bad` are the images left out). With
        `stop_at_bad` and a bad image, the embeddings are of the good images before it only.
    """
    start = time.perf_counter()
    dataset = pipeline.eval_dataset(paths, image_size, batch_size, max_pixels, skip_unreadable=True)
    embeddings, positions, reached = _embed_batches(model, dataset, len(paths), verbose, stop_at_bad)
    embedded = set(positions.tolist())
    failed = [i for i in range(reached) if i not in embedded]
    to_check = failed + list(range(reached, len(paths)))
    check = image_check.check_images([paths[i] for i in to_check], max_pixels=max_pixels) if to_check else None
    reasons = dict(check.bad) if check else {}
    bad = [(paths[i], reasons.get(paths[i], CHANGED_DURING_RUN)) for i in to_check
           if i < reached or paths[i] in reasons]
    too_large = set(check.too_large) if check else set()
    return embeddings, image_check.ImageCheck(len(paths), bad, time.perf_counter() - start,
                                              [path for path, _ in bad if path in too_large])


def _embed_batches(model, dataset, num_images, verbose=0, stop_at_gap=False):
    """The loop of `embed_images`, also over batches of (positions, images).

    Args:
        model: maps an image batch to embeddings.
        dataset: a `tf.data.Dataset` of image batches, or of (positions [B], images) batches in
            ascending positions, some of which may be missing.
        num_images: how many images the dataset holds at most (for the progress bar).
        verbose: 1 shows a progress bar.
        stop_at_gap: stop after the first batch that shows a position left out.

    Returns:
        (float32 embeddings [n, dim], or [0, 0] when none; int64 positions [n] of the images
        embedded, or None for a dataset of images only; how many leading positions the pass has
        been through: `num_images` unless it stopped).
    """
    infer = inference_function(model)
    spec = getattr(dataset, "element_spec", None)
    with_positions = isinstance(spec, tuple)
    image_spec = spec[1] if with_positions else spec
    if isinstance(image_spec, tf.TensorSpec) and image_spec.shape.rank:
        # Traced for any batch size up front: otherwise the last, smaller batch of a split
        # would trace a second time. A trace already made for this shape is reused.
        infer.get_concrete_function(tf.TensorSpec([None, *image_spec.shape[1:]], image_spec.dtype))
    progress = keras.utils.Progbar(num_images, unit_name="image") if verbose else None
    batches, positions, reached, embedded = [], [], num_images, 0
    for element in dataset:
        images = element[1] if with_positions else element
        batches.append(infer(images).numpy())
        embedded += len(batches[-1])
        if progress:
            progress.add(len(batches[-1]))
        if with_positions:
            positions.append(element[0].numpy())
            # Positions ascend, so fewer images than the last position + 1 means one was left out.
            last = int(positions[-1][-1]) + 1
            if stop_at_gap and last > embedded:
                reached = last
                break
    embeddings = np.concatenate(batches).astype(np.float32) if batches else np.zeros((0, 0), np.float32)
    if not with_positions:
        return embeddings, None, reached
    return embeddings, np.concatenate(positions) if positions else np.zeros(0, np.int64), reached


# One inference function per live model. Weakly keyed, and the functions hold the model only
# weakly, so that a model no longer used elsewhere (and its traced graphs) can be freed.
_INFERENCE_FUNCTIONS = weakref.WeakKeyDictionary()


def inference_function(model):
    """The `tf.function` computing `model(images, training=False)`, shared by all calls.

    Reusing a trace is safe across training: the weights are variables, read when the function
    runs rather than baked in when it is traced, and inference does not depend on what
    `compile` sets (optimisers, frozen backbone). Calls inside and outside a strategy's scope
    get a trace each, as `tf.function` tells those contexts apart. A model whose layers are
    replaced must be a new model object to be traced again.

    Args:
        model: maps an image batch to embeddings, e.g. a `keras.Model`.

    Returns:
        A `tf.function` of an image batch; the same object for the same `model` while it lives.
    """
    try:
        return _INFERENCE_FUNCTIONS[model]
    except KeyError:
        pass
    except TypeError:
        # Not weakly referenceable or not hashable, so no weak key: traced per call, as before.
        return tf.function(lambda images: model(images, training=False), reduce_retracing=True)
    model_ref = weakref.ref(model)
    infer = tf.function(lambda images: model_ref()(images, training=False), reduce_retracing=True)
    _INFERENCE_FUNCTIONS[model] = infer
    return infer
