"""Checking images before training: every file is decoded once with the pipeline's own decoder.

TensorFlow's decoder (the one training uses) reads JPEG (greyscale and CMYK too), PNG (8 and 16
bit, palette, alpha), GIF (first frame), BMP and WebP. A file it rejects (empty, truncated, not an
image) would otherwise stop training hours in, or be silently dropped by a tolerant pipeline. An
image whose header gives more than `max_pixels` pixels is refused undecoded, as the pipeline
refuses it (`pnpp_tf.data.image_header`).
"""

import concurrent.futures
import dataclasses
import re
import time

import keras
import tensorflow as tf
from absl import logging

from pnpp_tf.data import image_header, pipeline
from pnpp_tf.errors import UserError

ON_BAD_IMAGE = ("error", "skip")


@dataclasses.dataclass
class ImageCheck:
    """The outcome of decoding a list of files."""

    checked: int
    bad: list  # [(path, reason)], the images over the pixel budget included
    seconds: float
    too_large: list = dataclasses.field(default_factory=list)  # the paths of `bad` over max_pixels

    @property
    def seconds_per_thousand(self):
        return 1000.0 * self.seconds / max(self.checked, 1)

    @classmethod
    def of_problems(cls, checked, problems, seconds):
        """An `ImageCheck` from [(path, `image_problem`'s answer)] for the files checked."""
        problems = [(path, problem) for path, problem in problems if problem]
        return cls(checked, [(path, problem.reason) for path, problem in problems], seconds,
                   [path for path, problem in problems if problem.too_large])


@dataclasses.dataclass(frozen=True)
class Problem:
    """Why an image file cannot be used: the reason, and whether it is its size (max_pixels)."""

    reason: str
    too_large: bool = False


def check_images(paths, threads=8, progress=False, max_pixels=image_header.DEFAULT_MAX_PIXELS):
    """Decodes every file as training would and collects the ones that fail.

    Args:
        paths: image file paths.
        threads: files decoded at once (TensorFlow's decoders release the GIL).
        progress: show a progress bar.
        max_pixels: a file whose header gives more pixels fails, without being decoded.

    Returns:
        An `ImageCheck`.
    """
    _decoded_size.get_concrete_function()  # traced once here: threads calling it first would each trace it
    start = time.perf_counter()
    bar = keras.utils.Progbar(len(paths), unit_name="image") if progress and paths else None
    problems = []
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        answers = pool.map(lambda path: image_problem(path, max_pixels), paths)
        for done, (path, problem) in enumerate(zip(paths, answers), start=1):
            problems.append((path, problem))
            if bar and (done % 200 == 0 or done == len(paths)):
                bar.update(done)
    return ImageCheck.of_problems(len(paths), problems, time.perf_counter() - start)


def check_on_bad_image(on_bad_image):
    """Raises `UserError` unless `on_bad_image` is one of `ON_BAD_IMAGE`."""
    if on_bad_image not in ON_BAD_IMAGE:
        raise UserError(f"--on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}.")


def drop_or_raise(split, name, on_bad_image, progress=False, check=check_images,
                  max_pixels=image_header.DEFAULT_MAX_PIXELS):
    """Checks a split's images; with "skip" returns the split without the bad ones.

    Args:
        split: a `pnpp_tf.data.Split`.
        name: the split's name, for messages.
        on_bad_image: "error" (raise, naming the files) or "skip" (drop them, logging each once).
        progress: show a progress bar.
        check: `(paths, progress=..., max_pixels=...) -> ImageCheck`: `check_images`, or an image
            cache's `ImageCache.check_and_build`, which decodes each image once, into the cache.
        max_pixels: the pixel budget (`--max_pixels`): a larger image counts as a bad one.

    Returns:
        (the split, possibly smaller; the list of skipped paths).
    """
    check_on_bad_image(on_bad_image)
    result = check(split.paths, progress=progress, max_pixels=max_pixels)
    logging.info("%s: decoded %d images in %.1f s (%.2f s per 1000)", name, result.checked,
                 result.seconds, result.seconds_per_thousand)
    if not result.bad:
        return split, []
    if on_bad_image == "error":
        raise UserError(bad_images_message(result.bad, result.too_large, name))
    warn_skipped(result.bad, result.too_large)
    bad_paths = {path for path, _ in result.bad}
    return without_bad(split, name, bad_paths), sorted(bad_paths)


def without_bad(split, name, bad_paths):
    """`split` without the images of `bad_paths`.

    Raises:
        UserError: leaving them out empties a class of the split (`name`, for the message).
    """
    kept = split.without(bad_paths)
    emptied = sorted(set(split.labels.tolist()) - set(kept.labels.tolist()))
    if emptied:
        raise UserError(f"Skipping unreadable images empties {len(emptied)} class(es) of {name} "
                         f"({', '.join(split.class_names[c] for c in emptied[:5])}); fix those files.")
    return kept


def warn_skipped(bad, too_large, shown=None):
    """Logs each skipped image of `bad` [(path, reason)] (the first `shown`, then how many more),
    saying which are over --max_pixels (`too_large`, paths)."""
    too_large = set(too_large)
    for path, reason in bad[:shown]:
        if path in too_large:
            logging.warning("Skipping image %s, over --max_pixels (%s)", path, reason)
        else:
            logging.warning("Skipping unreadable image %s (%s)", path, reason)
    if shown is not None and len(bad) > shown:
        logging.warning("... and %d more images skipped", len(bad) - shown)


def bad_images_message(bad, too_large, name):
    """The one-line error for the bad images of a split: how many, the first three, what to do.

    Args:
        bad: [(path, reason)].
        too_large: the paths of `bad` over --max_pixels.
        name: the split's name.
    """
    shown = "; ".join(f"{path} ({reason})" for path, reason in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    large = len(too_large)
    kind = ("unreadable" if not large else "too large" if large == len(bad)
            else f"unreadable or too large ({large} over --max_pixels)")
    shrink = ", shrink them, raise --max_pixels" if large else ""
    return (f"{len(bad)} {kind} image(s) in {name}: {shown}{more}. Replace or remove them{shrink}, "
            "or pass --on_bad_image=skip to go on without them.")


def image_problem(path, max_pixels=image_header.DEFAULT_MAX_PIXELS):
    """None if `path` decodes as the pipeline decodes it (within `max_pixels`), else a `Problem`."""
    try:
        contents = tf.io.read_file(path)
    except tf.errors.NotFoundError:
        return Problem("file not found")
    except tf.errors.OpError as error:  # e.g. a directory, or a loop of symbolic links
        return Problem(_first_line(error.message, path))
    if int(tf.strings.length(contents)) == 0:
        return Problem("empty file")
    try:
        _decoded_size(contents, tf.cast(max_pixels, tf.int64))
    except tf.errors.OpError:
        return _explain(contents, max_pixels)
    return None


def decode_problem(path, max_pixels=image_header.DEFAULT_MAX_PIXELS):
    """None if `path` decodes as the pipeline decodes it, else the reason it does not."""
    problem = image_problem(path, max_pixels)
    return problem.reason if problem else None


# One traced call per file: eagerly, the header's ops alone take ten times a small image's decode.
@tf.function(input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int64)], autograph=False)
def _decoded_size(contents, max_pixels):
    return tf.size(pipeline.decode_image_bytes(contents, max_pixels), out_type=tf.int64)


def _explain(contents, max_pixels):
    """The `Problem` of `contents`, which failed to decode: a traced function's error buries the
    reason, so the header and then the decoder are asked again, eagerly."""
    try:
        refuse, too_large, reason = image_header.header_problem(contents, max_pixels)
        if bool(refuse):
            return Problem(reason.numpy().decode("utf-8"), bool(too_large))
        pipeline.decode_image_bytes(contents, max_pixels)
    except tf.errors.OpError as error:
        return Problem(_first_line(error.message))
    return Problem("undecodable")


def _first_line(message, path=None):
    lines = [line for line in str(message).splitlines() if line.strip()]
    # TF prefixes messages with the op's name in braces; the reason follows it.
    text = lines[0] if lines else "undecodable"
    text = re.sub(r"\s*\[Op:\w+\].*$", "", text.split("}} ", 1)[-1].strip())
    # File errors start with the path, which the caller shows already.
    return text[len(path) + 2:] if path and text.startswith(f"{path}; ") else text
