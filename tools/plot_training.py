"""Draws a training run's curves (loss, Recall@K and MAP@R, both learning rates) as a PNG.

    python tools/plot_training.py --model_dir=runs/demo           # writes runs/demo/curves.png
    python tools/plot_training.py --model_dir=runs/demo --source=logs --output=/tmp/curves.png

The curves come from results.json's per-epoch "history" or, for a run that has not finished (no
results.json yet), from its TensorBoard logs (<model_dir>/logs/train). --source picks one. The
warm-up epochs are shaded, and a run evaluated every N epochs (--eval_every) has its Recall@K
drawn at those epochs. The training CLI draws the same figure (`pnpp_tf.plots.save_run_curves`)
at the end of every run.
"""

import argparse
import os
import sys

# Runnable as a plain script from a checkout: make `pnpp_tf` importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pnpp_tf import plots  # noqa: E402
from pnpp_tf.artifacts.model_dir import ModelDir  # noqa: E402
from pnpp_tf.errors import UserError  # noqa: E402
from pnpp_tf.io_utils import OutOfSpaceError  # noqa: E402

SOURCES = ("auto", "results", "logs")


def plot_run(model_dir, output=None, source="auto", title=None):
    """Writes the curves of the run in `model_dir`; returns (output path, source used).

    Raises:
        UserError: if the chosen source is missing, unreadable or holds no history.
        OutOfSpaceError: the disk filled up; no partial PNG is left.
    """
    if source not in SOURCES:
        raise UserError(f"--source must be one of {', '.join(SOURCES)}, got {source!r}.")
    if not model_dir or not os.path.isdir(model_dir):
        raise UserError(f"--model_dir={model_dir} is not a directory.")
    run = ModelDir(model_dir)
    results = run.read_results()
    run_flags = results.flags if results else {}
    history, epochs = results.history if results else {}, None
    if source == "results" and not history:
        raise UserError(f"{run.results_path} is missing or has no history; try --source=logs.")
    if source == "logs" or (source == "auto" and not history):
        log_dir = os.path.join(model_dir, "logs")
        if not os.path.isdir(log_dir):
            raise UserError(f"{model_dir} has neither a results.json with a history nor logs/; "
                            "is it a training run's --model_dir?")
        history, epochs = plots.read_tensorboard_history(log_dir)
        source = "logs"
    else:
        source = "results"
    if not any(history.values()):
        raise UserError(f"The {source} of {model_dir} record no epoch.")
    output = output or run.curves_path
    plots.save_run_curves(history, run_flags, output, os.path.basename(os.path.normpath(model_dir)),
                          epochs=epochs, title=title, eval_every=results.data.get("eval_every") if results else None)
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
