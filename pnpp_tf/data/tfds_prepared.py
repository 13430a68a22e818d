"""Readers of TFDS-prepared copies of CUB-200-2011, Cars196 and Stanford Online Products.

`tfds build caltech_birds2011 --data_dir=DIR` (likewise `cars196` and `stanford_online_products`)
prepares a dataset as TFRecord files under `DIR/<name>/<version>/`. TFDS splits CUB and Cars196 by
image (each class on both sides), which is not the zero-shot protocol. These readers merge all of a
prepared dataset's splits and split them again by class, with the classes of the official readers
in `benchmarks.py`: CUB classes 1-100 train and 101-200 test, Cars196 1-98 and 99-196, SOP 1-11318
and 11319-22634 (TFDS counts labels from 0; class names here count from 1, as the official files
do).

The training pipeline reads image files, so the first read extracts every image's encoded bytes,
unchanged, to `DIR/pnpp_tf_images/<name>/<version>/`. A manifest written last marks the extraction
complete; later reads reuse the files. `tensorflow-datasets` is needed only by these readers.
"""

import dataclasses
import json
import os
import re
import time

import keras
from absl import logging

from pnpp_tf.data import benchmarks
from pnpp_tf.data.split import split_from_groups
from pnpp_tf.io_utils import write_atomic
from pnpp_tf.errors import UserError

# RECIPE: SOP trains on the classes of Ebay_train.txt (ids 1-11318) and tests on those of
# Ebay_test.txt (11319-22634).
SOP_CLASSES, SOP_TRAIN_CLASSES = 22634, 11318

CACHE_FOLDER = "pnpp_tf_images"
MANIFEST = "manifest.json"
_MANIFEST_FORMAT = 1
_PROGRESS_EVERY = 500
# Leading bytes of the formats TensorFlow's decoder reads, for the extracted file's extension.
_SIGNATURES = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"GIF87a", ".gif"),
               (b"GIF89a", ".gif"), (b"BM", ".bmp"))


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A TFDS dataset and where the zero-shot protocol cuts its classes.

    Attributes:
        name: the TFDS name (`tfds build <name>`).
        label_feature: the feature holding the 0-based class.
        num_classes: classes of the dataset.
        train_classes: classes 0 to `train_classes - 1` (TFDS labels) train, the rest test.
    """

    name: str
    label_feature: str
    num_classes: int
    train_classes: int


SOURCES = {
    "tfds_cub": TfdsSource("caltech_birds2011", "label", benchmarks.CUB_CLASSES, benchmarks.CUB_TRAIN_CLASSES),
    "tfds_cars196": TfdsSource("cars196", "label", benchmarks.CARS_CLASSES, benchmarks.CARS_TRAIN_CLASSES),
    "tfds_sop": TfdsSource("stanford_online_products", "class_id", SOP_CLASSES, SOP_TRAIN_CLASSES),
}


def read_tfds_cub(data_dir):
    """CUB-200-2011 prepared by `tfds build caltech_birds2011`; see `read_prepared`."""
    return read_prepared(SOURCES["tfds_cub"], data_dir)


def read_tfds_cars196(data_dir):
    """Cars196 prepared by `tfds build cars196`; see `read_prepared`."""
    return read_prepared(SOURCES["tfds_cars196"], data_dir)


def read_tfds_sop(data_dir):
    """Stanford Online Products prepared by `tfds build stanford_online_products`; see `read_prepared`."""
    return read_prepared(SOURCES["tfds_sop"], data_dir)


def read_prepared(source, data_dir, progress=True):
    """Reads a TFDS-prepared dataset and splits it by class to the zero-shot protocol.

    The first call extracts the images (a few minutes for SOP's 120,053); later calls reuse them,
    unless the prepared dataset changed version or size, or an extracted file went missing.

    Args:
        source: a `TfdsSource`.
        data_dir: the TFDS data directory, holding `<source.name>/<version>/` (or that
            `<source.name>` directory itself). The extracted images go under it.
        progress: show a progress bar while extracting.

    Returns:
        {"train": Split, "test": Split}, class names being the 1-based class ids.
    """
    tfds = _import_tfds()
    tfds_dir = data_dir
    if os.path.basename(os.path.normpath(data_dir)) == source.name:
        tfds_dir = os.path.dirname(os.path.normpath(data_dir))
    builder = _prepared_builder(tfds, source, data_dir, tfds_dir)
    cache_dir = os.path.join(tfds_dir, CACHE_FOLDER, source.name, str(builder.version))
    sizes = {str(split): int(info.num_examples) for split, info in builder.info.splits.items()}
    images = _read_manifest(cache_dir, source, str(builder.version), sizes)
    if images is None:
        images = _extract(tfds, builder, source, cache_dir, sizes, progress)
    return _zero_shot_splits(images, source, cache_dir)


def _import_tfds():
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel  # optional
    except ImportError as error:
        raise UserError(f"Reading TFDS-prepared datasets needs tensorflow-datasets: "
                         f"pip install tensorflow-datasets ({error}).") from error
    return tfds


def _prepared_builder(tfds, source, data_dir, tfds_dir):
    """The builder of `source` in `tfds_dir`, checked to be prepared and to have the expected labels."""
    builder = tfds.builder(source.name, data_dir=tfds_dir)
    if not (os.path.isdir(builder.data_dir) and builder.is_prepared()):  # isdir: no TFDS warning then
        found = _version_dirs(os.path.join(tfds_dir, source.name))
        other = (f" (it holds version(s) {', '.join(found)}, which tensorflow-datasets {tfds.__version__} "
                 "does not read)" if found else "")
        raise UserError(
            f"--data_dir={data_dir} holds no prepared {source.name} {builder.version}{other}. "
            f"Prepare it with: tfds build {source.name} --data_dir={tfds_dir}"
        )
    features = builder.info.features
    classes = getattr(features[source.label_feature], "num_classes", None) if source.label_feature in features else None
    if classes != source.num_classes:
        raise UserError(
            f"{builder.data_dir}: expected a class feature {source.label_feature!r} with {source.num_classes} "
            f"classes, got {classes} (features: {sorted(features.keys())}); this is not the {source.name} "
            "this reader knows."
        )
    return builder


def _version_dirs(dataset_dir):
    if not os.path.isdir(dataset_dir):
        return []
    return sorted(name for name in os.listdir(dataset_dir) if re.fullmatch(r"\d+\.\d+\.\d+", name))


def _read_manifest(cache_dir, source, version, sizes):
    """The [(relative path, TFDS label)] of a finished extraction that still matches, else None."""
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            manifest = json.load(file)
        current = (manifest["format"], manifest["dataset"], manifest["version"], manifest["sizes"])
        images = [(str(relative), int(label)) for relative, label in manifest["images"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        logging.warning("%s is unreadable (%s); extracting the images again.", path, error)
        return None
    if current != (_MANIFEST_FORMAT, source.name, version, sizes):
        logging.info("%s describes %s %s with splits %s, the prepared dataset is %s with %s; extracting again.",
                     path, current[1], current[2], current[3], version, sizes)
        return None
    missing = [relative for relative, _ in images if not os.path.isfile(os.path.join(cache_dir, relative))]
    if missing:
        logging.warning("%d extracted image(s) of %s are missing (e.g. %s); extracting again.",
                        len(missing), cache_dir, os.path.join(cache_dir, missing[0]))
        return None
    return images


def _extract(tfds, builder, source, cache_dir, sizes, progress):
    """Writes every image's encoded bytes to `cache_dir`, then the manifest; returns its images."""
    total = sum(sizes.values())
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as error:
        raise UserError(f"Cannot create {cache_dir} for the extracted images of {source.name}: {error}. "
                         "--data_dir must be writable.") from error
    logging.info("Extracting the %d images of %s %s to %s (once).", total, source.name, builder.version, cache_dir)
    start = time.perf_counter()
    bar = keras.utils.Progbar(total, unit_name="image") if progress and total else None
    # Only the image (still encoded) and the label are parsed; CUB's segmentation masks are not.
    decoders = tfds.decode.PartialDecoding({"image": True, source.label_feature: True},
                                           decoders={"image": tfds.decode.SkipDecoding()})
    images = []
    for split in sorted(sizes):
        dataset = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
        for index, example in enumerate(dataset.as_numpy_iterator()):
            label, encoded = int(example[source.label_feature]), example["image"]
            class_dir = os.path.join("images", f"{label + 1:05d}")
            relative = os.path.join(class_dir, f"{split}_{index:06d}{_extension(encoded)}")
            write_atomic(os.path.join(cache_dir, relative), encoded)
            images.append((relative, label))
            if bar and (len(images) % _PROGRESS_EVERY == 0 or len(images) == total):
                bar.update(len(images))
    if len(images) != total:
        raise UserError(f"{builder.data_dir}: dataset_info.json declares {total} examples ({sizes}), "
                         f"the TFRecord files hold {len(images)}; prepare {source.name} again.")
    manifest = {"format": _MANIFEST_FORMAT, "dataset": source.name, "version": str(builder.version),
                "sizes": sizes, "images": images}
    # Written last and renamed into place: its presence means every image above is on disk.
    write_atomic(os.path.join(cache_dir, MANIFEST), json.dumps(manifest).encode("utf-8"))
    seconds = time.perf_counter() - start
    logging.info("Extracted %d images of %s in %.1f s.", total, source.name, seconds)
    return images


def _extension(encoded):
    for signature, extension in _SIGNATURES:
        if encoded.startswith(signature):
            return extension
    if encoded[:4] == b"RIFF" and encoded[8:12] == b"WEBP":
        return ".webp"
    return ".img"


def _zero_shot_splits(images, source, cache_dir):
    train, test = {}, {}
    for relative, label in images:
        if not 0 <= label < source.num_classes:
            raise UserError(f"{cache_dir}: {source.label_feature} {label} is outside 0..{source.num_classes - 1}.")
        group = train if label < source.train_classes else test
        group.setdefault(label + 1, []).append(os.path.join(cache_dir, relative))
    if not train or not test:
        found = sorted({**train, **test})
        raise UserError(
            f"{source.name} in {cache_dir} has classes {found[:5]}{'...' if len(found) > 5 else ''}; the "
            f"zero-shot protocol needs classes 1-{source.train_classes} (train) and "
            f"{source.train_classes + 1}-{source.num_classes} (test)."
        )
    return {"train": split_from_groups({key: sorted(paths) for key, paths in train.items()}),
            "test": split_from_groups({key: sorted(paths) for key, paths in test.items()})}
