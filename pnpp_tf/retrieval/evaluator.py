"""Embeds an evaluation split with a model and scores it: the bridge from models to metrics."""

import numpy as np

from pnpp_tf.data import pipeline
from pnpp_tf.errors import UserError
from pnpp_tf.retrieval import neighbours
from pnpp_tf.retrieval.embed import ImageEmbedder
from pnpp_tf.retrieval.metrics import nmi, retrieval_metrics


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
        max_pixels: an image file over this many pixels is a bad image, left undecoded
            (`ImageEmbedder.embed_files`); the start-up check should have left it out.
        distance: the default of `measure`: "cosine" or "euclidean" (`DISTANCES`).
        faults: a `pnpp_tf.data.faults.ImageFaults` knowing the splits' images: an image that
            stops reading between two measurements is named, and left out from then on if it
            says "skip". None: a bad image stops the evaluation with a `UserError` naming it.
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

    def embed(self, model, verbose=0):
        """The model's embeddings of the queries and (or None) of the gallery (L2-normalised if the
        model normalises, as `ProxyNCAModel` does; the metrics normalise in any case).

        The model is traced once, by the `ImageEmbedder` it holds (`ImageEmbedder.of`), for every
        measurement. With `faults`, the images an embedding pass leaves out are handed to it: named
        and stopped on, or left out from then on and the splits embedded again.

        Raises:
            UserError: a bad image, without `faults`; an image stopped reading and `faults` says
                "error" (or no image explains why one was left out).
        """
        embedder = ImageEmbedder.of(model)
        while True:
            splits = [split for split in (self.query, self.gallery) if split]
            found = [self._embed(embedder, split, name, verbose) for split, name in zip(splits, ("query", "gallery"))]
            failed = [path for result in found for path, _ in result.skipped]
            if not failed:
                return found[0].embeddings, found[1].embeddings if self.gallery else None
            left_out = UserError(f"{len(failed)} evaluation image(s) failed while embedding but read well when "
                                 f"checked again, e.g. {failed[0]}: did they change during the run?")
            bad = set(self.faults.bad_images(left_out, [p for split in splits for p in split.paths],
                                             "evaluation; the last checkpoint is intact", failed=failed))
            self._use(*(split.without(bad) if split else None for split in (self.query, self.gallery)))

    def _embed(self, embedder, split, name, verbose):
        """`embedder.embed_files` of `split`: stopping at a bad image, or with `faults` leaving out
        (unexplained) those that fail, for `faults` to explain."""
        return embedder.embed_files(split.paths, self.batch_size, self.max_pixels, image_size=self.image_size,
                                    on_bad_image="error" if self.faults is None else "skip", name=f"the {name} images",
                                    verbose=verbose, explain=self.faults is None)

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
            A dict of metric name to float, named as in `pnpp_tf.retrieval.metrics.retrieval_metrics`.
        """
        distance = neighbours.check_distance(distance or self.distance)
        if distance == "euclidean":
            model = getattr(model, "embedder", model)
        queries, gallery = self.embed(model, verbose)
        gallery_labels = self.gallery.labels if self.gallery else None
        metrics = retrieval_metrics(
            queries, self.query.labels, gallery, gallery_labels, ks=self.ks, distance=distance
        )
        if with_nmi:
            all_embeddings = queries if gallery is None else np.concatenate([queries, gallery])
            all_labels = self.query.labels if gallery is None else np.concatenate(
                [self.query.labels, gallery_labels]
            )
            metrics["nmi"] = nmi(all_embeddings, all_labels, distance=distance)
        return metrics


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
