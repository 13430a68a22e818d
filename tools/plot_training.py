"""Draws a training run's curves (loss, Recall@K and MAP@R, both learning rates) as a PNG.

    python tools/plot_training.py --model_dir=runs/demo           # writes runs/demo/curves.png
    python tools/plot_training.py --model_dir=runs/demo --source=logs --output=/tmp/curves.png

The curves come from results.json's per-epoch "history" or, for a run that has not finished (no
results.json yet), from its TensorBoard logs (<model_dir>/logs/train). --source picks one. The
warm-up epochs are shaded, and a run evaluated every N epochs (--eval_every) has its Recall@K
drawn at those epochs. The training CLI draws the same figure at the end of every run.
"""

import argparse
import os
import sys

# Runnable as a plain script from a checkout: make `pnpp_tf` importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pnpp_tf import plots  # noqa: E402
from pnpp_tf.io_utils import OutOfSpaceError, read_json_object  # noqa: E402

SOURCES = ("auto", "results", "logs")


def plot_run(model_dir, output=None, source="auto", title=None):
    """Writes the curves of the run in `model_dir`; returns (output path, source used).

    Raises:
        ValueError: if the chosen source is missing, unreadable or holds no history.
        OutOfSpaceError: the disk filled up; no partial PNG is left.
    """
    if source not in SOURCES:
        raise ValueError(f"--source must be one of {', '.join(SOURCES)}, got {source!r}.")
    if not model_dir or not os.path.isdir(model_dir):
        raise ValueError(f"--model_dir={model_dir} is not a directory.")
    output = output or os.path.join(model_dir, "curves.png")
    results_path = os.path.join(model_dir, "results.json")
    results = {}
    if os.path.isfile(results_path):
        results = read_json_object(results_path, "results.json of a training run")
    run_flags = results.get("flags", {})
    history, epochs = results.get("history") or {}, None
    if source == "results" and not history:
        raise ValueError(f"{results_path} is missing or has no history; try --source=logs.")
    if source == "logs" or (source == "auto" and not history):
        log_dir = os.path.join(model_dir, "logs")
        if not os.path.isdir(log_dir):
            raise ValueError(f"{model_dir} has neither a results.json with a history nor logs/; "
                             "is it a training run's --model_dir?")
        history, epochs = plots.read_tensorboard_history(log_dir)
        source = "logs"
    else:
        source = "results"
    if not any(history.values()):
        raise ValueError(f"The {source} of {model_dir} record no epoch.")
    if title is None:
        about = " ".join(filter(None, (run_flags.get("dataset"), run_flags.get("backbone"))))
        title = os.path.basename(os.path.normpath(model_dir)) + (f": {about}" if about else "")
    plots.save_training_curves(
        history, output, warmup_epochs=int(run_flags.get("warmup_epochs", 0) or 0),
        eval_every=int(run_flags.get("eval_every", 1) or 0), epochs=epochs, title=title)
    return output, source


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="The training run's --model_dir.")
    parser.add_argument("--output", default=None,
                        help="PNG to write (default: <model_dir>/curves.png).")
    parser.add_argument("--source", default="auto", choices=SOURCES,
                        help="results (results.json), logs (TensorBoard) or auto (results if any).")
    parser.add_argument("--title", default=None,
                        help="Figure title (default: the model_dir's name, dataset and backbone).")
    args = parser.parse_args(argv)
    try:
        output, source = plot_run(args.model_dir, args.output, args.source, args.title)
    except (ValueError, OutOfSpaceError) as error:
        print(f"plot_training.py: error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {output} ({plots.CURVES_SIZE[0]}x{plots.CURVES_SIZE[1]} px) from the {source} "
          f"of {args.model_dir}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
