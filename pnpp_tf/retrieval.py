"""Embeds an evaluation split with a model and scores it: the bridge from models to metrics."""

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
    """

    def __init__(self, query, image_size, ks, gallery=None, batch_size=64):
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
        self._query_images = pipeline.eval_dataset(query.paths, image_size, batch_size)
        self._gallery_images = (
            pipeline.eval_dataset(gallery.paths, image_size, batch_size) if gallery else None
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

    Traces `model` once per call: seconds for ResNet-50, negligible beside a training epoch.

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
    infer = tf.function(lambda images: model(images, training=False), reduce_retracing=True)
    progress = keras.utils.Progbar(num_images, unit_name="image") if verbose else None
    batches = []
    for images in dataset:
        batches.append(infer(images).numpy())
        if progress:
            progress.add(len(batches[-1]))
    return np.concatenate(batches).astype(np.float32)
