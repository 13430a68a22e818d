"""Checking images before training: every file is decoded once with the pipeline's own decoder.

TensorFlow's decoder (the one training uses) reads JPEG (greyscale and CMYK too), PNG (8 and 16
bit, palette, alpha), GIF (first frame), BMP and WebP. A file it rejects (empty, truncated, not an
image) would otherwise stop training hours in, or be silently dropped by a tolerant pipeline.
"""

import concurrent.futures
import dataclasses
import time

import keras
import tensorflow as tf
from absl import logging

from pnpp_tf.data import pipeline

ON_BAD_IMAGE = ("error", "skip")


@dataclasses.dataclass
class ImageCheck:
    """The outcome of decoding a list of files."""

    checked: int
    bad: list  # [(path, reason)]
    seconds: float

    @property
    def seconds_per_thousand(self):
        return 1000.0 * self.seconds / max(self.checked, 1)


def check_images(paths, threads=8, progress=False):
    """Decodes every file as training would and collects the ones that fail.

    Args:
        paths: image file paths.
        threads: files decoded at once (TensorFlow's decoders release the GIL).
        progress: show a progress bar.

    Returns:
        An `ImageCheck`.
    """
    start = time.perf_counter()
    bar = keras.utils.Progbar(len(paths), unit_name="image") if progress and paths else None
    bad = []
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for done, (path, reason) in enumerate(zip(paths, pool.map(decode_problem, paths)), start=1):
            if reason:
                bad.append((path, reason))
            if bar and (done % 200 == 0 or done == len(paths)):
                bar.update(done)
    return ImageCheck(len(paths), bad, time.perf_counter() - start)


def drop_or_raise(split, name, on_bad_image, progress=False, check=check_images):
    """Checks a split's images; with "skip" returns the split without the bad ones.

    Args:
        split: a `pnpp_tf.data.Split`.
        name: the split's name, for messages.
        on_bad_image: "error" (raise, naming the files) or "skip" (drop them, logging each once).
        progress: show a progress bar.
        check: `(paths, progress=...) -> ImageCheck`: `check_images`, or an image cache's
            `ImageCache.check_and_build`, which decodes each image once, into the cache.

    Returns:
        (the split, possibly smaller; the list of skipped paths).
    """
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"--on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}.")
    result = check(split.paths, progress=progress)
    logging.info("%s: decoded %d images in %.1f s (%.2f s per 1000)", name, result.checked,
                 result.seconds, result.seconds_per_thousand)
    if not result.bad:
        return split, []
    if on_bad_image == "error":
        shown = "; ".join(f"{path} ({reason})" for path, reason in result.bad[:3])
        more = f" and {len(result.bad) - 3} more" if len(result.bad) > 3 else ""
        raise ValueError(f"{len(result.bad)} unreadable image(s) in {name}: {shown}{more}. Replace or "
                         "remove them, or pass --on_bad_image=skip to train without them.")
    for path, reason in result.bad:
        logging.warning("Skipping unreadable image %s (%s)", path, reason)
    bad_paths = {path for path, _ in result.bad}
    keep = [path not in bad_paths for path in split.paths]
    kept = dataclasses.replace(split, paths=[p for p, k in zip(split.paths, keep) if k],
                               labels=split.labels[keep])
    emptied = sorted(set(split.labels.tolist()) - set(kept.labels.tolist()))
    if emptied:
        raise ValueError(f"Skipping unreadable images empties {len(emptied)} class(es) of {name} "
                         f"({', '.join(split.class_names[c] for c in emptied[:5])}); fix those files.")
    return kept, sorted(bad_paths)


def decode_problem(path):
    """None if `path` decodes as the pipeline decodes it, else the reason it does not."""
    try:
        contents = tf.io.read_file(path)
        if int(tf.strings.length(contents)) == 0:
            return "empty file"
        pipeline.decode_image_bytes(contents)
    except tf.errors.NotFoundError:
        return "file not found"
    except tf.errors.InvalidArgumentError as error:
        return _first_line(error.message)
    return None


def _first_line(message):
    lines = [line for line in str(message).splitlines() if line.strip()]
    # TF prefixes messages with the op's name in braces; the reason follows it.
    text = lines[0] if lines else "undecodable"
    return text.split("}} ", 1)[-1].strip()
