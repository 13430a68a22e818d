"""Reruns the paper's ablation: the full ProxyNCA++ recipe, each "minus one component" variant,
a temperature sweep and the original ProxyNCA, each in its own model_dir.

    python tools/ablation.py --flagfile=configs/demo.flags --output_dir=runs/ablation

Every flag this script does not know is passed to `python -m pnpp_tf.train` for every variant.
With a transformer backbone (--backbone=keras_hub and a DINOv2, DINOv3 or ViT preset, whose
max/avg pooling is over the patch tokens) the variants include its CLS token (--pooling=cls).
A variant whose results.json exists is not run again (rerun the same command to resume). The
table goes to <output_dir>/ablation.json and ablation.md: Recall@1 (and the dataset's other
metrics), the delta to the full recipe, and the wall time of each run.
"""

import argparse
import os
import subprocess
import sys
import time

# Runnable as a plain script from a checkout: make `pnpp_tf` importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pnpp_tf.io_utils import OutOfSpaceError, read_json_object, write_atomic, write_json  # noqa: E402

# (name, what the paper calls the component, train flags of the variant). The learning rate of
# "no fast proxies" is filled in from the run's --lr.
COMPONENTS = (
    ("full", "ProxyNCA++: every component", ()),
    ("-proxy_assignment", "without the proxy assignment probability (ProxyNCA loss)", ("--loss=proxynca",)),
    ("-low_temperature", "without low temperature scaling (T = 1)", ("--temperature=1.0",)),
    ("-global_max_pooling", "global average pooling instead of max", ("--pooling=avg",)),
    ("-fast_proxies", "proxies at the backbone's learning rate", ("--proxy_lr={lr}",)),
    ("-layer_norm", "without LayerNorm", ("--layer_norm=false",)),
    ("-class_balanced", "batches without class balancing", ("--sampler=random",)),
    ("-warmup", "without the warm-up epochs", ("--warmup_epochs=0",)),
)
# Transformers only: their CLS token, the usual ViT embedding, against ProxyNCA++'s max pooling.
CLS_TOKEN = ("cls_token", "the CLS token instead of global max pooling (transformers)", ("--pooling=cls",))
# The sweep around the recipe's T = 1/9 ("full"); T = 1 is "-low_temperature".
TEMPERATURES = (("T=1/3", "0.3333333333333333"), ("T=1/27", "0.037037037037037035"))
ORIGINAL_PROXYNCA = ("--loss=proxynca", "--temperature=1.0", "--pooling=avg", "--layer_norm=false",
                     "--proxy_lr={lr}", "--sampler=random", "--warmup_epochs=0")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="One model_dir per variant is made here.")
    parser.add_argument("--only", default="", help="Comma-separated variant names to run (default: all).")
    args, train_args = parser.parse_known_args(argv)
    if any(a.startswith("--model_dir") for a in train_args):
        parser.error("--model_dir is chosen per variant under --output_dir; do not pass it.")
    lr = _flag_value(train_args, "lr")
    try:
        variants = _variants(lr, _has_cls_token(train_args))
    except ValueError as error:  # pnpp_tf.errors.UserError: a preset that does not load, keras-hub missing
        print(f"tools/ablation.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {name for name, _, _ in variants})
        if unknown:
            parser.error(f"--only: unknown variants {unknown}; choose from {[n for n, _, _ in variants]}.")
        variants = [v for v in variants if v[0] in wanted]

    try:
        table = _run_variants(args.output_dir, variants, train_args)
        _write(args.output_dir, table)
    except (ValueError, OutOfSpaceError) as error:
        print(f"tools/ablation.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(_markdown(table))


def _run_variants(output_dir, variants, train_args):
    """Trains each variant not trained before; returns the table's rows, with their deltas.

    Raises:
        ValueError: a finished variant's results.json is unreadable.
    """
    os.makedirs(output_dir, exist_ok=True)
    rows = []
    for index, (name, description, flags) in enumerate(variants, start=1):
        model_dir = os.path.join(output_dir, _directory_name(name))
        results_file = os.path.join(model_dir, "results.json")
        if os.path.isfile(results_file):
            print(f"[{index}/{len(variants)}] {name}: done before, reading {results_file}", flush=True)
        else:
            print(f"[{index}/{len(variants)}] {name}: {description} ({' '.join(flags) or 'recipe as given'})",
                  flush=True)
            start = time.perf_counter()
            command = [sys.executable, "-m", "pnpp_tf.train", *train_args, *flags,
                       f"--model_dir={model_dir}", "--verbose=0"]
            if subprocess.run(command, check=False).returncode:
                raise SystemExit(f"tools/ablation.py: variant {name} failed; its log is above. Fix it and "
                                 "rerun the same command: finished variants are kept.")
            print(f"    finished in {time.perf_counter() - start:.0f} s", flush=True)
        rows.append(_row(name, description, flags, results_file))
    return _with_deltas(rows)


def _variants(lr, cls_token=False):
    def fill(flags):
        return tuple(flag.format(lr=lr) for flag in flags)

    variants = [(name, description, fill(flags)) for name, description, flags in COMPONENTS]
    if cls_token:
        variants.append(CLS_TOKEN)
    variants += [(name, f"temperature {name[2:]}", (f"--temperature={value}",)) for name, value in TEMPERATURES]
    variants.append(("proxynca", "the original ProxyNCA: every component off", fill(ORIGINAL_PROXYNCA)))
    return variants


def _has_cls_token(train_args):
    """Whether the run's backbone is a KerasHub transformer with a CLS token (reads its preset)."""
    preset = _flag_value(train_args, "backbone_preset")
    if _flag_value(train_args, "backbone") != "keras_hub" or not preset:
        return False
    from pnpp_tf.modeling.hub_backbones import preset_token_layout  # pylint: disable=import-outside-toplevel - TF, keras-hub

    layout = preset_token_layout(preset)
    return layout is not None and layout.has_cls


def _flag_value(train_args, name):
    """The last value of --name in the arguments or in the flagfiles they name."""
    value = None
    for arg in train_args:
        if arg.startswith("--flagfile="):
            with open(arg.split("=", 1)[1], encoding="utf-8") as file:
                nested = [line.strip() for line in file if line.strip().startswith("--")]
            value = _flag_value(nested, name) or value
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
    if value is None and name == "lr":
        return "4e-3"  # the default of pnpp_tf.flags
    return value


def _row(name, description, flags, results_file):
    """The table's row of a variant, from its results.json."""
    results = read_json_object(results_file, "results.json of a training run")
    try:
        return _row_of(name, description, flags, results)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{results_file} lacks what a finished run records ({type(error).__name__}: "
                         f"{error}); delete it to train the variant {name} again.") from None


def _row_of(name, description, flags, results):
    metrics = results["metrics"]
    return {
        "variant": name,
        "description": description,
        "flags": list(flags),
        "metrics": {k: v for k, v in metrics.items() if k.startswith(("recall@", "map@r", "r_precision", "nmi"))},
        "before_training_recall@1": results["before_training"]["recall@1"],
        "train_seconds": results["timings"]["train_seconds"],
        "dataset": results["dataset"],
        "image_size": results["flags"]["image_size"],
    }


def _with_deltas(rows):
    full = next((r for r in rows if r["variant"] == "full"), None)
    for row in rows:
        row["delta_recall@1"] = None if full is None else row["metrics"]["recall@1"] - full["metrics"]["recall@1"]
    return rows


def _markdown(rows):
    metric_names = list(rows[0]["metrics"]) if rows else []
    header = ["variant", *metric_names, "Δ R@1 vs full", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        delta = "" if row["delta_recall@1"] is None else f"{100 * row['delta_recall@1']:+.1f}"
        cells = [row["variant"], *(f"{row['metrics'][m]:.4f}" for m in metric_names), delta,
                 f"{row['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if rows:
        lines.append(f"\nData: {rows[0]['dataset']}, {rows[0]['image_size']} px.")
    return "\n".join(lines)


def _write(output_dir, rows):
    write_json(os.path.join(output_dir, "ablation.json"), rows)
    write_atomic(os.path.join(output_dir, "ablation.md"), _markdown(rows) + "\n")


def _directory_name(name):
    return name.replace("/", "_").replace("=", "_").lstrip("-")


if __name__ == "__main__":
    main()
