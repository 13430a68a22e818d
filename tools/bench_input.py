"""Benchmarks the tf.data input pipeline alone: images/s, and images/s per core, from JPEG files.

    python tools/bench_input.py                                  # 500 generated JPEGs, 1 core and all cores
    python tools/bench_input.py --dataset=cub --data_dir=/data/CUB_200_2011   # a real dataset's train split

What runs is `pnpp_tf.data.pipeline` exactly as training and evaluation use it:
  - train: `train_dataset` with a `ClassBalancedSampler` (read file, decode, RandomResizedCrop
    to --image_size, random flip, class-balanced batches, prefetch);
  - eval: `eval_dataset` (read file, decode, resize the shorter side to 288/256 of the crop,
    center crop);
  - train_cached, eval_cached: the same, reading an `ImageCache` of the files (decoded once,
    shorter side --cache_short_side) built before the timing; the table notes its size and build time;
  - read_cached (only when --pipelines names it): `read_cached_image` alone (read an entry,
    check it, take its pixels as float32), the part of the cached rows that the entry format decides.
Without --data_dir, --num_images JPEG files are written to a temporary directory first, of
photo-like content (smooth colour fields, shapes and sensor-like noise, quality 90) with the long
side --long_side px (500 by default, as in CUB-200-2011) and the short side 300-400 px, and get
synthetic labels (about 20 images per class). The files were just written, so their reads hit the
page cache, as every epoch after the first does in training on a dataset that fits in memory.

Each core count runs in a fresh Python process whose CPU affinity is set to that many cores
(`os.sched_setaffinity`, what `taskset -c 0` does) before TensorFlow is imported, so every thread
of the pipeline shares those cores. The pipeline itself is unchanged: its fixed parallelism is
`os.cpu_count()` map calls, whatever the affinity. After --warmup_batches untimed batches, the
batches are timed in --repeats windows of --batches batches each, and the table reports the median
window. "images/s per core" divides by the cores the process was allowed; "images per CPU-second"
divides by the CPU time the process actually got, which other jobs on the machine cannot inflate.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile

# tools/machine.py, beside this script; importing it also puts the repository on the path.
from machine import (Stopwatch, add_output_arguments, describe_machine, machine_info, run_measurement,
                     usable_cores, write_json, write_results)

PIPELINES = ("train", "eval", "train_cached", "eval_cached", "read_cached")
DEFAULT_PIPELINES = PIPELINES[:4]
PIPELINE_LABELS = {
    "train": "train (decode + RandomResizedCrop + flip)",
    "eval": "eval (decode + resize + center crop)",
    "train_cached": "train from --cache_dir (read + RandomResizedCrop + flip)",
    "eval_cached": "eval from --cache_dir (read + resize + center crop)",
    "read_cached": "read from --cache_dir alone (read + check + pixels to float32)",
}
IMAGES_PER_CLASS = 20
JPEG_QUALITY = 90
MAX_FILES_INSPECTED = 1000


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="", help="Read this dataset's train split instead of generated files.")
    parser.add_argument("--dataset", default="folder", help="Dataset of --data_dir (folder, cub, cars196, sop, inshop).")
    parser.add_argument("--num_images", type=int, default=500, help="JPEG files to generate (without --data_dir).")
    parser.add_argument("--long_side", type=int, default=500, help="Long side of the generated images, px.")
    parser.add_argument("--image_size", type=int, default=227, help="Output crop side, px.")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per batch.")
    parser.add_argument("--classes_per_batch", type=int, default=8, help="Distinct classes per training batch.")
    parser.add_argument("--warmup_batches", type=int, default=5, help="Untimed batches first.")
    parser.add_argument("--batches", type=int, default=20, help="Batches per timed window.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed windows; the median is reported.")
    parser.add_argument("--cores", default="1,all", help="Comma-separated core counts to run on ('all': every "
                        "core this process may use).")
    parser.add_argument("--pipelines", default=",".join(DEFAULT_PIPELINES), help="Comma-separated: "
                        f"{', '.join(PIPELINES)}; *_cached read decoded images from an ImageCache "
                        "(read_cached, asked for by name, reads them alone).")
    parser.add_argument("--cache_short_side", type=int, default=0, help="Shorter side of the cached images "
                        "(0: 288/256 of --image_size, what pnpp_tf.train's --cache_short_side defaults to).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the files, labels, sampler and augmentation.")
    add_output_arguments(parser, "the machine, the data and the rows")
    parser.add_argument("--worker_cores", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--manifest", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    pipelines = args.pipelines.split(",")
    if set(pipelines) - set(PIPELINES) or not pipelines:
        parser.error(f"--pipelines: choose from {', '.join(PIPELINES)}, got {args.pipelines!r}.")
    if min(args.batch_size, args.classes_per_batch, args.batches, args.repeats) < 1 or args.warmup_batches < 0:
        parser.error("--batch_size, --classes_per_batch, --batches and --repeats must be positive, "
                     "--warmup_batches not negative.")
    if args.batch_size % args.classes_per_batch:
        parser.error(f"--batch_size={args.batch_size} is not divisible by --classes_per_batch={args.classes_per_batch}.")

    if args.worker_output:  # a child: one core count, every pipeline, written as JSON
        write_json(args.worker_output, run_worker(args, pipelines))
        return

    available = usable_cores()
    try:
        core_counts = [len(available) if c.strip() == "all" else int(c) for c in args.cores.split(",")]
    except ValueError:
        parser.error(f"--cores takes comma-separated integers or 'all', got {args.cores!r}.")
    if not core_counts or min(core_counts) < 1 or max(core_counts) > len(available):
        parser.error(f"--cores={args.cores}: this process may use {len(available)} cores.")

    workdir = tempfile.mkdtemp(prefix="bench_input_")
    try:
        if args.data_dir:
            paths, labels = _dataset_files(args)
            origin = f"the train split of {args.data_dir} (--dataset={args.dataset})"
        else:
            print(f"writing {args.num_images} JPEG files to {workdir} ...", file=sys.stderr, flush=True)
            paths, labels = write_jpegs(os.path.join(workdir, "images"), args.num_images, args.long_side,
                                        max(args.classes_per_batch, args.num_images // IMAGES_PER_CLASS), args.seed)
            origin = f"{len(paths)} generated JPEG files (quality {JPEG_QUALITY}) in a temporary directory"
        if len(set(labels)) < args.classes_per_batch:
            raise SystemExit(f"The data has {len(set(labels))} classes, fewer than --classes_per_batch="
                             f"{args.classes_per_batch}.")
        data = {"origin": origin, **describe_files(paths), "classes": len(set(labels))}
        cached_paths = None
        if any(name.endswith("_cached") for name in pipelines):
            cached_paths, data["cache"] = build_cache(paths, os.path.join(workdir, "cache"), args)
        manifest = os.path.join(workdir, "manifest.json")
        write_json(manifest, {"paths": list(paths), "cached_paths": cached_paths,
                              "labels": [int(label) for label in labels]})
        rows = []
        for cores in core_counts:
            rows.extend(_run_in_fresh_process(args, cores, manifest))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    machine = machine_info(tensorflow=rows[0]["tensorflow"])
    print(format_table(rows, machine, data, args))
    if args.json:
        write_results(args.json, __file__, argv, machine, rows, data=data)


def write_jpegs(directory, count, long_side, num_classes, seed=0):
    """Writes `count` photo-like JPEG files; returns (paths, labels), labels cycling over the classes.

    Content: a smooth random colour field, a few filled shapes, and Gaussian noise (sigma 12) for
    texture, so the files have the size and decoding cost of photographs rather than of flat
    colour (too small) or of white noise (several times too large).
    """
    import numpy as np
    from PIL import Image, ImageDraw

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    short_low, short_high = max(1, round(long_side * 0.6)), max(1, round(long_side * 0.8))
    paths, labels = [], []
    for index in range(count):
        short = int(rng.integers(short_low, short_high + 1))
        width, height = (long_side, short) if rng.random() < 0.7 else (short, long_side)
        field = rng.uniform(0, 255, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.uint8)
        image = Image.fromarray(field).resize((width, height), Image.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 10))):
            x0, x1 = sorted(rng.integers(0, width, 2).tolist())
            y0, y1 = sorted(rng.integers(0, height, 2).tolist())
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
        pixels = np.asarray(image, np.float32) + rng.normal(0.0, 12.0, (height, width, 3))
        path = os.path.join(directory, f"image_{index:05d}.jpg")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=JPEG_QUALITY)
        paths.append(path)
        labels.append(index % num_classes)
    return paths, labels


def build_cache(paths, directory, args):
    """Decodes the files into an `ImageCache` in `directory`; returns (entries, its description)."""
    from pnpp_tf.data.cache import ImageCache, default_short_side

    side = args.cache_short_side or default_short_side(args.image_size)
    print(f"decoding {len(paths)} files into an image cache (shorter side {side} px) ...", file=sys.stderr,
          flush=True)
    with Stopwatch() as clock:
        entries = ImageCache(directory, side).cached_paths(list(paths), progress=False)
    seconds = clock.seconds
    megabytes = sum(os.path.getsize(entry) for entry in entries) / 2**20
    return entries, {"short_side": side, "build_seconds": seconds, "build_images_per_second": len(paths) / seconds,
                     "megabytes": megabytes}


def describe_files(paths):
    """Count, mean file size and mean pixel size of the files (their headers only)."""
    from PIL import Image

    inspected = paths[:: max(1, len(paths) // MAX_FILES_INSPECTED)]
    sizes, widths, heights = [], [], []
    for path in inspected:
        sizes.append(os.path.getsize(path))
        with Image.open(path) as image:
            widths.append(image.width)
            heights.append(image.height)
    return {
        "files": len(paths),
        "mean_kilobytes": statistics.mean(sizes) / 1024,
        "mean_width": statistics.mean(widths),
        "mean_height": statistics.mean(heights),
        "mean_megapixels": statistics.mean(w * h for w, h in zip(widths, heights)) / 1e6,
    }


def run_worker(args, pipelines):
    """In a fresh process: pins it to --worker_cores cores, then times each pipeline; returns rows."""
    cores = usable_cores()[:args.worker_cores]
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)  # before TensorFlow starts any thread
    import numpy as np
    import tensorflow as tf

    from pnpp_tf.data import pipeline

    with open(args.manifest, encoding="utf-8") as file:
        manifest = json.load(file)
    labels = np.asarray(manifest["labels"], np.int64)
    total_batches = args.warmup_batches + args.repeats * args.batches
    rows = []
    for name in pipelines:
        paths = manifest["cached_paths"] if name.endswith("_cached") else manifest["paths"]
        if name.startswith("train"):
            sampler = pipeline.ClassBalancedSampler(labels, args.batch_size, args.classes_per_batch, args.seed)
            epochs = math.ceil(total_batches / sampler.num_batches)
            dataset = pipeline.train_dataset(paths, labels, sampler, args.image_size, epochs, seed=args.seed, flip=True)
        else:
            repeated = (paths * math.ceil(total_batches * args.batch_size / len(paths)))[:total_batches * args.batch_size]
            dataset = (_read_only_dataset(repeated, args.batch_size) if name == "read_cached"
                       else pipeline.eval_dataset(repeated, args.image_size, args.batch_size))
        load_before = os.getloadavg()[0]
        windows = _time_batches(iter(dataset), args)
        rate = statistics.median(w["images"] / w["seconds"] for w in windows)
        cpu_rate = statistics.median(w["images"] / max(w["cpu_seconds"], 1e-9) for w in windows)
        cores_busy = statistics.median(w["cpu_seconds"] / w["seconds"] for w in windows)
        rows.append({
            "pipeline": name,
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else len(cores),
            "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores,
            "map_parallel_calls": pipeline.PARALLEL_CALLS,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "warmup_batches": args.warmup_batches,
            "batches_per_window": args.batches,
            "windows": windows,
            "images_per_second": rate,
            "images_per_second_per_core": rate / len(cores),
            "images_per_cpu_second": cpu_rate,
            "cores_busy": cores_busy,
            "ms_per_batch": args.batch_size / rate * 1e3,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0],
            "tensorflow": tf.__version__,
        })
        print(f"  {len(cores)} core(s), {name}: {rate:.1f} images/s", file=sys.stderr, flush=True)
    return rows


def _read_only_dataset(paths, batch_size):
    """Batches of the shapes of the entries `pipeline.read_cached_image` reads, mapped as `eval_dataset` maps.

    The shapes are taken in a map of their own, after the reading map: in the same function, an
    optimiser could skip making float32 pixels that nothing uses.
    """
    import tensorflow as tf

    from pnpp_tf.data import pipeline

    dataset = tf.data.Dataset.from_tensor_slices(tf.constant(paths)).map(
        pipeline.read_cached_image, num_parallel_calls=pipeline.PARALLEL_CALLS, deterministic=True)
    dataset = dataset.map(tf.shape).batch(batch_size).prefetch(pipeline.PREFETCH_BATCHES)
    return dataset.with_options(pipeline.dataset_options())


def _time_batches(iterator, args):
    """Skips the warm-up batches, then times --repeats windows of --batches batches each."""
    for _ in range(args.warmup_batches):
        next(iterator)
    windows = []
    for _ in range(args.repeats):
        images = 0
        with Stopwatch() as clock:
            for _ in range(args.batches):
                batch = next(iterator)
                images += int((batch[0] if isinstance(batch, tuple) else batch).shape[0])
        windows.append({"images": images, "seconds": clock.seconds, "cpu_seconds": clock.cpu_seconds})
    return windows


def _run_in_fresh_process(args, cores, manifest):
    forwarded = ("image_size", "batch_size", "classes_per_batch", "warmup_batches", "batches", "repeats", "pipelines",
                 "seed", "cache_short_side")
    print(f"running on {cores} core(s) in a fresh process ...", file=sys.stderr, flush=True)
    return run_measurement(__file__, args, forwarded, [f"--worker_cores={cores}", f"--manifest={manifest}"],
                           f"{cores}-core")


def _dataset_files(args):
    from pnpp_tf.data import load_split

    paths, labels = load_split(args.dataset, args.data_dir, "train")
    return list(paths), [int(label) for label in labels]


def format_table(rows, machine, data, args):
    """The rows as one Markdown table, with the machine, the data and the load underneath."""
    lines = [
        "| pipeline | cores | images/s | images/s per core | images per CPU-second | ms per batch | "
        "cores busy | load avg before/after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {PIPELINE_LABELS[row['pipeline']]} | {row['cores']} | {row['images_per_second']:.1f} | "
            f"{row['images_per_second_per_core']:.1f} | {row['images_per_cpu_second']:.1f} | "
            f"{row['ms_per_batch']:.1f} | {row['cores_busy']:.2f} | "
            f"{row['load_average_before']:.2f}/{row['load_average_after']:.2f} |"
        )
    lines.append("")
    lines.append(
        f"Data: {data['origin']}; {data['files']} files, mean {data['mean_kilobytes']:.0f} KB, "
        f"mean {data['mean_width']:.0f}×{data['mean_height']:.0f} px, {data['classes']} classes. "
        f"Output {args.image_size}×{args.image_size} px, batch {args.batch_size} "
        f"({args.classes_per_batch} classes per training batch); median of {args.repeats} windows of "
        f"{args.batches} batches after {args.warmup_batches} warm-up batches; "
        f"{rows[0]['map_parallel_calls']} parallel map calls (os.cpu_count())."
    )
    if "cache" in data:
        cache = data["cache"]
        lines.append(
            f"Cache: shorter side {cache['short_side']} px, {cache['megabytes']:.1f} MB on disk, built in "
            f"{cache['build_seconds']:.1f} s ({cache['build_images_per_second']:.0f} images/s, all cores)."
        )
    lines.append(
        f"Machine: {describe_machine(machine)}. Cores pinned with "
        "os.sched_setaffinity (as taskset) before TensorFlow starts; cores busy: the process' CPU time over "
        "wall time (median window); load avg: the 1-minute load average."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
