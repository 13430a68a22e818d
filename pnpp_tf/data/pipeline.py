"""tf.data input: decoding, augmentation, class-balanced batches and evaluation batches.

Everything XLA cannot compile (file reads, decoding, crop sampling) happens here, outside the
compiled train step. Images leave the pipeline as float32 RGB in [0, 255]; the embedder
normalises them for its backbone. Every image file is decoded by `decode_image_bytes`, which
reads the size from the file header first and refuses an image of more than `max_pixels` pixels.
"""

import os

import numpy as np
import tensorflow as tf

from pnpp_tf.data.cache_entry import CACHED_IMAGE_SUFFIX, read_cached_image
from pnpp_tf.data.image_header import DEFAULT_MAX_PIXELS, header_problem
from pnpp_tf.errors import UserError

# RECIPE: RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)); test: resize to 288, crop 256.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10  # torchvision's
EVAL_RESIZE_RATIO = 288.0 / 256.0

# Fixed parallelism instead of tf.data's autotuner. With TF 2.21, destroying an autotuned iterator
# can block for as long as the autotuner's current sleep (its period doubles up to 60 s): the
# destructor cancels, then joins the autotuner thread, and the cancellation callback can wake that
# thread before the cancelled flag is set, so it sleeps on (tensorflow/core/framework/model.cc
# OptimizeLoop; tsl CancellationManager::StartCancelWithStatus runs callbacks first). fit() and
# every evaluation destroy an iterator; stalls of 1-8 s were measured here. No tf.data option
# avoids it while the autotuner runs, and on these decode-and-crop pipelines the autotuner, a
# private thread pool and max_intra_op_parallelism=1 all measured within noise of this setting.
PARALLEL_CALLS = os.cpu_count() or 1
PREFETCH_BATCHES = 2


SAMPLERS = ("balanced", "random")


def make_sampler(kind, labels, batch_size, classes_per_batch, seed=0):
    """The `--sampler` of the training batches.

    Args:
        kind: "balanced" (`ClassBalancedSampler`, ProxyNCA++) or "random" (`RandomSampler`, the
            ablation: batches without class structure).
        labels: integer label of every training image.
        batch_size: images per batch.
        classes_per_batch: distinct classes per batch ("balanced" only).
        seed: integer seed.
    """
    if kind == "balanced":
        return ClassBalancedSampler(labels, batch_size, classes_per_batch, seed)
    if kind == "random":
        return RandomSampler(len(labels), batch_size, seed)
    raise UserError(f"--sampler must be one of {SAMPLERS}, got {kind!r}.")


class RandomSampler:
    """Batches of images drawn without regard to class: each epoch is a fresh permutation.

    Same interface as `ClassBalancedSampler`; an epoch has `num_images // batch_size` batches (at
    least one; a dataset smaller than a batch repeats images).

    Args:
        num_images: size of the training set.
        batch_size: images per batch.
        seed: integer seed.
    """

    def __init__(self, num_images, batch_size, seed=0):
        if batch_size < 1 or num_images < 1:
            raise UserError(f"--batch_size={batch_size} and the {num_images} training images must be positive.")
        self.num_images = num_images
        self.batch_size = batch_size
        self.num_batches = max(1, num_images // batch_size)
        self.seed = seed

    def epoch_batches(self, epoch):
        """Image indices of one epoch's batches, shape [num_batches, batch_size]."""
        rng = np.random.default_rng([self.seed, epoch])
        needed = self.num_batches * self.batch_size
        repeats = -(-needed // self.num_images)
        order = np.concatenate([rng.permutation(self.num_images) for _ in range(repeats)])
        return order[:needed].reshape(self.num_batches, self.batch_size)


class ClassBalancedSampler:
    """Draws batches of `classes_per_batch` distinct classes, `batch_size / classes_per_batch`
    images each.

    Classes are drawn uniformly without replacement within a batch. Each class's images come from
    its own shuffled queue, reshuffled when fewer images are left than a batch takes (those are
    left out until the next pass), so that a batch repeats an image only when its class has fewer
    images than a batch takes. An epoch has `len(labels) // batch_size` batches (at least one).
    The queues carry over from one epoch to the next, as in the authors' sampler, yet batches
    depend only on (seed, epoch): any epoch can be regenerated, e.g. when resuming, by replaying
    the sampling of the epochs before it (about 80 ms an epoch at SOP's size; consecutive epochs replay nothing).

    Args:
        labels: integer label of every training image.
        batch_size: images per batch.
        classes_per_batch: distinct classes per batch.
        seed: integer seed.
    """

    def __init__(self, labels, batch_size, classes_per_batch, seed=0):
        labels = np.asarray(labels)
        if batch_size < 1 or classes_per_batch < 1:
            raise UserError(
                f"--batch_size={batch_size} and --classes_per_batch={classes_per_batch} must be positive."
            )
        if batch_size % classes_per_batch:
            raise UserError(
                f"--batch_size={batch_size} is not divisible by --classes_per_batch={classes_per_batch}; "
                "every class in a batch gets the same number of images."
            )
        classes = np.unique(labels)
        if classes_per_batch > len(classes):
            raise UserError(
                f"--classes_per_batch={classes_per_batch} exceeds the {len(classes)} training classes."
            )
        self.batch_size = batch_size
        self.classes_per_batch = classes_per_batch
        self.images_per_class = batch_size // classes_per_batch
        self.num_batches = max(1, len(labels) // batch_size)
        self.seed = seed
        self._members = [np.flatnonzero(labels == c) for c in classes]
        self._carried = None  # (epoch, queues, cursors) as that epoch starts

    def epoch_batches(self, epoch):
        """Image indices of one epoch's batches, shape [num_batches, batch_size]."""
        if self._carried is not None and self._carried[0] <= epoch:
            first, queues, cursors = self._carried
            queues, cursors = list(queues), cursors.copy()
        else:
            first, queues, cursors = 0, None, np.zeros(len(self._members), dtype=np.int64)
        # Earlier epochs are replayed for their queues; consecutive calls replay nothing.
        for e in range(first, epoch + 1):
            rng = np.random.default_rng([self.seed, e])
            if queues is None:
                queues = [rng.permutation(members) for members in self._members]
            batches = np.empty((self.num_batches, self.batch_size), dtype=np.int64)
            for b in range(self.num_batches):
                chosen = rng.choice(len(queues), self.classes_per_batch, replace=False)
                batches[b] = np.concatenate([self._take(queues, cursors, c, rng) for c in chosen])
        self._carried = (epoch + 1, list(queues), cursors.copy())
        return batches

    def _take(self, queues, cursors, c, rng):
        queue = queues[c]
        if len(queue) >= self.images_per_class:
            # As the authors' BalancedBatchSampler: a class whose queue has too few images left
            # for a batch is reshuffled, leaving those out, so that no batch repeats an image.
            if cursors[c] + self.images_per_class > len(queue):
                queues[c] = queue = rng.permutation(queue)
                cursors[c] = 0
            cursors[c] += self.images_per_class
            return queue[cursors[c] - self.images_per_class:cursors[c]]
        # Fewer images than a batch takes: all of them, topped up from the next reshuffles.
        taken = []
        while len(taken) < self.images_per_class:
            if cursors[c] == len(queues[c]):
                queues[c] = rng.permutation(queues[c])
                cursors[c] = 0
            n = min(self.images_per_class - len(taken), len(queues[c]) - cursors[c])
            taken.extend(queues[c][cursors[c]:cursors[c] + n])
            cursors[c] += n
        return np.asarray(taken, dtype=np.int64)


def train_dataset(paths, labels, sampler, image_size, epochs, first_epoch=0, seed=0, flip=True,
                  num_replicas=1, pipeline_index=0, num_pipelines=1, first_step=0,
                  max_pixels=DEFAULT_MAX_PIXELS):
    """Class-balanced, augmented training batches for `epochs` epochs.

    Args:
        paths: image paths.
        labels: integer labels, aligned with paths.
        sampler: a `ClassBalancedSampler` or `RandomSampler` over `labels`.
        image_size: output side in pixels.
        epochs: number of epochs the dataset covers; use `steps_per_epoch=sampler.num_batches`.
        first_epoch: epoch number of the first batch (continues the sampler across fit calls).
        seed: seed of the augmentation (crop and flip are stateless: a function of seed and position).
        flip: random horizontal flips (off for data where mirroring changes the class, e.g. glyphs).
        num_replicas: replicas sharing each global batch; batches are per replica (B / num_replicas).
        pipeline_index: which input pipeline (worker) this is, of `num_pipelines`; it keeps the
            contiguous slice of every global batch that belongs to its replicas.
        num_pipelines: number of input pipelines.
        first_step: batches of the first epoch to leave out (resuming mid-epoch).
        max_pixels: an image file whose header gives more pixels stops the dataset with an
            `InvalidArgumentError` naming it, undecoded (`decode_image_bytes`): the start-up check
            should have left it out, but the file may have changed since.

    Returns:
        A `tf.data.Dataset` of (images [b, S, S, 3] float32 in [0, 255], labels [b] int32), with
        b = B / num_replicas.
    """
    width = sampler.batch_size // num_pipelines
    columns = slice(pipeline_index * width, (pipeline_index + 1) * width)
    # This pipeline's images only, as int32: SOP's 80 epochs of indices take 19 MB.
    order = np.concatenate([sampler.epoch_batches(e)[:, columns].astype(np.int32)
                            for e in range(first_epoch, first_epoch + epochs)])[first_step:].reshape(-1)
    # The position of an image in the whole run's stream of global batches seeds its augmentation,
    # so an image is cropped alike however the batch is split among replicas and workers.
    first_row = first_epoch * sampler.num_batches + first_step
    first_column = pipeline_index * width

    def position(i):
        return (first_row + i // width) * sampler.batch_size + first_column + i % width

    path_table = tf.constant(list(paths))
    label_table = tf.constant(np.asarray(labels, dtype=np.int32))
    read = _image_reader(paths, max_pixels)

    def load(i, index):
        crop_seed, flip_seed = tf.unstack(
            tf.random.experimental.stateless_split(tf.stack([tf.cast(seed, tf.int64), position(i)]), 2)
        )
        image = random_resized_crop(read(tf.gather(path_table, index)), image_size, crop_seed)
        if flip:
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        return image, tf.gather(label_table, index)

    dataset = tf.data.Dataset.from_tensor_slices(order).enumerate()
    dataset = dataset.map(load, num_parallel_calls=PARALLEL_CALLS, deterministic=True)
    per_replica = sampler.batch_size // num_replicas
    dataset = dataset.batch(per_replica, drop_remainder=True).prefetch(PREFETCH_BATCHES)
    return dataset.with_options(dataset_options())


def eval_dataset(paths, image_size, batch_size=64, max_pixels=DEFAULT_MAX_PIXELS, skip_unreadable=False):
    """Batches of evaluation images (resize shorter side, center crop), in the order of `paths`.

    Args:
        paths: image file paths (or `ImageCache` entries, all of them).
        image_size: side of the square crops.
        batch_size: images per batch (the last one may be smaller).
        max_pixels: an image file over this many pixels stops the dataset undecoded, as in
            `train_dataset` (or, with `skip_unreadable`, is left out undecoded).
        skip_unreadable: leave out every image that cannot be read, decoded or cropped instead of
            stopping, and give each batch's positions in `paths`, so that a caller decoding each
            image once (`pnpp_tf.retrieval.embed.ImageEmbedder.embed_files`) can tell which were
            left out.

    Returns:
        A `tf.data.Dataset` of float32 images [B, S, S, 3] in [0, 255]; with `skip_unreadable`, of
        (positions [B] int64, ascending, images).
    """
    read = _image_reader(paths, max_pixels)
    # A dtype, so that an empty list is an empty list of strings rather than of floats.
    dataset = tf.data.Dataset.from_tensor_slices(tf.constant(list(paths), dtype=tf.string))
    if skip_unreadable:
        dataset = dataset.enumerate().map(
            lambda position, path: (position, resize_and_center_crop(read(path), image_size)),
            num_parallel_calls=PARALLEL_CALLS,
            deterministic=True,
        )
        # Before batching, so that a bad file costs only its own element, not its whole batch.
        dataset = dataset.ignore_errors()
    else:
        dataset = dataset.map(
            lambda path: resize_and_center_crop(read(path), image_size),
            num_parallel_calls=PARALLEL_CALLS,
            deterministic=True,
        )
    return dataset.batch(batch_size).prefetch(PREFETCH_BATCHES).with_options(dataset_options())


def decode_image(path, max_pixels=DEFAULT_MAX_PIXELS):
    """Reads and decodes an image file to float32 RGB [H, W, 3] (greyscale and alpha become RGB),
    refusing it (`decode_image_bytes`) when its header gives more than `max_pixels` pixels."""
    return decode_image_bytes(tf.io.read_file(path), max_pixels, name=path)


def _image_reader(paths, max_pixels):
    """`read_cached_image` for paths into an `ImageCache`, `decode_image` for image files."""
    cached = [str(path).endswith(CACHED_IMAGE_SUFFIX) for path in paths]
    if all(cached) and cached:
        # Entries hold pixels already downsized by a build that kept to the budget.
        return read_cached_image
    if any(cached):
        raise ValueError(f"{sum(cached)} of {len(paths)} paths are image cache entries "
                         f"(*{CACHED_IMAGE_SUFFIX}); a dataset reads from the cache entirely or not at all: pass "
                         "ImageCache.cached_split's paths for the whole split, or plain image paths.")
    return lambda path: decode_image(path, max_pixels)


def decode_image_bytes(contents, max_pixels=DEFAULT_MAX_PIXELS, name="image"):
    """Decodes an encoded image (a scalar tf.string) like `decode_image`; also used by serving.

    The header is read first (`header_problem`): an image of more than `max_pixels` pixels, or
    whose header gives no size, raises `tf.errors.InvalidArgumentError` naming `name` (a string or
    string tensor) before the decoder allocates anything.
    """
    refuse, too_large, reason = header_problem(contents, max_pixels)
    message = tf.strings.join([name, tf.where(too_large, " is ", ": "), reason])
    check = tf.debugging.Assert(tf.logical_not(refuse), [message])
    with tf.control_dependencies([check]):
        image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return tf.cast(image, tf.float32)


def random_resized_crop(image, size, seed):
    """torchvision's `RandomResizedCrop(size)`: a window of 8-100% of the area and aspect ratio
    3/4-4/3 (`crop_window`), resized to size x size.

    Args:
        image: float32 [H, W, 3].
        size: output side in pixels.
        seed: shape [2] integer seed; the crop is a function of the seed alone.
    """
    draws = tf.random.stateless_uniform([CROP_ATTEMPTS, 4], seed, dtype=tf.float64)
    shape = tf.shape(image)
    top, left, height, width = crop_window(shape[0], shape[1], draws)
    crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([height, width, -1]))
    return tf.image.resize(crop, [size, size], method="bilinear", antialias=True)


def crop_window(height, width, draws, area_range=CROP_AREA_RANGE, ratio_range=CROP_ASPECT_RATIO_RANGE):
    """torchvision's `RandomResizedCrop.get_params`, given its random draws.

    The area is drawn uniformly and the aspect ratio log-uniformly, as torchvision does;
    `tf.image.sample_distorted_bounding_box` draws the aspect ratio and then the height uniformly,
    which makes small crops likelier (41% of the image on average, against 48%). The first of
    `len(draws)` attempts whose window fits is taken; if none fits, the central crop with the
    aspect ratio clipped to the range.

    Args:
        height, width: int32 scalars, the image's size.
        draws: float64 [attempts, 4] uniform in [0, 1): per attempt, the area, the log aspect ratio,
            the top and the left offset.
        area_range, ratio_range: (min, max) of the window's fraction of the area and of its
            width / height.

    Returns:
        int32 scalars (top, left, crop height, crop width).
    """
    image_height = tf.cast(height, tf.float64)
    image_width = tf.cast(width, tf.float64)
    area = image_height * image_width * (area_range[0] + (area_range[1] - area_range[0]) * draws[:, 0])
    log_low, log_high = np.log(ratio_range[0]), np.log(ratio_range[1])
    ratio = tf.exp(log_low + (log_high - log_low) * draws[:, 1])
    # tf.round rounds half to even, as Python's round() in torchvision.
    crop_width = tf.round(tf.sqrt(area * ratio))
    crop_height = tf.round(tf.sqrt(area / ratio))
    fits = (crop_width > 0) & (crop_width <= image_width) & (crop_height > 0) & (crop_height <= image_height)
    # torch.randint(0, n) as the floor of a uniform draw times n.
    top = tf.floor(draws[:, 2] * (image_height - crop_height + 1))
    left = tf.floor(draws[:, 3] * (image_width - crop_width + 1))
    first = tf.argmax(tf.cast(fits, tf.int32))

    image_ratio = image_width / image_height
    fallback_width = tf.where(image_ratio > ratio_range[1], tf.round(image_height * ratio_range[1]), image_width)
    fallback_height = tf.where(image_ratio < ratio_range[0], tf.round(image_width / ratio_range[0]), image_height)
    fallback = tf.stack([tf.floor((image_height - fallback_height) / 2), tf.floor((image_width - fallback_width) / 2),
                         fallback_height, fallback_width])
    window = tf.where(tf.reduce_any(fits),
                      tf.stack([top[first], left[first], crop_height[first], crop_width[first]]), fallback)
    return tuple(tf.unstack(tf.cast(window, tf.int32)))


def resize_and_center_crop(image, size):
    """Resizes the shorter side to size·288/256, then crops the central size x size square."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = round(size * EVAL_RESIZE_RATIO) / tf.reduce_min(shape)
    resized_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
    image = tf.image.resize(image, resized_shape, method="bilinear", antialias=True)
    top = (resized_shape[0] - size) // 2
    left = (resized_shape[1] - size) // 2
    return tf.image.crop_to_bounding_box(image, top, left, size, size)


def dataset_options():
    """The `tf.data.Options` of every pipeline here: the autotuner off (see `PARALLEL_CALLS`)."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return options
