"""On-disk cache of decoded, downsized images: each image file is decoded once, not every epoch.

    cache = ImageCache("/scratch/cub_cache", short_side=288)
    split = cache.cached_split(split)          # same images and labels, paths into the cache

An entry holds one image's pixels, downsized so that its shorter side is at most `short_side`
(never enlarged), as a serialized uint8 tensor (`tf.io.serialize_tensor`) that
`pipeline.read_cached_image` reads without decoding. The input pipelines take cached paths like any
others, so training and evaluation run unchanged on them.

An entry's name is a hash of the source file's absolute path, size, modification time and
`short_side`: an edited or replaced image gets a new entry, and one cache directory serves several
datasets and sizes. Entries are written to a temporary name and renamed
(`pnpp_tf.io_utils.write_atomic`), so a build killed half way leaves only whole entries and the
next build completes it. Entries of files that changed are not deleted; remove the directory to
reclaim the space.
"""

import hashlib
import os
import time

import keras
import tensorflow as tf
from absl import logging

from pnpp_tf.data import image_check, image_header, pipeline
from pnpp_tf.data.split import Split
from pnpp_tf.io_utils import write_atomic
from pnpp_tf.errors import UserError

# Why 288/256 of the crop by default: evaluation resizes the shorter side to exactly that before
# its center crop (RECIPE), so cached evaluation differs from uncached only by rounding to uint8.
DEFAULT_SIDE_RATIO = pipeline.EVAL_RESIZE_RATIO
# Part of every entry's key: change it when `_encode` changes, so old entries are not reused.
_ENTRY_FORMAT = 1


def default_short_side(image_size):
    """The cache's shorter side for crops of `image_size`: the evaluation resize, 288/256 of it."""
    return round(image_size * DEFAULT_SIDE_RATIO)


class ImageCache:
    """A directory of decoded images, downsized to a shorter side of at most `short_side` pixels.

    Args:
        directory: where entries are written (created if missing).
        short_side: shorter side of the cached images in pixels; smaller images are kept as they
            are. Evaluation needs `default_short_side(image_size)`; training crops (as small as 8%
            of the image) keep more detail from a larger side, at the cost of disk and reading.
    """

    def __init__(self, directory, short_side):
        if not directory:
            raise UserError("ImageCache needs a directory (--cache_dir).")
        if short_side < 1:
            raise UserError(f"--cache_short_side must be a positive number of pixels, got {short_side}.")
        self.directory = directory
        self.short_side = int(short_side)
        # Entries seen on disk or written by this object: training's start-up check and the split
        # it then reads look each image up once on (possibly remote) storage, not twice.
        self._existing = set()

    def cached_split(self, split, progress=True, max_pixels=image_header.DEFAULT_MAX_PIXELS):
        """`split` with each path replaced by its cache entry, building the missing entries.

        Args:
            split: a `Split` of image files.
            progress: show a progress bar while building entries.
            max_pixels: an image over this many pixels is not decoded (`--max_pixels`).

        Returns:
            A `Split` with the same labels and class names.
        """
        return Split(self.cached_paths(split.paths, progress, max_pixels), split.labels, split.class_names)

    def cached_paths(self, paths, progress=True, max_pixels=image_header.DEFAULT_MAX_PIXELS):
        """The cache entry of every image in `paths` (in order), building the missing ones.

        Raises:
            ValueError: an image does not decode, or is over `max_pixels` (named, with the reason).
        """
        entries, check = self._build_missing(paths, progress, max_pixels)
        if check.bad:
            path, reason = check.bad[0]
            raise UserError(f"{path}: cannot read or decode this image for the cache ({reason}); check the "
                             "data with `python -m pnpp_tf.check_data`.")
        return entries

    def check_and_build(self, paths, progress=True, max_pixels=image_header.DEFAULT_MAX_PIXELS):
        """Builds the missing entries of `paths` and reports the images that do not decode.

        The start-up check of training with a cache: each image is decoded once, into its entry,
        and an image that already has an entry is known to decode. An image over `max_pixels`
        is not decoded and gets no entry; an entry built earlier under a larger budget is kept,
        as its pixels are already downsized.

        Returns:
            An `ImageCheck` of the images decoded now, listing those that failed (no entry).
        """
        return self._build_missing(paths, progress, max_pixels)[1]

    def _build_missing(self, paths, progress, max_pixels):
        """(the entry of every path, an `ImageCheck` of building the missing ones)."""
        start = time.perf_counter()
        entries = [self.entry_path(path) for path in paths]
        missing = [i for i, entry in enumerate(entries)
                   if entry not in self._existing and not tf.io.gfile.exists(entry)]
        failed = []
        if missing:
            logging.info("Image cache %s: decoding %d of %d images (shorter side <= %d px)",
                         self.directory, len(missing), len(paths), self.short_side)
            failed = self._build([paths[i] for i in missing], [entries[i] for i in missing], progress,
                                 max_pixels)
        # Only now: a build that stops half way must not leave unwritten entries marked as there.
        unwritten = set(failed)
        self._existing.update(entry for path, entry in zip(paths, entries) if path not in unwritten)
        problems = [(path, image_check.image_problem(path, max_pixels) or image_check.Problem("unreadable"))
                    for path in failed]
        return entries, image_check.ImageCheck.of_problems(len(missing), problems, time.perf_counter() - start)

    def entry_path(self, path):
        """Where the entry of the image file `path` is (whether or not it exists yet)."""
        path = os.path.abspath(path) if "://" not in path else path
        stat = tf.io.gfile.stat(path)
        key = f"{_ENTRY_FORMAT}\0{path}\0{stat.length}\0{stat.mtime_nsec}\0{self.short_side}".encode("utf-8")
        digest = hashlib.sha1(key).hexdigest()
        # Two-level fan-out keeps directories small for datasets of 100k+ images (SOP).
        return os.path.join(self.directory, digest[:2], digest[2:] + pipeline.CACHED_IMAGE_SUFFIX)

    def _build(self, paths, entries, progress, max_pixels):
        """Writes the entry of every image that decodes; returns the paths of those that do not."""
        indices = tf.range(len(paths), dtype=tf.int64)
        encoded = tf.data.Dataset.from_tensor_slices((indices, tf.constant(list(paths)))).map(
            lambda index, path: (index, self._encode(path, max_pixels)),
            num_parallel_calls=pipeline.PARALLEL_CALLS, deterministic=True,
        ).ignore_errors()  # the indices missing from the output are the images that failed
        encoded = encoded.prefetch(pipeline.PREFETCH_BATCHES).with_options(pipeline.dataset_options())
        bar = keras.utils.Progbar(len(paths), unit_name="image") if progress else None
        written = set()
        for index, contents in encoded.as_numpy_iterator():
            try:
                write_atomic(entries[index], contents)
            except OSError as error:
                raise UserError(f"--cache_dir={self.directory}: cannot write {entries[index]} ({error}); "
                                 "free some space or choose another --cache_dir.") from error
            written.add(int(index))
            if bar:
                bar.update(int(index) + 1)
        if bar and len(written) < len(paths):
            bar.update(len(paths))
        return [path for i, path in enumerate(paths) if i not in written]

    def _encode(self, path, max_pixels):
        image = pipeline.decode_image(path, max_pixels)
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = tf.minimum(1.0, self.short_side / tf.reduce_min(shape))
        target = tf.cast(tf.round(shape * scale), tf.int32)
        image = tf.cond(
            scale < 1.0,
            lambda: tf.image.resize(image, target, method="bilinear", antialias=True),
            lambda: image,
        )
        pixels = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
        return tf.io.serialize_tensor(pixels)
