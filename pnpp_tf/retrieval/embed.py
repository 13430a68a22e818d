"""Image files to embeddings: the one way every caller embeds them, and finding them in a folder.

    embedder = ImageEmbedder(model, image_size=227)     # or ImageEmbedder.of(model): the one it holds
    found = embedder.embed_files(paths, on_bad_image="skip", verbose=1)
    found.embeddings, found.paths, found.skipped        # float32 [n, D]; the n files; [(file, why)]

Evaluation, training's Recall@K, the index, search, export parity and the tools all embed here
(an `pnpp_tf.artifacts.Embedder` holds an `ImageEmbedder`: `Embedder.embed_files`). Every image is
decoded and cropped by the evaluation pipeline (`pnpp_tf.data.pipeline.eval_dataset`: the pixel
budget, then the shorter side resized to S·288/256 and the central S x S square), once: the pass
leaves out a file it cannot read, decode or crop, and only those are decoded again, for their
reason (`pnpp_tf.data.image_check`). One bad-image policy: "error" stops at the first and names
them all in one line; "skip" leaves them out and reports them. The model runs in one `tf.function`
per `ImageEmbedder`, traced once for any batch size.
"""

import dataclasses
import os
import stat
import time
import weakref

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from pnpp_tf.data import image_check, pipeline
from pnpp_tf.data.folder import IMAGE_EXTENSIONS
from pnpp_tf.errors import UserError

# Why an image left out of the embedding pass has no problem when checked again just after.
CHANGED_DURING_RUN = "failed while embedding but decodes now: did the file change during the run?"
# Why an image was left out when the caller explains failures itself (`explain=False`).
FAILED_WHILE_EMBEDDING = "failed while embedding (not checked again)"
# Skipped images logged one by one; the others are counted (all are in the result).
SHOWN_SKIPPED = 20


def find_images(root):
    """Every image file under `root`, recursively, sorted; extensions as in `IMAGE_EXTENSIONS`.

    Symbolic links are followed, except a link to a directory already searched (a loop, such
    as `up -> ..`), which is logged and passed over. A link that cannot be followed (dangling,
    or a loop of links) is returned like a file, so that the indexer skips and reports it.
    Special files (pipes, devices) are passed over: reading one may never end.

    Raises:
        ValueError: if `root` is not a directory or holds no image files.
    """
    if not root or not os.path.isdir(root):
        raise UserError(f"--images={root} is not a directory.")
    paths, others = [], 0
    searched = set()
    for folder, dirs, files in os.walk(os.path.abspath(root), followlinks=True):
        searched.add(os.path.realpath(folder))
        # Real directories claim their place before links to them do.
        claims = sorted(dirs, key=lambda name: (os.path.islink(os.path.join(folder, name)), name))
        dirs[:] = sorted(name for name in claims if _not_searched(os.path.join(folder, name), searched))
        for name in sorted(files):
            path = os.path.join(folder, name)
            if name.lower().endswith(IMAGE_EXTENSIONS) and not _is_special(path):
                paths.append(path)
            else:
                others += 1
    if others:
        logging.info("Ignored %d file(s) under %s without an image extension (%s) or not regular files",
                     others, root, ", ".join(IMAGE_EXTENSIONS))
    if not paths:
        raise UserError(f"--images={root} holds no image files ({', '.join(IMAGE_EXTENSIONS)}).")
    return paths


def _not_searched(directory, searched):
    """False, logging why, for a directory searched (or to be searched) by another path."""
    target = os.path.realpath(directory)
    if target in searched:
        logging.warning("Not following %s: it leads to %s, searched already (a loop of links?)",
                        directory, target)
        return False
    searched.add(target)
    return True


def _is_special(path):
    """True for a pipe, socket or device; False for a regular file or a link that cannot be followed."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


@dataclasses.dataclass
class EmbeddedFiles:
    """What `ImageEmbedder.embed_files` made of a list of image files.

    Attributes:
        embeddings: float32 [n, D], one row per embedded file, in the order the files were given.
        paths: the n files embedded.
        skipped: [(path, reason)] of the files left out, in the order given.
        too_large: the paths of `skipped` over the pixel budget (--max_pixels).
        seconds: the whole pass: reading, decoding, embedding and checking the files left out.
        model_seconds: the part of `seconds` spent in the model.
    """

    embeddings: np.ndarray
    paths: list
    skipped: list
    too_large: list
    seconds: float
    model_seconds: float


class ImageEmbedder:
    """Embeds image files with one model, through one `tf.function` traced once for any batch size.

    The trace is reused by every later call, so that training's per-epoch Recall@K does not pay
    seconds of ResNet-50 tracing each time. Reusing it is safe across training: the weights are
    variables, read when the function runs rather than baked in when it is traced, and inference
    does not depend on what `compile` sets (optimisers, frozen backbone). Calls inside and outside
    a strategy's scope get a trace each, as `tf.function` tells those contexts apart. A model whose
    layers are replaced must be a new model object to be traced again.

    A plain loop rather than `model.predict`, so that every worker of a multi-worker strategy
    embeds all the files instead of its shard.

    Args:
        model: maps a float32 image batch [N, S, S, 3] in [0, 255] to embeddings [N, D] when called
            as `model(images, training=False)` inside a `tf.function`: a `keras.Model`, a
            `ProxyNCAModel` (unit rows), an `Embedder.inference`.
        image_size: S, the side of the crops; or None, to be given to each `embed_files`.
        weakly: hold `model` by a weak reference only (as `of` does, for the model holding this).
    """

    def __init__(self, model, image_size=None, weakly=False):
        model_ref = weakref.ref(model) if weakly else lambda: model
        self.image_size = image_size
        self._infer = tf.function(lambda images: model_ref()(images, training=False), reduce_retracing=True)

    @classmethod
    def of(cls, model):
        """The `ImageEmbedder` that `model` holds (as its `image_embedder`), made on first use.

        One trace per model however many callers embed with it: each epoch's Recall@K, another
        `RetrievalEvaluator` of the same model. The model is held weakly, so that one no longer
        used elsewhere is freed with its traced graphs. A model that can hold no attribute (or
        no weak reference) gets a new `ImageEmbedder`, traced anew, each time.
        """
        if isinstance(model, cls):
            return model
        held = getattr(model, "image_embedder", None)
        if isinstance(held, cls):
            return held
        try:
            embedder = cls(model, weakly=True)
            # Past Keras' attribute tracking: not a layer, a weight or a checkpoint dependency.
            object.__setattr__(model, "image_embedder", embedder)
        except (AttributeError, TypeError):
            return cls(model)
        return embedder

    def __call__(self, images):
        """float32 images [N, S, S, 3] in [0, 255] -> float32 numpy embeddings [N, D]."""
        images = tf.convert_to_tensor(images, tf.float32)
        self._trace(images.shape[1])
        return np.asarray(self._infer(images), np.float32)

    def _trace(self, image_size):
        """The trace for S x S crops, made for any batch size: otherwise the last, smaller batch
        of a list of files would trace a second time. A trace already made is reused."""
        return self._infer.get_concrete_function(tf.TensorSpec([None, image_size, image_size, 3], tf.float32))

    def embed_files(self, paths, batch_size=64, max_pixels=pipeline.DEFAULT_MAX_PIXELS, on_bad_image="error",
                    name="the images", verbose=0, image_size=None, explain=True, on_batch=None):
        """Embeds image files, decoding each once, and leaves out or stops at those that fail.

        The pass leaves out, rather than stopping at, a file that cannot be read, decoded or
        cropped, or whose header gives more than `max_pixels` pixels (`pipeline.eval_dataset` with
        `skip_unreadable`). Only those are decoded again, by `image_check.check_images`, for the
        reason they fail: a check of every image before embedding would decode each one twice.

        Args:
            paths: image files (or `pnpp_tf.data.cache.ImageCache` entries, all of them).
            batch_size: images per inference batch.
            max_pixels: the pixel budget (--max_pixels): a larger image is a bad one.
            on_bad_image: "error": stop embedding at the first bad image and check only the
                files after it, so that all of them are named for the price of decoding the rest,
                without running the model; "skip": leave them out, logging each (the first
                `SHOWN_SKIPPED`) with its reason.
            name: what the files are, for the message, e.g. "test".
            verbose: 1 shows a progress bar.
            image_size: S, if not this embedder's.
            explain: False: leave out the files that fail without checking them again (their
                reason is `FAILED_WHILE_EMBEDDING`) nor logging them, for a caller that explains
                them itself (training's `pnpp_tf.data.faults.ImageFaults`).
            on_batch: optional `(paths, images, embeddings)` called with each batch of files
                embedded, its crops and their embeddings (numpy), e.g. to embed the same crops
                with other models (export parity).

        Returns:
            An `EmbeddedFiles`.

        Raises:
            UserError: with "error", one line naming the bad images and their reasons
                (`image_check.bad_images_message`); an unknown `on_bad_image`.
        """
        image_check.check_on_bad_image(on_bad_image)
        size = image_size or self.image_size
        if not size:
            raise ValueError("No image size: give the ImageEmbedder or embed_files one.")
        start, paths = time.perf_counter(), list(paths)
        dataset = pipeline.eval_dataset(paths, size, batch_size, max_pixels, skip_unreadable=True)
        dim = self._trace(size).structured_outputs.shape[-1] or 0
        progress = keras.utils.Progbar(len(paths), unit_name="image") if verbose and paths else None
        batches, embedded, reached, model_seconds = [], [], len(paths), 0.0
        for positions, images in dataset:
            began = time.perf_counter()
            batches.append(self._infer(images).numpy())
            model_seconds += time.perf_counter() - began
            positions = positions.numpy().tolist()
            embedded.extend(positions)
            if on_batch:
                on_batch([paths[i] for i in positions], images.numpy(), batches[-1])
            if progress:
                progress.update(embedded[-1] + 1)
            # Positions ascend, so fewer images than the last position + 1 means one was left out.
            if on_bad_image == "error" and embedded[-1] + 1 > len(embedded):
                reached = embedded[-1] + 1
                break
        if progress and (not embedded or embedded[-1] + 1 < reached):
            progress.update(reached)
        skipped, too_large = _left_out(paths, set(embedded), reached, max_pixels, explain)
        if skipped and on_bad_image == "error":
            raise UserError(image_check.bad_images_message(skipped, too_large, name))
        if skipped and explain:
            image_check.warn_skipped(skipped, too_large, shown=SHOWN_SKIPPED)
        embeddings = np.concatenate(batches).astype(np.float32) if batches else np.zeros((0, dim), np.float32)
        return EmbeddedFiles(embeddings, [paths[i] for i in embedded], skipped, too_large,
                             time.perf_counter() - start, model_seconds)


def _left_out(paths, embedded, reached, max_pixels, explain):
    """([(path, reason)] of the files of `paths` that are bad, the paths of those over `max_pixels`):
    those of the first `reached` left out of `embedded` positions, and those after that fail a check.
    """
    failed = [i for i in range(reached) if i not in embedded]
    if not explain:
        return [(paths[i], FAILED_WHILE_EMBEDDING) for i in failed], []
    to_check = failed + list(range(reached, len(paths)))
    check = image_check.check_images([paths[i] for i in to_check], max_pixels=max_pixels) if to_check else None
    reasons = dict(check.bad) if check else {}
    bad = [(paths[i], reasons.get(paths[i], CHANGED_DURING_RUN)) for i in to_check
           if i < reached or paths[i] in reasons]
    too_large = set(check.too_large) if check else set()
    return bad, [path for path, _ in bad if path in too_large]
