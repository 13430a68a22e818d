"""Image files to unit embeddings: finding them under a folder, embedding them, skipping bad ones.

Every image is embedded as evaluation embeds it (`pnpp_tf.data.pipeline`: the shorter side
resized to S·288/256, the central S x S square), by a `pnpp_tf.artifacts.Embedder`.
A file that cannot be read or decoded, or is over the pixel budget, is skipped, with the reason why.
"""

import os
import stat

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

