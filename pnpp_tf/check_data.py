"""Scans a dataset before training and says what would go wrong.

    python -m pnpp_tf.check_data --dataset=cub --data_dir=/data/CUB_200_2011

Reads every split as training would (a missing list file, a malformed line or a missing image
stops here, naming the file and line), decodes every image with the pipeline's decoder, and
reports per split: images, classes, undecodable files, and classes smaller than a class-balanced
batch takes (their images repeat within a batch). Exit status 0: ready to train; 1: problems
found; 2: the dataset cannot be read at all.
"""

import json
import sys

from absl import app, flags

from pnpp_tf.data import DATASETS, load_splits
from pnpp_tf.data.image_check import check_images

FLAGS = flags.FLAGS


def check_dataset(dataset, data_dir, images_per_class=4, progress=True):
    """Checks every split of a dataset.

    Args:
        dataset: one of `pnpp_tf.data.DATASETS`.
        data_dir: the dataset's directory.
        images_per_class: images a class-balanced batch takes per class (batch / classes).
        progress: show a progress bar per split.

    Returns:
        A dict: per split its images, classes, bad images [(path, reason)], the classes smaller
        than `images_per_class`, and the decoding speed; plus "ok".
    """
    splits = load_splits(dataset, data_dir)
    report = {"dataset": dataset, "data_dir": data_dir, "splits": {}}
    for name, split in splits.items():
        if progress:
            print(f"Decoding {len(split)} images of {name}", file=sys.stderr)
        result = check_images(split.paths, progress=progress)
        sizes = {}
        for label in split.labels.tolist():
            sizes[label] = sizes.get(label, 0) + 1
        small = sorted(split.class_names[c] for c, n in sizes.items() if n < images_per_class)
        report["splits"][name] = {
            "images": len(split),
            "classes": split.num_classes,
            "bad_images": result.bad,
            "classes_smaller_than_a_batch_share": small if name == "train" else [],
            "seconds_per_1000_images": round(result.seconds_per_thousand, 3),
        }
    report["ok"] = not any(s["bad_images"] for s in report["splits"].values())
    return report


def summary_table(report, images_per_class):
    """The report as a Markdown table, followed by the problems found."""
    lines = ["| split | images | classes | undecodable | classes < %d images | s / 1000 images |" % images_per_class,
             "|---|---|---|---|---|---|"]
    for name, split in report["splits"].items():
        lines.append(f"| {name} | {split['images']} | {split['classes']} | {len(split['bad_images'])} "
                     f"| {len(split['classes_smaller_than_a_batch_share'])} | {split['seconds_per_1000_images']:.2f} |")
    for name, split in report["splits"].items():
        for path, reason in split["bad_images"]:
            lines.append(f"{name}: cannot decode {path}: {reason}")
        small = split["classes_smaller_than_a_batch_share"]
        if small:
            lines.append(f"{name}: {len(small)} class(es) have fewer than {images_per_class} images and repeat "
                         f"images within a batch, e.g. {', '.join(small[:5])}")
    lines.append("Ready to train." if report["ok"] else
                 "Problems found: fix or remove the files above, or train with --on_bad_image=skip.")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        if FLAGS.batch_size % FLAGS.classes_per_batch:
            raise ValueError(f"--batch_size={FLAGS.batch_size} is not divisible by "
                             f"--classes_per_batch={FLAGS.classes_per_batch}.")
        images_per_class = FLAGS.batch_size // FLAGS.classes_per_batch
        report = check_dataset(FLAGS.dataset, FLAGS.data_dir, images_per_class, progress=True)
    except ValueError as error:
        print(f"pnpp_tf.check_data: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(summary_table(report, images_per_class))
    if FLAGS.json:
        with open(FLAGS.json, "w", encoding="utf-8") as file:
            json.dump(report, file, indent=2)
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    flags.DEFINE_enum("dataset", None, DATASETS, "Dataset reader.", required=True)
    flags.DEFINE_string("data_dir", None, "Dataset directory.", required=True)
    flags.DEFINE_integer("batch_size", 32, "Training batch size (to find classes smaller than a batch's share).")
    flags.DEFINE_integer("classes_per_batch", 8, "Classes per batch.")
    flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")
    app.run(main)
