"""Scans a dataset before training and says what would go wrong.

    python -m pnpp_tf.check_data --dataset=cub --data_dir=/data/CUB_200_2011

Reads every split as training would (a missing list file, a malformed line or a missing image
stops here, naming the file and line), checks every image as training does (its header against
--max_pixels, then the pipeline's decoder), and reports per split: images, classes, undecodable
files, images over --max_pixels, evaluation classes no query of which can be answered (a test
class of one image; a query class without gallery images), and training classes smaller than a
class-balanced batch takes (their images repeat within a batch). Exit status 0: ready to train;
1: problems found; 2: the dataset cannot be read at all.
"""

import sys

from pnpp_tf import flags
from pnpp_tf.config import CheckDataConfig
from pnpp_tf.data import load_splits
from pnpp_tf.data.image_check import check_images
from pnpp_tf.data.image_header import DEFAULT_MAX_PIXELS
from pnpp_tf.io_utils import write_json


def check_dataset(dataset, data_dir, images_per_class=4, progress=True, max_pixels=DEFAULT_MAX_PIXELS):
    """Checks every split of a dataset.

    Args:
        dataset: one of `pnpp_tf.data.DATASETS`.
        data_dir: the dataset's directory.
        images_per_class: images a class-balanced batch takes per class (batch / classes).
        progress: show a progress bar per split.
        max_pixels: an image whose header gives more pixels is reported, undecoded.

    Returns:
        A dict: per split its images, classes, bad images [(path, reason)] (those over
        `max_pixels` included, and also listed under "over_max_pixels"), the evaluation classes
        whose queries cannot be answered, the training classes smaller than `images_per_class`,
        and the decoding speed; plus "max_pixels" and "ok".
    """
    splits = load_splits(dataset, data_dir)
    report = {"dataset": dataset, "data_dir": data_dir, "max_pixels": max_pixels, "splits": {}}
    usable = {}
    for name, split in splits.items():
        if progress:
            print(f"Decoding {len(split)} images of {name}", file=sys.stderr)
        result = check_images(split.paths, progress=progress, max_pixels=max_pixels)
        usable[name] = _class_sizes(split, {path for path, _ in result.bad})
        too_large = set(result.too_large)
        small = sorted(split.class_names[c] for c, n in usable[name].items() if n < images_per_class)
        report["splits"][name] = {
            "images": len(split),
            "classes": split.num_classes,
            "bad_images": result.bad,
            "over_max_pixels": [(path, reason) for path, reason in result.bad if path in too_large],
            "classes_smaller_than_a_batch_share": small if name == "train" else [],
            "unanswerable_classes": [],
            "seconds_per_1000_images": round(result.seconds_per_thousand, 3),
        }
    for name, classes in unanswerable_classes(splits, usable).items():
        report["splits"][name]["unanswerable_classes"] = classes
    report["ok"] = not any(s["bad_images"] or s["unanswerable_classes"] for s in report["splits"].values())
    return report


def unanswerable_classes(splits, usable):
    """The evaluation classes some query of which has no right answer to find, per split.

    Without a gallery every test image is searched among the other test images, so a class
    needs two; with one, a query is searched in the gallery only, so a query class needs one
    gallery image (a gallery class without queries is only a distractor).

    Args:
        splits: {split name: `Split`}, as `load_splits` returns them.
        usable: {split name: {label: images that decode}}.

    Returns:
        {split name: sorted class names}, for "test" or "query".
    """
    if "test" in splits:
        names = splits["test"].class_names
        return {"test": sorted(names[c] for c, n in usable["test"].items() if n < 2)}
    if "query" in splits and "gallery" in splits:
        names = splits["query"].class_names  # the label space query and gallery share
        in_gallery = {c for c, n in usable["gallery"].items() if n > 0}
        return {"query": sorted(names[c] for c, n in usable["query"].items() if n and c not in in_gallery)}
    return {}


def _class_sizes(split, bad_paths):
    """{label: the images of that class not in `bad_paths`}, for every label of `split`."""
    sizes = {label: 0 for label in set(split.labels.tolist())}
    for path, label in zip(split.paths, split.labels.tolist()):
        sizes[label] += path not in bad_paths
    return sizes


def summary_table(report, images_per_class):
    """The report as a Markdown table, followed by the problems found."""
    lines = [f"| split | images | classes | undecodable | over --max_pixels | unanswerable classes "
             f"| classes < {images_per_class} images | s / 1000 images |",
             "|---|---|---|---|---|---|---|---|"]
    for name, split in report["splits"].items():
        large = len(split["over_max_pixels"])
        lines.append(f"| {name} | {split['images']} | {split['classes']} | {len(split['bad_images']) - large} "
                     f"| {large} | {len(split['unanswerable_classes'])} "
                     f"| {len(split['classes_smaller_than_a_batch_share'])} | {split['seconds_per_1000_images']:.2f} |")
    for name, split in report["splits"].items():
        large = dict(split["over_max_pixels"])
        for path, reason in split["bad_images"]:
            lines.append(f"{name}: {path} is too large: {reason}" if path in large
                         else f"{name}: cannot decode {path}: {reason}")
        lines.extend(_class_notes(name, split, images_per_class))
    lines.append(_verdict(report))
    return "\n".join(lines)


def _class_notes(name, split, images_per_class):
    """The lines on a split's classes: unanswerable ones (a problem), small ones (a note)."""
    notes = []
    unanswerable = split["unanswerable_classes"]
    if unanswerable:
        need = "two images" if name == "test" else "a gallery image"
        notes.append(f"{name}: {len(unanswerable)} class(es) have fewer than {need}, so their queries can "
                     f"never be answered, e.g. {', '.join(unanswerable[:5])}")
    small = split["classes_smaller_than_a_batch_share"]
    if small:
        notes.append(f"{name}: {len(small)} class(es) have fewer than {images_per_class} images and repeat "
                     f"images within a batch, e.g. {', '.join(small[:5])}")
    return notes


def _verdict(report):
    """The last line: ready, or what to do about the problems listed above it."""
    if report["ok"]:
        return "Ready to train."
    splits = report["splits"].values()
    advice = []
    if any(len(s["bad_images"]) > len(s["over_max_pixels"]) for s in splits):
        advice.append("fix or remove the undecodable files")
    if any(s["over_max_pixels"] for s in splits):
        advice.append(f"shrink or remove the images over --max_pixels={report['max_pixels']} (or raise it)")
    if any(s["unanswerable_classes"] for s in splits):
        advice.append("add images to the unanswerable classes or remove them")
    skip = ", or train with --on_bad_image=skip" if any(s["bad_images"] for s in splits) else ""
    return f"Problems found: {'; '.join(advice)}{skip}."


def main(config):
    images_per_class = config.batch_size // config.classes_per_batch
    report = check_dataset(config.dataset, config.data_dir, images_per_class, progress=True,
                           max_pixels=config.max_pixels)
    print(summary_table(report, images_per_class))
    if config.json:
        write_json(config.json, report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    flags.run(main, CheckDataConfig, "pnpp_tf.check_data")
