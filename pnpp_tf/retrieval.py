"""Embeds an evaluation split with a model and scores it: the bridge from models to metrics."""

import weakref

import keras
import numpy as np
import tensorflow as tf

from pnpp_tf import evaluation
from pnpp_tf.data import pipeline


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
    """

    def __init__(self, query, image_size, ks, gallery=None, batch_size=64,
                 max_pixels=pipeline.DEFAULT_MAX_PIXELS):
        self.query = query
        self.gallery = gallery
        self.ks = tuple(int(k) for k in ks)
        candidates = len(gallery) if gallery else len(query) - 1
        if max(self.ks) > candidates:
            raise ValueError(
                f"Recall@{max(self.ks)} needs more than K candidates per query, but only {candidates} "
                f"{'gallery images' if gallery else 'other evaluation images'} exist; "
                "lower --eval_ks."
            )
        self._query_images = pipeline.eval_dataset(query.paths, image_size, batch_size, max_pixels)
        self._gallery_images = (
            pipeline.eval_dataset(gallery.paths, image_size, batch_size, max_pixels) if gallery else None
        )

    def embed(self, model, verbose=0):
        """The model's embeddings of the queries and (or None) of the gallery (L2-normalised if the
        model normalises, as `ProxyNCAModel` does; the metrics normalise in any case)."""
        queries = embed_images(model, self._query_images, len(self.query), verbose)
        if self._gallery_images is None:
            return queries, None
        return queries, embed_images(model, self._gallery_images, len(self.gallery), verbose)

    def measure(self, model, with_nmi=False, verbose=0):
        """Retrieval metrics of `model` (Recall@K, MAP@R, R-Precision, optionally NMI).

        Args:
            model: maps an image batch to embeddings, e.g. a `ProxyNCAModel`.
            with_nmi: also cluster the embeddings (k-means) and report "nmi".
            verbose: Keras progress bar while embedding (0 silent, 1 bar).

        Returns:
            A dict of metric name to float, named as in `pnpp_tf.evaluation.retrieval_metrics`.
        """
        queries, gallery = self.embed(model, verbose)
        gallery_labels = self.gallery.labels if self.gallery else None
        metrics = evaluation.retrieval_metrics(
            queries, self.query.labels, gallery, gallery_labels, ks=self.ks
        )
        if with_nmi:
            all_embeddings = queries if gallery is None else np.concatenate([queries, gallery])
            all_labels = self.query.labels if gallery is None else np.concatenate(
                [self.query.labels, gallery_labels]
            )
            metrics["nmi"] = evaluation.nmi(all_embeddings, all_labels)
        return metrics


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
    infer = inference_function(model)
    spec = getattr(dataset, "element_spec", None)
    if isinstance(spec, tf.TensorSpec) and spec.shape.rank:
        # Traced for any batch size up front: otherwise the last, smaller batch of a split
        # would trace a second time. A trace already made for this shape is reused.
        infer.get_concrete_function(tf.TensorSpec([None, *spec.shape[1:]], spec.dtype))
    progress = keras.utils.Progbar(num_images, unit_name="image") if verbose else None
    batches = []
    for images in dataset:
        batches.append(infer(images).numpy())
        if progress:
            progress.add(len(batches[-1]))
    return np.concatenate(batches).astype(np.float32)


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
