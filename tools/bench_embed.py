"""Benchmarks embedding throughput: embedding image files (what every program runs) against a bare forward pass.

    python tools/bench_embed.py                                  # ResNet-50 at 227 px, 256 JPEGs
    python tools/bench_embed.py --backbone=small_cnn --image_size=32 --num_images=64

Writes `--num_images` JPEG files (`--long_side` pixels, random content), saves a randomly
initialised embedder as a run's embedder.keras would be, loads it as the programs load it, and
measures images/s of:
  - bare: `embedder(images, training=False)` in a `tf.function`, on the evaluation crops of the
    same files already decoded in memory, `--batch_size` at a time: the model alone;
  - embed_files: the loaded embedder's `Embedder.embed_files`
    (`pnpp_tf.retrieval.embed.ImageEmbedder`), the one way `pnpp_tf.evaluate`, training's
    Recall@K, `pnpp_tf.index`, `pnpp_tf.search` and the export parity report embed image files
    (reading, decoding and cropping in tf.data included);
  - embed_files model: the same passes, counting only the time spent in the model (what the
    parity report's images/s gives for the Keras variant).
Each is run `--repeats` times, alternating, after one untimed pass each (tracing); the best
pass is reported and the ratio to the best bare pass.
"""

import argparse
import os
import sys
import tempfile

# tools/machine.py, beside this script; importing it also puts the repository on the path.
from machine import Stopwatch, describe_machine, machine_info, write_results

PATHS = ("bare", "embed_files")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50", help="Registered backbone.")
    parser.add_argument("--image_size", type=int, default=227, help="Side of the crops embedded.")
    parser.add_argument("--embedding_dim", type=int, default=2048, help="Embedding size.")
    parser.add_argument("--num_images", type=int, default=256, help="Images embedded per pass.")
    parser.add_argument("--long_side", type=int, default=300, help="Longer side of the JPEG files.")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per inference batch.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed passes of each path.")
    parser.add_argument("--json", default="", help="Also write the machine and the rows to this JSON file.")
    args = parser.parse_args(argv)
    if min(args.num_images, args.batch_size, args.repeats) < 1:
        parser.error("--num_images, --batch_size and --repeats must be at least 1.")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    with tempfile.TemporaryDirectory(prefix="bench_embed_") as folder:
        paths = write_images(folder, args.num_images, args.long_side)
        seconds = measure(args, paths, folder)
    seconds["embed_files model"] = seconds.pop("model")
    best_bare = min(seconds["bare"])
    rows = [{"path": name, "seconds": times, "images_per_second": args.num_images / min(times),
             "vs_bare": best_bare / min(times)} for name, times in seconds.items()]
    for row in rows:
        row.update(backbone=args.backbone, image_size=args.image_size, batch_size=args.batch_size,
                   num_images=args.num_images)
    machine = machine_info(gpus=len(tf.config.list_physical_devices("GPU")), tensorflow=tf.__version__,
                           keras=keras.__version__)
    print(format_table(rows, machine))
    if args.json:
        write_results(args.json, __file__, argv, machine, rows)


def write_images(folder, count, long_side):
    """`count` JPEG files of random blocks, 4:3, in `folder`; returns their paths."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        blocks = rng.integers(0, 256, (long_side * 3 // 4 // 8 + 1, long_side // 8 + 1, 3), dtype=np.uint8)
        pixels = np.kron(blocks, np.ones((8, 8, 1), np.uint8))[:long_side * 3 // 4, :long_side]
        paths.append(os.path.join(folder, f"{index:05d}.jpg"))
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def measure(args, paths, folder):
    """{path name: [seconds of each timed pass]}, and "model": embed_files' seconds in the model."""
    import keras  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    from pnpp_tf.artifacts import load_keras_embedder  # pylint: disable=import-outside-toplevel
    from pnpp_tf.data import pipeline  # pylint: disable=import-outside-toplevel
    from pnpp_tf.modeling.model import build_embedder  # pylint: disable=import-outside-toplevel

    keras.utils.set_random_seed(0)
    model_path = os.path.join(folder, "embedder.keras")
    build_embedder(args.backbone, args.image_size, args.embedding_dim, weights="none").save(model_path)
    embedder = load_keras_embedder(model_path)
    model = embedder.keras_model
    batches = [tf.constant(b) for b in pipeline.eval_dataset(paths, args.image_size, args.batch_size).as_numpy_iterator()]
    forward = tf.function(lambda images: model(images, training=False), reduce_retracing=True)
    runs = {
        "bare": lambda: [forward(b).numpy() for b in batches],
        "embed_files": lambda: embedder.embed_files(paths, batch_size=args.batch_size),
    }
    seconds = {name: [] for name in (*PATHS, "model")}
    for repeat in range(args.repeats + 1):
        for name in PATHS:
            with Stopwatch() as clock:
                result = runs[name]()
            if repeat:  # the first pass traces
                seconds[name].append(clock.seconds)
                if name == "embed_files":
                    seconds["model"].append(result.model_seconds)
            print(f"  {name}: pass {repeat + 1}: {clock.seconds:.2f} s", file=sys.stderr, flush=True)
            if name == "embed_files" and len(result.paths) != len(paths):
                raise RuntimeError(f"embed_files embedded {len(result.paths)} of {len(paths)} images.")
    return seconds


def format_table(rows, machine):
    """The rows as a Markdown table, the machine underneath."""
    lines = ["| path | backbone | size | batch | images/s | vs bare |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['path']} | {row['backbone']} | {row['image_size']} | {row['batch_size']} | "
                     f"{row['images_per_second']:.1f} | {row['vs_bare']:.2f} |")
    lines += ["", f"{rows[0]['num_images']} JPEG files per pass; best of the timed passes. "
              f"Machine: {describe_machine(machine)}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
