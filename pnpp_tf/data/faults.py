"""Images that stop reading while a run goes on: named, then skipped or stopped on.

    faults = ImageFaults(fingerprint, on_bad_image="skip", max_pixels=...)
    faults.register("train", split.paths, source_paths, cache)    # what the pipeline reads
    try:
        model.fit(dataset)
    except tf.errors.OpError as error:
        left_out = faults.bad_images(error, split.paths, "training")  # or UserError, or `error`

A tf.data pipeline that meets a file it cannot read stops with an error that may not name the
file ("Input is empty"), and the decoders' messages never say what to do. The run's fingerprint
(`pnpp_tf.data.fingerprint`) knows every file's size and modification time when the run started,
so the files that changed since are the suspects: each is decoded again, and those that no longer
decode (or are gone) are the bad images. A damaged or missing image cache entry whose image still
decodes is not the user's problem: it is rebuilt and the pipeline can simply start again.
"""

from typing import NamedTuple

import numpy as np
import tensorflow as tf
from absl import logging

from pnpp_tf.data import cache as image_cache, image_check
from pnpp_tf.errors import UserError

SHOWN = 3


class _Repairs(NamedTuple):
    """Cache entries rebuilt from their images, and those whose image could not rebuild them."""

    entries: set
    failed: set


class ImageFaults:
    """Finds which images broke a pipeline mid-run and applies `--on_bad_image` to them.

    Args:
        fingerprint: the run's `pnpp_tf.data.fingerprint.DataFingerprint`, taken at its start.
        on_bad_image: "error" (stop, naming the images) or "skip" (leave them out, reported).
        max_pixels: the pixel budget an image must keep to.
        skipped: images an earlier process of the same run skipped mid-run (from its checkpoint),
            as [{"split", "path", "reason"}].

    Attributes:
        skipped: every image skipped mid-run, [{"split", "path", "reason"}], for results.json.
    """

    def __init__(self, fingerprint, on_bad_image, max_pixels, skipped=()):
        image_check.check_on_bad_image(on_bad_image)
        self.fingerprint = fingerprint
        self.on_bad_image = on_bad_image
        self.max_pixels = max_pixels
        self.skipped = [dict(item) for item in skipped]
        self._source = {}  # what a pipeline reads -> (split name, the image file)
        self._cache = {}  # a cache entry a pipeline reads -> its `ImageCache`

    def register(self, split_name, read_paths, source_paths=None, cache=None):
        """Tells which image file (of split `split_name`) each of `read_paths` reads: itself, or,
        for `ImageCache` entries, the aligned `source_paths` through `cache`."""
        source_paths = read_paths if source_paths is None else source_paths
        if len(source_paths) != len(read_paths):
            raise ValueError(f"{len(read_paths)} paths read but {len(source_paths)} image files.")
        for read, source in zip(read_paths, source_paths):
            self._source[read] = (split_name, source)
            if cache is not None:
                self._cache[read] = cache

    def bad_images(self, error, read_paths, during, failed=()):
        """The paths of `read_paths` to leave out after `error` stopped a pipeline reading them.

        Cache entries that are damaged or gone while their image still decodes are rebuilt first;
        the answer is then empty, and the pipeline only needs to start again.

        Args:
            error: the `tf.errors.OpError` the pipeline raised; or, for a pass that left out what
                it could not read (`pnpp_tf.retrieval.embed.ImageEmbedder.embed_files`), an
                exception saying so, raised when no image explains it.
            read_paths: what the pipeline reads (image files or cache entries), all registered.
            during: what was going on, for the message, e.g. "training (epoch 3, step 2); the
                last checkpoint, runs/a/checkpoints/ckpt-8, is intact".
            failed: those of `read_paths` known to have failed (left out by such a pass): looked
                at as if `error` named them.

        Returns:
            The bad paths of `read_paths` (with "skip"), each recorded in `skipped`.

        Raises:
            UserError: with "error", one line naming the bad images and what to do.
            `error` itself (a `tf.errors.OpError`, or what the caller gave), when no image
                explains it.
        """
        message = str(getattr(error, "message", error))
        failed = set(failed)
        named = [read for read in read_paths if read in failed or read in message]
        problems = self._source_problems(message, read_paths, named)
        rebuilt = self._repair_entries(message, read_paths, problems, named)
        bad = [read for read in read_paths if self._source[read][1] in problems
               and (read not in self._cache or read in rebuilt.failed)]
        if not bad and not rebuilt.entries:
            raise error
        if not bad:
            return []
        shown = "; ".join(f"{self._source[read][1]} ({problems[self._source[read][1]]})" for read in bad[:SHOWN])
        more = f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        if self.on_bad_image == "error":
            raise UserError(f"{len(bad)} image(s) stopped reading during {during}: {shown}{more}. Restore them and "
                            "rerun to resume (with --accept_data_change if their times changed), or rerun with "
                            "--on_bad_image=skip --accept_data_change to go on without them.")
        for read in bad:
            split, source = self._source[read]
            logging.warning("Skipping %s image %s from now on: %s", split, source, problems[source])
            self.skipped.append({"split": split, "path": source, "reason": problems[source]})
        return bad

    def skipped_paths(self):
        return [item["path"] for item in self.skipped]

    def _source_problems(self, message, read_paths, named):
        """{image file: why it no longer reads} for the files among `read_paths`' images that
        changed since the fingerprint was taken, that `message` names or whose `named` read
        paths do."""
        sources = {}
        for read in read_paths:
            split, source = self._source[read]
            sources.setdefault(split, []).append(source)
        suspects = {source for names in sources.values() for source in names if source in message}
        suspects.update(self._source[read][1] for read in named)
        for split, names in sources.items():
            recorded = self.fingerprint.splits.get(split)
            changed = recorded.changed_files(names) if recorded else [(name, "") for name in names]
            suspects.update(path for path, _ in changed)
        problems = {}
        for source in sorted(suspects):
            problem = image_check.image_problem(source, self.max_pixels)
            if problem:
                problems[source] = problem.reason
        return problems

    def _repair_entries(self, message, read_paths, problems, named):
        """Rebuilds the damaged or missing cache entries among `read_paths` from their images
        (those `message` or `named` names are checked whole, the others for being there)."""
        if not any(read in self._cache for read in read_paths):
            return _Repairs(set(), set())
        named = set(named) | {image_cache.damaged_entry_of(message)}
        damaged = {}
        for read in read_paths:
            cache = self._cache.get(read)
            if cache is None:
                continue
            problem = cache.entry_problem(read) if read in named else None
            if problem is None and not tf.io.gfile.exists(read):
                problem = "missing"
            if problem:
                damaged[read] = problem
        failed = set()
        by_cache = {}
        for read in damaged:
            by_cache.setdefault(id(self._cache[read]), (self._cache[read], []))[1].append(read)
        for cache, entries in by_cache.values():
            sources = [self._source[read][1] for read in entries]
            for read, source in zip(entries, sources):
                logging.warning("Image cache entry %s of %s is %s: rebuilding it.", read, source, damaged[read])
            gone = set(cache.rebuild([s for s in sources if s not in problems], progress=False,
                                     max_pixels=self.max_pixels))
            failed.update(read for read, source in zip(entries, sources) if source in problems or source in gone)
        return _Repairs(set(damaged) - failed, failed)


def stand_ins(split, bad):
    """What a pipeline reads for `split` once the images of `bad` are left out: each is replaced by
    the next image of its class (in the split's order, wrapping round) that is not bad, so that
    batches keep their classes and sizes.

    Args:
        split: a `pnpp_tf.data.Split`.
        bad: a set of paths of `split`.

    Returns:
        A list aligned with `split.paths`.

    Raises:
        UserError: every image of a class is bad.
    """
    paths, labels = split.paths, np.asarray(split.labels)
    read = list(paths)
    for index, path in enumerate(paths):
        if path not in bad:
            continue
        members = np.flatnonzero(labels == labels[index])
        order = np.roll(members, -int(np.searchsorted(members, index)))
        stand_in = next((paths[i] for i in order if paths[i] not in bad), None)
        if stand_in is None:
            raise UserError(f"Every training image of class {split.class_names[labels[index]]} has stopped reading "
                            f"(the last: {path}); restore them, and rerun to resume from the last checkpoint.")
        read[index] = stand_in
    return read
