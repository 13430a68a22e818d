"""Measures the training loop around the step: how much of a real run's time is not training.

    python tools/bench_loop.py                                 # SOP's proportions, ResNet-50 at 64 px
    python tools/bench_loop.py --backbone=small_cnn --image_size=32 --train_images=512 --epochs=4

Writes a folder dataset with Stanford Online Products' proportions (as many test images as
training images, about 5 images a class, `--test_ratio` and `--images_per_class`), runs
`python -m pnpp_tf.train` on it with a flagfile's recipe (`configs/sop.flags` by default: its
batch, classes per batch, learning rates, and its default evaluation cadence) and the sizes given
here, and reads the run's results.json. The report splits the training phases' wall time into
the training loops (input, steps and per-batch callbacks), the per-epoch evaluations, the
checkpoints and the rest, and gives the share outside the training loops: the loop's overhead.
What happens once per run (start-up, the measurement before training) is reported apart, as
it does not grow with the epochs.

The images are random, so the figures say nothing of accuracy; small images make a CPU run
short, and evaluation and training shrink alike with the image size.
"""

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time

# tools/machine.py, beside this script; importing it also puts the repository on the path.
from machine import REPO, describe_machine, machine_info, write_results

# Stanford Online Products: 59,551 training images of 11,318 classes, 60,502 test images.
SOP_TEST_RATIO = 60502 / 59551
SOP_IMAGES_PER_CLASS = 5


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flagfile", default=os.path.join(REPO, "configs", "sop.flags"),
                        help="The recipe to run (its dataset, data_dir and model_dir are replaced).")
    parser.add_argument("--backbone", default="resnet50_torchvision", help="Registered backbone.")
    parser.add_argument("--image_size", type=int, default=64, help="Side of the training images.")
    parser.add_argument("--embedding_dim", type=int, default=512, help="Embedding size.")
    parser.add_argument("--train_images", type=int, default=1536, help="Training images.")
    parser.add_argument("--test_ratio", type=float, default=SOP_TEST_RATIO, help="Test images per training image.")
    parser.add_argument("--images_per_class", type=int, default=SOP_IMAGES_PER_CLASS, help="Images of a class.")
    parser.add_argument("--batch_size", type=int, default=0, help="Images per batch (0: the flagfile's).")
    parser.add_argument("--classes_per_batch", type=int, default=0, help="Classes per batch (0: the flagfile's).")
    parser.add_argument("--epochs", type=int, default=8, help="Main epochs.")
    parser.add_argument("--warmup_epochs", type=int, default=1, help="Warm-up epochs.")
    parser.add_argument("--eval_every", default="auto", help="The run's --eval_every.")
    parser.add_argument("--work_dir", default="", help="Where the data and the run go (default: a temporary "
                        "directory, removed afterwards).")
    parser.add_argument("--json", default="", help="Also write the machine and the row to this JSON file.")
    args = parser.parse_args(argv)
    if args.train_images < 2 * args.images_per_class or args.images_per_class < 2:
        parser.error("--train_images must hold at least two classes of --images_per_class >= 2 images.")

    with tempfile.TemporaryDirectory(prefix="bench_loop_") as scratch:
        work_dir = args.work_dir or scratch
        data_dir = os.path.join(work_dir, "data")
        counts = write_dataset(data_dir, args.train_images, round(args.train_images * args.test_ratio),
                               args.images_per_class, side=args.image_size * 5 // 4)
        row = measure_run(args, data_dir, os.path.join(work_dir, "run"))
    row.update(counts)
    machine = machine_info(tensorflow=row.pop("tensorflow"))
    print(format_report(row, machine))
    if args.json:
        write_results(args.json, __file__, argv, machine, [row])


def write_dataset(root, train_images, test_images, images_per_class, side):
    """Writes `<root>/{train,test}/<class>/<n>.png` of random images; returns the counts."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    counts = {}
    for split, images in (("train", train_images), ("test", test_images)):
        for index in range(images):
            folder = os.path.join(root, split, f"{split}_{index // images_per_class:05d}")
            os.makedirs(folder, exist_ok=True)
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{index:06d}.png"))
        counts[f"{split}_images"] = images
        counts[f"{split}_classes"] = -(-images // images_per_class)
        print(f"wrote {images} {split} images", file=sys.stderr, flush=True)
    return counts


def measure_run(args, data_dir, model_dir):
    """Runs pnpp_tf.train on the data; returns its timings, shares and the process' wall time."""
    overrides = [f"--backbone={args.backbone}", "--weights=none", f"--image_size={args.image_size}",
                 f"--embedding_dim={args.embedding_dim}", f"--epochs={args.epochs}",
                 f"--warmup_epochs={args.warmup_epochs}", f"--eval_every={args.eval_every}", "--eval_ks=1,10",
                 "--dataset=folder", f"--data_dir={data_dir}", f"--model_dir={model_dir}", "--verbose=0"]
    overrides += [f"--{name}={getattr(args, name)}" for name in ("batch_size", "classes_per_batch")
                  if getattr(args, name)]
    command = [sys.executable, "-m", "pnpp_tf.train", f"--flagfile={args.flagfile}", *overrides]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    print("running " + " ".join(command[1:]), file=sys.stderr, flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, env=env, check=False)
    process_seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"pnpp_tf.train failed (exit status {result.returncode}).")
    with open(os.path.join(model_dir, "results.json"), encoding="utf-8") as file:
        results = json.load(file)
    return loop_report(results, process_seconds)


def loop_report(results, process_seconds):
    """The shares of a finished run's time, from its results.json.

    Args:
        results: the run's results.json.
        process_seconds: the wall time of the whole `pnpp_tf.train` process.

    Returns:
        A dict: the run's timings, their shares of the phases' wall time, "loop_overhead_share"
        (1 - training loops / phases' wall time) and "once_seconds" (the process' time outside
        the phases: start-up, the measurement before training, saving the results).
    """
    timings = results["timings"]
    wall = timings["wall_seconds"]
    parts = {"train": timings["train_seconds"], "epoch_eval": timings["epoch_eval_seconds"],
             "final_eval": timings["final_eval_seconds"], "checkpoint": timings["checkpoint_seconds"]}
    parts["other"] = max(wall - sum(parts.values()), 0.0)

    return {
        "backbone": results["flags"]["backbone"],
        "image_size": results["flags"]["image_size"],
        "batch_size": results["flags"]["batch_size"],
        "epochs": results["flags"]["warmup_epochs"] + results["flags"]["epochs"],
        "eval_every": results.get("eval_every"),
        "timings": timings,
        "shares": {name: seconds / wall for name, seconds in parts.items()},
        "loop_overhead_share": 1.0 - parts["train"] / wall,
        "process_seconds": process_seconds,
        "once_seconds": process_seconds - wall,
        "tensorflow": importlib.metadata.version("tensorflow"),
    }


def format_report(row, machine):
    """The row as a Markdown table of where the phases' time went, with the machine underneath."""
    shares = row["shares"]
    lines = [
        "| backbone | size | batch | epochs | eval every | train | epoch eval | final eval | checkpoints | other "
        "| outside training loops | train images/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {row['backbone']} | {row['image_size']} | {row['batch_size']} | {row['epochs']} | {row['eval_every']} | "
        + " | ".join(f"{100 * shares[name]:.1f} %" for name in ("train", "epoch_eval", "final_eval", "checkpoint",
                                                                 "other"))
        + f" | **{100 * row['loop_overhead_share']:.1f} %** | {row['timings']['train_images_per_second']:.1f} |",
        "",
        f"{row['train_images']} training and {row['test_images']} test images ({row['train_classes']} and "
        f"{row['test_classes']} classes); shares of the training phases' {row['timings']['wall_seconds']:.0f} s. "
        f"Once per run, outside them: {row['once_seconds']:.0f} s (start-up, the measurement before training). "
        f"Machine: {describe_machine(machine)}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
