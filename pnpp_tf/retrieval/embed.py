"""Image files to embeddings: finding them under a folder, embedding them, skipping bad ones.

Every image is embedded as evaluation embeds it (`pnpp_tf.data.pipeline`: the shorter side
resized to S·288/256, the central S x S square), by a model or a `pnpp_tf.artifacts.Embedder`.
A file that cannot be read or decoded, or is over the pixel budget, is skipped, with the reason why.
"""

import os
import stat
import time
import weakref

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from pnpp_tf.data import image_check, image_header, pipeline
from pnpp_tf.data.folder import IMAGE_EXTENSIONS
from pnpp_tf.errors import UserError


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


def embed_paths(embedder, paths, batch_size=64, verbose=1, max_pixels=image_header.DEFAULT_MAX_PIXELS):
    """Embeds image files, skipping those that cannot be decoded.

    Images are decoded and cropped by the evaluation pipeline's functions. A file that fails to
    read or decode, or whose header gives more than `max_pixels` pixels, is dropped from its
    batch (the others are kept); its reason is then found by checking it again alone.

    Args:
        embedder: an `Embedder`.
        paths: image file paths.
        batch_size: images per inference batch.
        verbose: 1 shows a progress bar.
        max_pixels: the largest image decoded (`--max_pixels`).

    Returns:
        (float32 [n, D] unit embeddings, the n paths embedded, in the order given, and a list of
        (path, reason) for the skipped files).
    """
    paths = list(paths)
    position = {path: i for i, path in enumerate(paths)}
    size = embedder.image_size
    dataset = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string))
    dataset = dataset.map(
        lambda path: (path, pipeline.resize_and_center_crop(pipeline.decode_image(path, max_pixels), size)),
        num_parallel_calls=pipeline.PARALLEL_CALLS, deterministic=True,
    )
    dataset = dataset.ignore_errors(log_warning=False).batch(batch_size).prefetch(pipeline.PREFETCH_BATCHES)
    dataset = dataset.with_options(pipeline.dataset_options())
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
    skipped = [(path, image_check.decode_problem(path, max_pixels) or "unreadable while indexing")
               for path in paths if path not in kept_set]
    for path, reason in skipped[:20]:
        logging.warning("Skipped unreadable image %s: %s", path, reason)
    if len(skipped) > 20:
        logging.warning("... and %d more unreadable images (all listed in the index)",
                        len(skipped) - 20)
    dim = embedder.embedding_dim or 0
    matrix = np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32)
    return matrix.astype(np.float32), kept, skipped


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
