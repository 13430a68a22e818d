"""Benchmarks the production train step: images/s of `ProxyNCAModel`'s train step, XLA on or off.

    python tools/bench_train.py                                   # ResNet-50, 227 px, batch 32, XLA off
    python tools/bench_train.py --jit_compile=both --steps=5 --warmup_steps=2
    python tools/bench_train.py --backbone=small_cnn --image_size=32 --jit_compile=both
    python tools/bench_train.py --backbone=resnet50_torchvision --embedding_dim=512 --image_size=64 --against=torch

The step measured is exactly the one training runs: a `ProxyNCAModel` built by `build_embedder`
(random weights, which cost the same as ImageNet ones), compiled as `pnpp_tf.train` compiles it
(two `TorchAdam` optimisers, the recipe's learning rates, gradient clipping at 10, `jit_compile`
resolved by `resolve_jit_compile`), called through `model.train_on_batch`, i.e. Keras' own
`train_function` around `ProxyNCAModel.train_step`. Every call waits for the step to finish
(Keras copies the loss to NumPy).

The input is one class-balanced batch of synthetic float32 images in [0, 255], made once and kept
in memory: the input pipeline is measured separately (tools/bench_input.py). The first
`--warmup_steps` steps (tracing, XLA compilation, the optimisers' first updates) are not timed;
the table reports the median of the next `--steps` steps, and images/s = batch / median step.

With `--jit_compile=both` each setting runs in a fresh Python process (XLA off first), so that
neither inherits the other's compiled functions, memory or thread pools.

With `--against=torch` (torch installed: `pip install -e ".[convert]"`) the PyTorch reference loop
of the parity harness (tools/torch_reference.py: the authors' loop, torchvision's ResNet-50 v1.5,
Adam eps 1 with three parameter groups, clipping by value) is timed on the same batch shape, and
the two run in alternating fresh processes, `--rounds` times each, so that a change in the
machine's load falls on both. PyTorch uses its default threads (one per core); its step ends
when the loss is read back, as ours does.
"""

import argparse
import os
import statistics
import sys

# tools/machine.py, beside this script; importing it also puts the repository on the path.
from machine import (Stopwatch, add_output_arguments, describe_machine, machine_info, run_measurement,
                     write_json, write_results)

PRECISIONS = ("none", "mixed_float16", "mixed_bfloat16")
# RECIPE: what pnpp_tf.train compiles with by default (--lr, --proxy_lr, --clip_value).
LEARNING_RATE = 4e-3
PROXY_LEARNING_RATE = 4e2
CLIP_VALUE = 10.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50", help="Registered backbone (resnet50, small_cnn, "
                        "resnet50_torchvision, keras_hub).")
    parser.add_argument("--backbone_preset", default="", help="--backbone=keras_hub: a KerasHub preset handle or "
                        "local preset directory (its architecture, random weights: only its config is read).")
    parser.add_argument("--image_size", type=int, default=227, help="Side of the square input images.")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per step.")
    parser.add_argument("--classes_per_batch", type=int, default=8, help="Distinct classes in the batch.")
    parser.add_argument("--num_classes", type=int, default=100, help="Proxies (training classes; CUB has 100).")
    parser.add_argument("--embedding_dim", type=int, default=2048, help="Embedding size.")
    parser.add_argument("--mixed_precision", default="none", choices=PRECISIONS, help="Keras dtype policy.")
    parser.add_argument("--jit_compile", default="false", choices=("true", "false", "both"),
                        help="XLA for the train step; 'both' measures off and on, each in a fresh process.")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps; the median is reported.")
    parser.add_argument("--warmup_steps", type=int, default=3, help="Untimed steps first (at least 1: "
                        "the first step traces and compiles).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the weights and the synthetic batch.")
    parser.add_argument("--against", default="none", choices=("none", "torch"),
                        help="torch: also time the PyTorch reference loop of tools/torch_reference.py (the "
                        "parity harness') on the same shape, alternating fresh processes, and print the ratio.")
    parser.add_argument("--rounds", type=int, default=3, help="--against: alternations of the two processes; "
                        "each side's median step is the median over its rounds.")
    parser.add_argument("--framework", default="tensorflow", choices=("tensorflow", "torch"), help=argparse.SUPPRESS)
    add_output_arguments(parser, "the machine and the rows")
    args = parser.parse_args(argv)
    _check(parser, args)

    if args.worker_output:  # a child process: one measurement, written as JSON
        jit = args.jit_compile == "true"
        row = measure_torch(args) if args.framework == "torch" else measure(args, jit)
        write_json(args.worker_output, row)
        return
    if args.against == "torch":
        rows = [_run_in_fresh_process(args, args.jit_compile, framework)
                for _ in range(args.rounds) for framework in ("tensorflow", "torch")]
        machine = machine_info(gpus=rows[0]["gpus"], tensorflow=rows[0]["tensorflow"], keras=rows[0]["keras"],
                               torch=rows[1]["torch"])
        comparison = compare(rows)
        print(format_table(rows, machine))
        print(format_comparison(comparison))
        if args.json:
            write_results(args.json, __file__, argv, machine, rows, comparison=comparison)
        return
    if args.jit_compile == "both":
        rows = [_run_in_fresh_process(args, jit) for jit in ("false", "true")]
    else:
        rows = [measure(args, args.jit_compile == "true")]
    machine = machine_info(gpus=rows[0]["gpus"], tensorflow=rows[0]["tensorflow"], keras=rows[0]["keras"])
    print(format_table(rows, machine))
    if args.json:
        write_results(args.json, __file__, argv, machine, rows)


def _check(parser, args):
    if args.batch_size < 1 or args.classes_per_batch < 1 or args.batch_size % args.classes_per_batch:
        parser.error(f"--batch_size={args.batch_size} must be a positive multiple of "
                     f"--classes_per_batch={args.classes_per_batch}.")
    if args.classes_per_batch > args.num_classes:
        parser.error(f"--classes_per_batch={args.classes_per_batch} exceeds --num_classes={args.num_classes}.")
    if args.steps < 1:
        parser.error("--steps must be at least 1.")
    if (args.against == "torch" or args.framework == "torch") and (
            args.backbone != "resnet50_torchvision" or args.mixed_precision != "none"):
        parser.error("--against=torch compares the float32 torchvision-layout ResNet-50: "
                     "pass --backbone=resnet50_torchvision and --mixed_precision=none.")
    if args.against == "torch" and args.jit_compile == "both":
        parser.error("--against=torch compares one setting: give --jit_compile=true or false.")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1.")
    if args.warmup_steps < 1:
        parser.error("--warmup_steps must be at least 1: the first step traces (and with XLA compiles) the step.")


def measure(args, jit_compile):
    """Builds, compiles and times the train step in this process; returns the row (a dict)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from pnpp_tf.modeling.model import ProxyNCAModel, build_embedder, resolve_jit_compile
    from pnpp_tf.modeling.optimizers import TorchAdam

    load_before = os.getloadavg()[0]
    if args.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(args.mixed_precision)
    keras.utils.set_random_seed(args.seed)
    xla = resolve_jit_compile("true" if jit_compile else "false")
    embedder = build_embedder(args.backbone, args.image_size, args.embedding_dim, weights="none",
                              backbone_preset=args.backbone_preset or None)
    model = ProxyNCAModel(embedder, args.num_classes)
    model.compile(optimizer=TorchAdam(LEARNING_RATE), proxy_optimizer=TorchAdam(PROXY_LEARNING_RATE),
                  clip_value=CLIP_VALUE, jit_compile=xla)
    if bool(model.jit_compile) != xla:
        raise RuntimeError(f"Keras set jit_compile={model.jit_compile} although {xla} was asked for.")

    images, labels = (tf.constant(array) for array in synthetic_batch(args))
    seconds, cpu_seconds = [], []
    for step in range(args.warmup_steps + args.steps):
        with Stopwatch() as clock:
            logs = model.train_on_batch(images, labels, return_dict=True)  # returns once the step is done
        seconds.append(clock.seconds)
        cpu_seconds.append(clock.cpu_seconds)
        if not np.isfinite(logs["loss"]):
            raise RuntimeError(f"Step {step + 1} gave a non-finite loss {logs['loss']}.")
        phase = "warm-up" if step < args.warmup_steps else "timed"
        print(f"  XLA {'on' if xla else 'off'}: {phase} step {step + 1}: {seconds[-1] * 1e3:.1f} ms",
              file=sys.stderr, flush=True)
    row = _row(args, seconds, cpu_seconds, float(logs["loss"]), load_before, xla)
    row.update(framework="tensorflow", tensorflow=tf.__version__, keras=keras.__version__,
               gpus=len(tf.config.list_physical_devices("GPU")))
    return row


def _row(args, seconds, cpu_seconds, final_loss, load_before, jit_compile):
    """A measurement's row: the shape, the timed steps' statistics, the load."""
    timed = seconds[args.warmup_steps:]
    median = statistics.median(timed)
    # Cores the step kept busy: its CPU time over its wall time (below the core count when other
    # jobs take CPU time, or when the step cannot use every core).
    cores_busy = statistics.median(c / s for c, s in zip(cpu_seconds[args.warmup_steps:], timed))
    return {
        "backbone": f"{args.backbone}:{args.backbone_preset}" if args.backbone_preset else args.backbone,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "classes_per_batch": args.classes_per_batch,
        "num_classes": args.num_classes,
        "embedding_dim": args.embedding_dim,
        "precision": args.mixed_precision,
        "jit_compile": jit_compile,
        "warmup_steps": args.warmup_steps,
        "steps": args.steps,
        "first_step_seconds": seconds[0],
        "step_seconds": timed,
        "step_cpu_seconds": cpu_seconds[args.warmup_steps:],
        "cores_busy": cores_busy,
        "median_step_ms": median * 1e3,
        "min_step_ms": min(timed) * 1e3,
        "max_step_ms": max(timed) * 1e3,
        "images_per_second": args.batch_size / median,
        "final_loss": final_loss,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
    }


def measure_torch(args):
    """Times the PyTorch reference loop's step on the same shape in this process; returns the row."""
    import numpy as np
    import torch
    from torch_reference import build_reference

    load_before = os.getloadavg()[0]
    reference = build_reference(args.num_classes, args.embedding_dim, LEARNING_RATE, PROXY_LEARNING_RATE,
                                CLIP_VALUE, seed=args.seed, keep_gradients=False)
    reference.start_main()
    images, labels = synthetic_batch(args)
    seconds, cpu_seconds = [], []
    for step in range(args.warmup_steps + args.steps):
        with Stopwatch() as clock:
            loss = reference.step(images, labels)  # returns the loss as a float: the step is done
        seconds.append(clock.seconds)
        cpu_seconds.append(clock.cpu_seconds)
        if not np.isfinite(loss):
            raise RuntimeError(f"Step {step + 1} gave a non-finite loss {loss}.")
        print(f"  PyTorch: step {step + 1}: {seconds[-1] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    row = _row(args, seconds, cpu_seconds, loss, load_before, jit_compile=False)
    row.update(framework="torch", torch=torch.__version__, torch_threads=torch.get_num_threads())
    return row


def synthetic_batch(args):
    """One class-balanced batch: float32 images in [0, 255] [B, S, S, 3] and int32 labels [B]."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    images = rng.uniform(0.0, 255.0, shape).astype(np.float32)
    classes = rng.choice(args.num_classes, args.classes_per_batch, replace=False)
    return images, np.repeat(classes, args.batch_size // args.classes_per_batch).astype(np.int32)


def compare(rows):
    """Each framework's median over its rounds of the median step, and pnpp_tf's speed-up."""
    medians = {}
    for framework in ("tensorflow", "torch"):
        steps = [row["median_step_ms"] for row in rows if row["framework"] == framework]
        medians[framework] = statistics.median(steps)
    return {"median_step_ms": medians, "speedup": medians["torch"] / medians["tensorflow"],
            "rounds": sum(row["framework"] == "torch" for row in rows)}


def format_comparison(comparison):
    steps = comparison["median_step_ms"]
    return (f"pnpp_tf {steps['tensorflow']:.1f} ms, PyTorch {steps['torch']:.1f} ms per step (medians over "
            f"{comparison['rounds']} alternating rounds): pnpp_tf is {comparison['speedup']:.2f}x PyTorch's speed.")


def _run_in_fresh_process(args, jit, framework="tensorflow"):
    forwarded = ("backbone", "backbone_preset", "image_size", "batch_size", "classes_per_batch", "num_classes",
                 "embedding_dim", "mixed_precision", "steps", "warmup_steps", "seed")
    what = "PyTorch" if framework == "torch" else f"XLA {'on' if jit == 'true' else 'off'}"
    print(f"running {what} in a fresh process ...", file=sys.stderr, flush=True)
    return run_measurement(__file__, args, forwarded, [f"--jit_compile={jit}", f"--framework={framework}"], what)


def format_table(rows, machine):
    """The rows as one Markdown table, with the machine and the load underneath."""
    lines = [
        "| framework | backbone | image size | batch | precision | XLA | median step ms | images/s | "
        "min–max step ms | first step s | cores busy | load avg before/after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {_FRAMEWORKS[row['framework']]} | {row['backbone']} | {row['image_size']} | {row['batch_size']} | {row['precision']} | "
            f"{'on' if row['jit_compile'] else 'off'} | {row['median_step_ms']:.1f} | "
            f"{row['images_per_second']:.2f} | {row['min_step_ms']:.1f}–{row['max_step_ms']:.1f} | "
            f"{row['first_step_seconds']:.1f} | {row['cores_busy']:.2f} | "
            f"{row['load_average_before']:.2f}/{row['load_average_after']:.2f} |"
        )
    lines.append("")
    lines.append(
        f"Machine: {describe_machine(machine)}. "
        f"Median of {_plural(rows[0]['steps'], 'timed step')} after {_plural(rows[0]['warmup_steps'], 'warm-up step')}; "
        "first step: tracing (and XLA compilation) included; cores busy: the process' CPU time over "
        "wall time, median over the timed steps; load avg: the 1-minute load average."
    )
    return "\n".join(lines)


_FRAMEWORKS = {"tensorflow": "pnpp_tf", "torch": "PyTorch reference"}


def _plural(count, noun):
    return f"{count} {noun}{'' if count == 1 else 's'}"


if __name__ == "__main__":
    main()
