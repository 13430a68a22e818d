"""Training curves: loss, Recall@K and learning rates per epoch, from a history or TensorBoard logs.

The figure is `CURVES_SIZE` pixels; `save_run_curves` draws it as a run's flags say (the one
figure of pnpp_tf.train and tools/plot_training), and `read_tensorboard_history` recovers the
history of a run that wrote no results.json (e.g. an interrupted one).
"""

import glob
import os
import re

import numpy as np
from absl import logging
from matplotlib.ticker import MaxNLocator

from pnpp_tf.plots.figures import new_figure, save_png

CURVES_SIZE = (1350, 420)  # pixels, width x height

_RECALL = re.compile(r"^(test|val)_recall@(\d+)$")
_MAP = re.compile(r"^(test|val)_map@r$")


def save_training_curves(history, path, warmup_epochs=0, eval_every=1, epochs=None, title=None):
    """Draws loss, Recall@K (and MAP@R) and both learning rates per epoch, as a PNG.

    Args:
        history: {name: per-epoch values}, as results.json's "history" (or `fit().history`):
            "loss", "test_recall@K" or "val_recall@K", "test_map@r", "lr", "proxy_lr". Missing
            names leave their panel empty.
        path: the PNG to write.
        warmup_epochs: the first epochs with a frozen backbone, shaded.
        eval_every: `--eval_every` of the run: a metric with fewer values than "loss" was
            measured after every `eval_every`-th epoch.
        epochs: optional {name: 1-based epoch of each value}, overriding the above (e.g. from
            `read_tensorboard_history`).
        title: optional figure title.

    Returns:
        `path`; the image is `CURVES_SIZE` pixels.
    """
    series = _series(history, eval_every, epochs or {})
    figure = new_figure(CURVES_SIZE)
    loss_axes, recall_axes, lr_axes = figure.subplots(1, 3)
    last_epoch = max((int(x[-1]) for x, _ in series.values() if len(x)), default=1)

    for axes in (loss_axes, recall_axes, lr_axes):
        axes.set_xlabel("epoch")
        axes.set_xlim(0.5, last_epoch + 0.5)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if warmup_epochs:
            axes.axvspan(0.5, warmup_epochs + 0.5, color="0.88", zorder=0,
                         label="warm-up (backbone frozen)" if axes is loss_axes else None)

    _plot(loss_axes, series, "loss", "training loss", color="black")
    loss_axes.set_title("ProxyNCA++ loss")

    recall_names = sorted((name for name in series if _RECALL.match(name)),
                          key=lambda name: int(_RECALL.match(name).group(2)))
    for name in recall_names:
        k = int(_RECALL.match(name).group(2))
        _plot(recall_axes, series, name, f"Recall@{k}", linewidth=2.4 if k == 1 else 1.2)
    for name in (n for n in series if _MAP.match(n)):
        _plot(recall_axes, series, name, "MAP@R", linestyle="--", color="0.3")
    split = next((m.group(1) for m in map(_RECALL.match, recall_names) if m), "test")
    recall_axes.set_title(f"retrieval on the {'validation' if split == 'val' else 'test'} classes")
    recall_axes.set_ylim(0, 1)

    # One log axis: the two rates are orders of magnitude apart, and their drops show as steps.
    for name, what, colour in (("lr", "backbone + embedding", "tab:blue"),
                               ("proxy_lr", "proxies", "tab:orange")):
        if name in series:
            values = series[name][1]
            label = f"{name} ({what}): {values[0]:.0e} \u2192 {values[-1]:.0e}"
            _plot(lr_axes, series, name, label, color=colour, drawstyle="steps-mid")
    if any((series[n][1] > 0).all() for n in ("lr", "proxy_lr") if n in series):
        lr_axes.set_yscale("log")
    lr_axes.set_title("learning rates")

    for axes in (loss_axes, recall_axes, lr_axes):
        if any(line.get_label() and not line.get_label().startswith("_") for line in axes.lines):
            axes.legend(fontsize=8, loc="best")
        else:
            axes.text(0.5, 0.5, "not recorded", transform=axes.transAxes, ha="center",
                      color="0.5")
    if title:
        figure.suptitle(title)
    save_png(figure, path)
    return path


def save_run_curves(history, run_flags, path, run_name, epochs=None, title=None, eval_every=None):
    """Draws a training run's curves as pnpp_tf.train draws them into its curves.png.

    The run's flags say how to read the history: its warm-up epochs are shaded, and a
    --mode=trainval run evaluated every --eval_every epochs has its Recall@K drawn at those
    epochs (--mode=train validates after every epoch).

    Args:
        history: {name: per-epoch values}, results.json's "history".
        run_flags: the run's flags, results.json's "flags" (warmup_epochs, eval_every, mode,
            dataset, backbone; absent ones take their defaults).
        eval_every: the epochs between measurements the run used (results.json's "eval_every");
            None: the flags' value, or with --eval_every=auto what the history's lengths say.
        path: the PNG to write.
        run_name: the run's name for the title (its model_dir's last component).
        epochs: as `save_training_curves`.
        title: the figure title; default "<run_name>: <dataset> <backbone>".

    Returns:
        `path`; the image is `CURVES_SIZE` pixels.
    """
    if eval_every is None:
        eval_every = _eval_every(history, run_flags)
    if title is None:
        about = " ".join(filter(None, (run_flags.get("dataset"), run_flags.get("backbone"))))
        title = run_name + (f": {about}" if about else "")
    warmup_epochs = int(run_flags.get("warmup_epochs", 0) or 0)
    return save_training_curves(history, path, warmup_epochs=warmup_epochs, eval_every=eval_every,
                                epochs=epochs, title=title)


def _eval_every(history, run_flags):
    """The epochs between measurements, from the flags, or from the history for "auto"."""
    if run_flags.get("mode") == "train":
        return 1
    flag = str(run_flags.get("eval_every", 1) or 0)
    if flag.isascii() and flag.isdigit():
        return int(flag)
    epochs = len(history.get("loss", ()))
    measured = max((len(v) for k, v in history.items() if "recall@" in k), default=0)
    return epochs // measured if measured else 0


def read_tensorboard_history(log_dir):
    """Per-epoch scalars from the Keras TensorBoard logs of a run (`<model_dir>/logs`).

    Reads `<log_dir>/train/events.*` (or `log_dir` itself), where Keras writes "epoch_<name>"
    at 0-based step = epoch. If several runs wrote there, later files win. A truncated last
    record (an interrupted run) ends that file's reading.

    Returns:
        (history {name: values}, epochs {name: 1-based epochs}), for `save_training_curves`.

    Raises:
        ValueError: if there are no event files.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel - only this reader needs it

    folder = os.path.join(log_dir, "train")
    folder = folder if os.path.isdir(folder) else log_dir
    files = sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*")))
    if not files:
        raise ValueError(f"No TensorBoard event files in {folder}.")
    by_epoch = {}
    for file in files:
        try:
            for record in tf.data.TFRecordDataset(file):
                event = tf.compat.v1.Event.FromString(record.numpy())
                for value in event.summary.value:
                    if not value.tag.startswith("epoch_"):
                        continue
                    number = (float(tf.make_ndarray(value.tensor)) if value.HasField("tensor")
                              else float(value.simple_value))
                    by_epoch.setdefault(value.tag[len("epoch_"):], {})[int(event.step) + 1] = number
        except tf.errors.DataLossError:
            logging.warning("%s ends in a truncated record; using what precedes it", file)
    by_epoch.pop("learning_rate", None)  # Keras' own copy of "lr"
    history = {name: [v for _, v in sorted(values.items())] for name, values in by_epoch.items()}
    epochs = {name: sorted(values) for name, values in by_epoch.items()}
    return history, epochs


def _series(history, eval_every, epochs):
    """{name: (1-based epochs, values)} of every non-empty entry of `history`."""
    num_epochs = max((len(v) for v in history.values()), default=0)
    num_epochs = len(history.get("loss", ())) or num_epochs
    series = {}
    for name, values in history.items():
        values = [float(v) for v in values]
        if not values:
            continue
        if name in epochs:
            x = list(epochs[name])
        elif len(values) == num_epochs:
            x = list(range(1, num_epochs + 1))
        else:
            evaluated = [e for e in range(1, num_epochs + 1) if eval_every and e % eval_every == 0]
            if len(evaluated) == len(values):
                x = evaluated
            else:
                logging.warning("history[%r] has %d values for %d epochs; drawn at the last ones",
                                name, len(values), num_epochs)
                x = list(range(max(num_epochs, len(values)) - len(values) + 1,
                               max(num_epochs, len(values)) + 1))
        series[name] = (np.asarray(x, float), np.asarray(values, float))
    return series


def _plot(axes, series, name, label, **style):
    if name in series:
        x, y = series[name]
        axes.plot(x, y, label=label, marker="o" if len(x) < 30 else None, markersize=3, **style)
