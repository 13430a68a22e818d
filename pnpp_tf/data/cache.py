"""On-disk cache of decoded, downsized images: each image file is decoded once, not every epoch.

    cache = ImageCache("/scratch/cub_cache", short_side=288)
    split = cache.cached_split(split)          # same images and labels, paths into the cache

An entry holds one image's pixels, downsized so that its shorter side is at most `short_side`
(never enlarged), as uint8 behind a header (`cache_entry.CACHE_ENTRY_MAGIC` gives the layout) that
`cache_entry.read_cached_image` checks before reading the pixels, without decoding. The input
pipelines take cached paths like any others, so training and evaluation run unchanged on them.

An entry carries fingerprints of its header and pixels and the key it was written for: one that
was cut short, changed on disk, or copied from another image's stops the pipeline with an error
whose message holds `DAMAGED_ENTRY` and the entry's path (`damaged_entry_of` reads it back), never
with another image's pixels. `ImageCache.entry_problem` checks an entry the same way from Python,
and `ImageCache.rebuild` rewrites entries from their images.

An entry's name is a hash of the source file's absolute path, size, modification time and
`short_side`: an edited or replaced image gets a new entry, and one cache directory serves several
datasets and sizes. Entries are written to a temporary name and renamed
(`pnpp_tf.io_utils.write_atomic`), so a build killed half way leaves only whole entries and the
next build completes it. Entries of files that changed are not deleted; remove the directory to
reclaim the space. A cache directory removed while a process uses it is noticed by that
process's next `cached_paths` or `check_and_build`, which rebuild it.
"""

import codecs
import hashlib
import os
import re
import time

import keras
import tensorflow as tf
from absl import logging

from pnpp_tf.data import cache_entry, image_check, image_header, pipeline
from pnpp_tf.data.split import Split
from pnpp_tf.io_utils import write_atomic
from pnpp_tf.errors import UserError

# Why 288/256 of the crop by default: evaluation resizes the shorter side to exactly that before
# its center crop (RECIPE), so cached evaluation differs from uncached only by rounding to uint8.
DEFAULT_SIDE_RATIO = pipeline.EVAL_RESIZE_RATIO
# Part of every entry's key: change it when `_encode` or the layout changes, so old entries are not
# reused; `cache_entry.CACHE_ENTRY_MAGIC` ends with it, so one found under a new name is refused too.
_ENTRY_FORMAT = 2
# The start of the line in the message of a pipeline's error about a damaged entry.
DAMAGED_ENTRY = cache_entry.DAMAGED_ENTRY
_DAMAGED_ENTRY_PATH = re.compile(re.escape(DAMAGED_ENTRY) + " (.+?" + re.escape(cache_entry.CACHED_IMAGE_SUFFIX) + "): ")
# Entries known to be on disk, per cache directory, shared by every `ImageCache` of that directory
# in this process (training's and evaluation's share --cache_dir): when one of them finds the
# directory gone, the others forget their entries too.
_KNOWN_ENTRIES = {}


def damaged_entry_of(message):
    """The entry named by the message of a pipeline's error about a damaged entry.

    Args:
        message: the message (or the exception) of an error raised while reading an `ImageCache`.

    Returns:
        The entry's path, or None if the message names no damaged entry.
    """
    match = _DAMAGED_ENTRY_PATH.search(str(message))
    if not match:
        return None
    # The in-graph check C-escapes the path (and eager tensors print it as a bytes literal).
    return codecs.escape_decode(match.group(1).encode("utf-8"))[0].decode("utf-8", "replace")


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
        # Entries seen on disk or written in this process: training's start-up check and the split
        # it then reads look each image up once on (possibly remote) storage, not twice.
        key = directory if "://" in directory else os.path.abspath(directory)
        self._existing = _KNOWN_ENTRIES.setdefault(key, set())

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

    def rebuild(self, paths, progress=True, max_pixels=image_header.DEFAULT_MAX_PIXELS):
        """Writes the entries of the image files `paths` anew, whether or not they exist.

        For entries found damaged (`entry_problem`, `damaged_entry_of`): each is rewritten from
        its image as `cached_paths` writes a missing one. The entry of an image that no longer
        decodes (or is gone) is removed, so that it is not read again.

        Args:
            paths: image files, as given to `cached_paths`.
            progress: show a progress bar.
            max_pixels: an image over this many pixels is not decoded (`--max_pixels`).

        Returns:
            The paths whose image could not be read or decoded (they have no entry now).
        """
        entries, unreadable = {}, []
        for path in paths:
            try:
                entries[path] = self.entry_path(path)
            except tf.errors.OpError:  # the image is gone: its entry's name (which needs its stat) too
                unreadable.append(path)
        self._forget_if_gone()
        failed = self._build(list(entries), list(entries.values()), progress, max_pixels) if entries else []
        for path in failed:
            self._existing.discard(entries[path])
            if tf.io.gfile.exists(entries[path]):
                tf.io.gfile.remove(entries[path])
        failed_set = set(failed)
        self._existing.update(entry for path, entry in entries.items() if path not in failed_set)
        return unreadable + failed

    def entry_problem(self, entry):
        """What `cache_entry.read_cached_image` would find wrong with an entry, checked the same way.

        Args:
            entry: an entry's path (from `entry_path`, `cached_paths` or `damaged_entry_of`).

        Returns:
            None for a sound entry, else what is wrong, in the words of the reader's message:
            "missing", "unreadable (...)", "not an image cache entry of format 2 (...)", "cut short
            (...)", "too long (...)", "wrong checksum (...)" or "belongs to another image (...)".
        """
        try:
            with tf.io.gfile.GFile(entry, "rb") as file:
                contents = file.read()
        except tf.errors.NotFoundError:
            return "missing"
        except tf.errors.OpError as error:
            return f"unreadable ({error.message})"
        return cache_entry.cache_entry_problem(contents, entry)

    def forget(self):
        """Forgets which entries exist (for every `ImageCache` of this directory in this process), so
        that the next `cached_paths` or `check_and_build` looks each one up again and rebuilds those
        gone. That call does so by itself when the directory is gone; this is for a directory
        removed and made again by another process, or for entries removed one by one."""
        self._existing.clear()

    def _forget_if_gone(self):
        """`forget`s the entries known to exist if the cache directory is gone (one look-up)."""
        if self._existing and not tf.io.gfile.isdir(self.directory):
            logging.warning("Image cache %s: the directory is gone; its entries are rebuilt.", self.directory)
            self.forget()

    def _build_missing(self, paths, progress, max_pixels):
        """(the entry of every path, an `ImageCheck` of building the missing ones)."""
        start = time.perf_counter()
        self._forget_if_gone()
        entries, gone = [], []
        for path in paths:
            try:
                entries.append(self.entry_path(path))
            except tf.errors.NotFoundError:  # listed by the dataset, but not on disk: a bad image
                entries.append(None)
                gone.append(path)
        missing = [i for i, entry in enumerate(entries)
                   if entry is not None and entry not in self._existing and not tf.io.gfile.exists(entry)]
        failed = list(gone)
        if missing:
            logging.info("Image cache %s: decoding %d of %d images (shorter side <= %d px)",
                         self.directory, len(missing), len(paths), self.short_side)
            failed += self._build([paths[i] for i in missing], [entries[i] for i in missing], progress,
                                  max_pixels)
        # Only now: a build that stops half way must not leave unwritten entries marked as there.
        unwritten = set(failed)
        self._existing.update(entry for path, entry in zip(paths, entries) if path not in unwritten and entry)
        problems = [(path, image_check.image_problem(path, max_pixels) or image_check.Problem("unreadable"))
                    for path in failed]
        return entries, image_check.ImageCheck.of_problems(len(missing) + len(gone), problems,
                                                           time.perf_counter() - start)

    def entry_path(self, path):
        """Where the entry of the image file `path` is (whether or not it exists yet).

        Raises:
            tf.errors.NotFoundError: there is no file at `path` (its size and time are in the key).
        """
        path = _absolute(path)
        stat = tf.io.gfile.stat(path)
        key = f"{_ENTRY_FORMAT}\0{path}\0{stat.length}\0{stat.mtime_nsec}\0{self.short_side}".encode("utf-8")
        digest = hashlib.sha1(key).hexdigest()
        # Two-level fan-out keeps directories small for datasets of 100k+ images (SOP). The reader
        # checks the entry against this name: `ab/cdef...` is the digest written in the entry.
        return os.path.join(self.directory, digest[:2], digest[2:] + cache_entry.CACHED_IMAGE_SUFFIX)

    def _build(self, paths, entries, progress, max_pixels):
        """Writes the entry of every image that decodes; returns the paths of those that do not."""
        indices = tf.range(len(paths), dtype=tf.int64)
        encoded = tf.data.Dataset.from_tensor_slices((indices, tf.constant(list(paths), tf.string))).map(
            lambda index, path: (index, self._encode(path, max_pixels)),
            num_parallel_calls=pipeline.PARALLEL_CALLS, deterministic=True,
        ).ignore_errors()  # the indices missing from the output are the images that failed
        encoded = encoded.prefetch(pipeline.PREFETCH_BATCHES).with_options(pipeline.dataset_options())
        bar = keras.utils.Progbar(len(paths), unit_name="image") if progress else None
        written = set()
        for index, pixels in encoded.as_numpy_iterator():
            entry = entries[index]
            # The digest is the entry's name (`entry_path`), which the reader checks it against.
            digest = os.path.basename(os.path.dirname(entry)) + os.path.basename(entry).split(".")[0]
            try:
                write_atomic(entry, cache_entry.cache_entry(pixels, digest, _absolute(paths[index])))
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
        """The pixels of the image file `path`, downsized to the cache's side, as uint8."""
        image = pipeline.decode_image(path, max_pixels)
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = tf.minimum(1.0, self.short_side / tf.reduce_min(shape))
        target = tf.cast(tf.round(shape * scale), tf.int32)
        image = tf.cond(
            scale < 1.0,
            lambda: tf.image.resize(image, target, method="bilinear", antialias=True),
            lambda: image,
        )
        return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _absolute(path):
    """`path` made absolute, unless it is a URL (gs://...)."""
    return path if "://" in path else os.path.abspath(path)
