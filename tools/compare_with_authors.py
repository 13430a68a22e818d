"""Trains the authors' ProxyNCA++ code and pnpp_tf on the same folder dataset with the same recipe,
several seeds each, and prints both per-epoch Recall@1 curves with their seed spread.

    # once: a checkout of github.com/euwern/proxynca_pp (not kept in this repository)
    git --git-dir=<bare clone> archive HEAD | tar -x -C /tmp/proxynca_pp
    python tools/compare_with_authors.py --authors_dir=/tmp/proxynca_pp --data_dir=data/glyphs \\
        --work_dir=/tmp/compare --seeds=0,1,2 --epochs=3 --json=compare.json

The authors' side runs in its own process under `--torch_python` (a Python with torch,
torchvision, scikit-learn, h5py, tqdm and matplotlib, and without TensorFlow imported: importing
TensorFlow before torch can crash torch's optimisers). Their code expects CUDA and their own
dataset files, so a scratch copy is patched at run time (tools/authors_patches.py: each patch,
and why) and configured through their own config files: the recipe in config/compare.json, the
class ranges and crop size in dataset/config.json, the folder dataset laid out (symlinks) as the
ImageFolder their CUBirds class reads. Their train mode evaluates on the "val" classes after every
epoch; here those are the test classes, and one patch adds the same evaluation after the warm-up.

pnpp_tf runs as `python -m pnpp_tf.train --dataset=folder --mode=trainval --eval_every=1` (its
history keeps test Recall@1 after each epoch, warm-up included).

Point i of each curve is Recall@1 on the test classes after epoch i (0: after the warm-up). The
two sides alternate seed by seed, so that a change in the machine's load falls on both.
`--sides` runs one side only; `--from_json` re-aggregates runs from earlier output files (which
hold the runs finished so far from the first run on, so an interrupted comparison loses only the
run it was in).
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from authors_patches import list_classes, parse_authors_log, prepare_authors_copy  # noqa: E402
from machine import machine_info, write_json  # noqa: E402
from parity_with_reference import RECIPE  # noqa: E402 (imports neither TensorFlow nor torch)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDES = ("authors", "pnpp_tf")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--authors_dir", default="", help="A checkout of github.com/euwern/proxynca_pp (left "
                        "untouched: a patched copy goes under --work_dir).")
    parser.add_argument("--data_dir", default=os.path.join(REPO, "data", "glyphs"),
                        help="Folder dataset: train/<class>/<image> and test/<class>/<image>.")
    parser.add_argument("--work_dir", required=True, help="Scratch directory: the patched copy, model dirs, logs.")
    parser.add_argument("--images_per_class", default="", help="e.g. 4,5: train and test both sides on a subset "
                        "of --data_dir with 4 images in the first class, 5 in the second, and so on (chosen "
                        "at random, seed 0), laid out as symbolic links under <work_dir>/subset.")
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds; each side trains once per seed.")
    parser.add_argument("--sides", default="authors,pnpp_tf", help="Which sides to run: authors, pnpp_tf or both.")
    parser.add_argument("--epochs", type=int, default=3, help="Main epochs after the warm-up.")
    parser.add_argument("--warmup_epochs", type=int, default=1)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--embedding_dim", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--classes_per_batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=RECIPE["lr"])
    parser.add_argument("--proxy_lr", type=float, default=RECIPE["proxy_lr"])
    parser.add_argument("--torch_python", default=sys.executable, help="Python that runs the authors' code.")
    parser.add_argument("--tf_python", default=sys.executable, help="Python that runs pnpp_tf.")
    parser.add_argument("--pnpp_tf_flags", default="", help="Extra flags for pnpp_tf.train (space-separated), "
                        "e.g. to switch one difference.")
    parser.add_argument("--label", default="", help="Names this configuration in the output (default: the sides).")
    parser.add_argument("--json", default="", help="Write the runs and the aggregated curves here.")
    parser.add_argument("--from_json", default="", help="Comma-separated earlier --json files: aggregate their "
                        "runs (no training).")
    args = parser.parse_args(argv)

    if args.from_json:
        runs = []
        for path in args.from_json.split(","):
            with open(path, encoding="utf-8") as f:
                runs.extend(json.load(f)["runs"])
    else:
        runs = train_all(args)
    report = {"runs": runs, "curves": aggregate(runs), "machine": machine_info(), "argv": sys.argv[1:] if argv is None
              else list(argv)}
    report["comparison"] = compare(report["curves"])
    print(format_table(report["curves"], report["comparison"]))
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")


def train_all(args):
    sides = [s for s in args.sides.split(",") if s]
    unknown = set(sides) - set(SIDES)
    if unknown:
        raise SystemExit(f"--sides: unknown {sorted(unknown)}; choose from {SIDES}.")
    if "authors" in sides and not args.authors_dir:
        raise SystemExit("--authors_dir is needed for the authors' side.")
    os.makedirs(args.work_dir, exist_ok=True)
    if args.images_per_class:
        counts = [int(n) for n in args.images_per_class.split(",")]
        args.data_dir = link_subset(args.data_dir, os.path.join(args.work_dir, "subset"), counts)
        print(f"subset of {counts} images a class in {args.data_dir}", flush=True)
    recipe = dict(epochs=args.epochs, warmup_epochs=args.warmup_epochs, batch_size=args.batch_size,
                  classes_per_batch=args.classes_per_batch, embedding_dim=args.embedding_dim, lr=args.lr,
                  proxy_lr=args.proxy_lr, image_size=args.image_size)
    prepared = None
    if "authors" in sides:
        prepared = prepare_authors_copy(os.path.abspath(args.authors_dir), os.path.abspath(args.work_dir),
                                        os.path.abspath(args.data_dir), **recipe)
        print(f"authors' copy patched ({', '.join(prepared['patches'])}) in {prepared['code_dir']}", flush=True)
    runs = []
    for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
        for side in sides:
            start = time.time()
            if side == "authors":
                curve = run_authors(args, prepared, seed)
            else:
                curve = run_pnpp_tf(args, recipe, seed)
            run = {"side": side, "label": args.label or side, "seed": seed, "recall_at_1": curve,
                   "seconds": round(time.time() - start, 1)}
            print(json.dumps(run), flush=True)
            runs.append(run)
            if args.json:  # so far: an interrupted comparison keeps the runs it finished
                write_json(args.json, {"runs": runs, "partial": True})
    return runs


def link_subset(data_dir, out_dir, counts, seed=0):
    """Lays out a subset of a folder dataset as symbolic links: in each split, the i-th class
    (sorted by name) keeps counts[i % len(counts)] of its images (all, if it has fewer), chosen
    with `random.Random(seed)`. Returns out_dir; an existing subset must be the same one."""
    if not counts or min(counts) < 1:
        raise SystemExit(f"--images_per_class={counts}: give positive counts, e.g. 4,5.")
    rng = random.Random(seed)
    wanted = {}
    for split in sorted(os.listdir(data_dir)):
        split_dir = os.path.join(data_dir, split)
        if not os.path.isdir(split_dir):
            continue
        for i, name in enumerate(list_classes(split_dir)):
            images = sorted(os.listdir(os.path.join(split_dir, name)))
            keep = sorted(rng.sample(images, min(len(images), counts[i % len(counts)])))
            for image in keep:
                wanted[os.path.join(split, name, image)] = os.path.abspath(os.path.join(split_dir, name, image))
    if os.path.isdir(out_dir):
        existing = {os.path.relpath(os.path.join(root, name), out_dir): os.readlink(os.path.join(root, name))
                    for root, _, names in os.walk(out_dir) for name in names}
        if existing != wanted:
            raise SystemExit(f"{out_dir} holds a different subset: remove it.")
        return out_dir
    for relative, target in wanted.items():
        os.makedirs(os.path.dirname(os.path.join(out_dir, relative)), exist_ok=True)
        os.symlink(target, os.path.join(out_dir, relative))
    return out_dir


def run_authors(args, prepared, seed):
    """Their train.py (train mode) in its own process; returns Recall@1 after each epoch."""
    code_dir = prepared["code_dir"]
    log_path = os.path.join(code_dir, "log", f"cub_compare_train_{seed}.log")
    if os.path.exists(log_path):
        os.remove(log_path)  # their logging appends
    command = [args.torch_python, "train.py", "--dataset=cub", "--config=config/compare.json", "--mode=train",
               f"--seed={seed}", "--workers=0"]
    _run(command, code_dir, os.path.join(args.work_dir, f"authors_seed{seed}.out"))
    with open(log_path, encoding="utf-8") as f:
        curve = parse_authors_log(f.read())
    _check_length(curve, args, "authors", log_path)
    return curve


def run_pnpp_tf(args, recipe, seed):
    """pnpp_tf.train in its own process; returns test Recall@1 after each epoch."""
    model_dir = os.path.join(os.path.abspath(args.work_dir), f"pnpp_tf_{args.label or 'pnpp_tf'}_seed{seed}")
    if os.path.isdir(model_dir):
        raise SystemExit(f"{model_dir} exists: pnpp_tf would resume from it; remove it or choose another "
                         "--work_dir or --label.")
    command = [args.tf_python, "-m", "pnpp_tf.train", "--dataset=folder",
               f"--data_dir={os.path.abspath(args.data_dir)}", f"--model_dir={model_dir}", "--mode=trainval", "--backbone=resnet50_torchvision", "--weights=none",
               f"--embedding_dim={recipe['embedding_dim']}", f"--batch_size={recipe['batch_size']}",
               f"--classes_per_batch={recipe['classes_per_batch']}", f"--lr={recipe['lr']}",
               f"--proxy_lr={recipe['proxy_lr']}", f"--warmup_epochs={recipe['warmup_epochs']}",
               f"--epochs={recipe['epochs']}", f"--image_size={recipe['image_size']}", "--eval_distance=euclidean",
               "--eval_every=1", f"--seed={seed}", "--verbose=2", *args.pnpp_tf_flags.split()]
    _run(command, REPO, os.path.join(args.work_dir, f"pnpp_tf_{args.label or 'pnpp_tf'}_seed{seed}.out"))
    with open(os.path.join(model_dir, "results.json"), encoding="utf-8") as f:
        curve = json.load(f)["history"]["test_recall@1"]
    _check_length(curve, args, "pnpp_tf", model_dir)
    return curve


def _run(command, cwd, out_path):
    with open(out_path, "w", encoding="utf-8") as out:
        code = subprocess.call(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"{' '.join(command)} failed ({code}); see {out_path}")


def _check_length(curve, args, side, where):
    expected = (1 if args.warmup_epochs else 0) + args.epochs
    if len(curve) != expected:
        raise SystemExit(f"{side}: {len(curve)} Recall@1 values in {where}, expected {expected} (after the "
                         "warm-up and after each main epoch).")


def aggregate(runs):
    """{label: {"seeds": [...], "epochs": [{"mean", "std", "min", "max", "n"} per point]}}."""
    curves = {}
    for run in runs:
        curves.setdefault(run["label"], []).append(run)
    out = {}
    for label, group in curves.items():
        lengths = {len(run["recall_at_1"]) for run in group}
        if len(lengths) != 1:
            raise ValueError(f"{label}: runs of different lengths {sorted(lengths)}")
        points = []
        for values in zip(*(run["recall_at_1"] for run in group)):
            points.append({"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1
                           else 0.0, "min": min(values), "max": max(values), "n": len(values)})
        out[label] = {"seeds": [run["seed"] for run in group], "epochs": points}
    return out


def compare(curves, reference="authors"):
    """For every other label, per point: its mean minus the reference's mean, whether its mean
    lies within the reference's seed range [min, max], and Welch's t of the two means (the gap
    over its standard error; None with fewer than two seeds a side or no spread)."""
    if reference not in curves:
        return {}
    ref = curves[reference]["epochs"]
    result = {}
    for label, curve in curves.items():
        if label == reference:
            continue
        rows = []
        for mine, theirs in zip(curve["epochs"], ref):
            error = (mine["std"] ** 2 / mine["n"] + theirs["std"] ** 2 / theirs["n"]) ** 0.5
            welch_t = (mine["mean"] - theirs["mean"]) / error if min(mine["n"], theirs["n"]) > 1 and error else None
            rows.append({"gap": mine["mean"] - theirs["mean"],
                         "within_reference_range": theirs["min"] <= mine["mean"] <= theirs["max"],
                         "reference_std": theirs["std"], "welch_t": welch_t})
        result[label] = rows
    return result


def format_table(curves, comparison=None):
    """Recall@1 (%) per point: mean ± std [min, max] per label, and the gaps to the authors."""
    labels = list(curves)
    lines = ["Recall@1 (%) on the test classes, mean ± std [min, max] over seeds; point 0 is after the warm-up",
             "| point | " + " | ".join(f"{label} (n={len(curves[label]['seeds'])})" for label in labels) + " |",
             "|---|" + "---|" * len(labels)]
    points = max(len(c["epochs"]) for c in curves.values())
    for i in range(points):
        cells = []
        for label in labels:
            p = curves[label]["epochs"][i] if i < len(curves[label]["epochs"]) else None
            cells.append("" if p is None else
                         f"{100 * p['mean']:.1f} ± {100 * p['std']:.1f} [{100 * p['min']:.1f}, {100 * p['max']:.1f}]")
        name = "warm-up" if i == 0 else f"epoch {i}"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for label, rows in (comparison or {}).items():
        gaps = ", ".join(f"{100 * r['gap']:+.1f}{'' if r['within_reference_range'] else '*'}" for r in rows)
        lines.append(f"{label} − authors (points; * = outside the authors' seed range): {gaps}")
        ts = ", ".join("" if r["welch_t"] is None else f"{r['welch_t']:+.1f}" for r in rows)
        lines.append(f"{label} − authors, Welch's t (|t| > 2: a gap beyond the seeds' spread): {ts}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
