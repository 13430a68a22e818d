"""Keras callbacks for training: zero-shot Recall@K, learning-rate logging and schedules."""

import time

import keras
from absl import logging

from pnpp_tf.io_utils import write_json


class RecallAtK(keras.callbacks.Callback):
    """Embeds the evaluation split every `every_n_epochs` epochs and logs Recall@K.

    The values go into the epoch logs as "<prefix>recall@K" (and "<prefix>map@r"), so History,
    TensorBoard and any later callback see them.

    Args:
        evaluator: a `pnpp_tf.retrieval.RetrievalEvaluator`.
        every_n_epochs: evaluate after every n-th epoch (and never when n is 0).
        prefix: prefix of the logged names.
    """

    def __init__(self, evaluator, every_n_epochs=1, prefix="test_"):
        super().__init__()
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0, got {every_n_epochs}.")
        self.evaluator = evaluator
        self.every_n_epochs = every_n_epochs
        self.prefix = prefix

    def on_epoch_end(self, epoch, logs=None):
        if not self.every_n_epochs or (epoch + 1) % self.every_n_epochs:
            return
        start = time.perf_counter()
        metrics = self.evaluator.measure(self.model)
        logged = {f"recall@{k}": metrics[f"recall@{k}"] for k in self.evaluator.ks}
        logged["map@r"] = metrics["map@r"]
        if logs is not None:
            logs.update({self.prefix + name: value for name, value in logged.items()})
        summary = " ".join(f"{name}={value:.4f}" for name, value in logged.items())
        logging.info("epoch %d %s: %s (%.1fs)", epoch + 1, self.prefix.rstrip("_"), summary,
                     time.perf_counter() - start)


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the main ("lr") and the proxy ("proxy_lr") learning rates to the epoch logs."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for name, rate in zip(("lr", "proxy_lr"), _learning_rates(self.model)):
            logs[name] = rate


class PlateauSchedule(keras.callbacks.Callback):
    """Stage 1 of the paper's schedule: ReduceLROnPlateau on validation Recall@1.

    Follows PyTorch's ReduceLROnPlateau(mode="max", factor, patience, threshold=1e-4 relative):
    after more than `patience` epochs without improvement, both optimisers' learning rates (main
    and proxies, as the authors' single optimiser has both groups) are multiplied by `factor`.
    The epochs of the drops and the best epoch, counted in main (post-warm-up) epochs completed,
    are written to `path` after every epoch, for `--lr_schedule_from` in stage 2.

    Args:
        path: JSON file receiving {"lr_drop_epochs", "best_epoch", "best_value", "monitor"}.
        monitor: the log entry to maximise.
        factor: learning-rate multiplier at each drop.
        patience: epochs without improvement tolerated before a drop.
        first_epoch: Keras epoch index of the first main epoch (= the number of warm-up epochs).
    """

    THRESHOLD = 1e-4

    def __init__(self, path, monitor="val_recall@1", factor=0.1, patience=4, first_epoch=0):
        super().__init__()
        self.path = path
        self.monitor = monitor
        self.factor = factor
        self.patience = patience
        self.first_epoch = first_epoch
        self.best_value = None
        self.best_epoch = 0
        self.lr_drop_epochs = []
        self._bad_epochs = 0

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or self.monitor not in logs:
            raise ValueError(f"PlateauSchedule needs {self.monitor!r} in the epoch logs; "
                             "evaluate every epoch before this callback runs.")
        completed = epoch - self.first_epoch + 1
        value = float(logs[self.monitor])
        if self.best_value is None or value > self.best_value * (1 + self.THRESHOLD):
            self.best_value, self.best_epoch, self._bad_epochs = value, completed, 0
        else:
            self._bad_epochs += 1
        if self._bad_epochs > self.patience:
            scale_learning_rates(self.model, self.factor)
            self.lr_drop_epochs.append(completed)
            self._bad_epochs = 0
            logging.info("%s has not improved for %d epochs: learning rates x%g after epoch %d",
                         self.monitor, self.patience + 1, self.factor, completed)
        write_json(self.path, self.get_state())

    def get_state(self):
        """The schedule's state, JSON-able (written to `path`; saved in checkpoints)."""
        return {"monitor": self.monitor, "best_value": self.best_value, "best_epoch": self.best_epoch,
                "lr_drop_epochs": self.lr_drop_epochs, "bad_epochs": self._bad_epochs}

    def set_state(self, state):
        """Continues from a `get_state()` of an interrupted run."""
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        self.lr_drop_epochs, self._bad_epochs = list(state["lr_drop_epochs"]), state["bad_epochs"]


class MultiStepSchedule(keras.callbacks.Callback):
    """Stage 2 of the paper's schedule: both learning rates times `factor` at given epochs.

    Like PyTorch's MultiStepLR stepped once per epoch: during main epoch e (0-based), the rates
    are the initial ones times factor ** (number of drop epochs <= e).

    Args:
        drop_epochs: main epochs completed after which the rates drop (from `PlateauSchedule`).
        initial_rates: the (main, proxy) learning rates before any drop.
        factor: multiplier per drop.
        first_epoch: Keras epoch index of the first main epoch.
    """

    def __init__(self, drop_epochs, initial_rates, factor=0.1, first_epoch=0):
        super().__init__()
        self.drop_epochs = sorted(int(e) for e in drop_epochs)
        self.initial_rates = tuple(initial_rates)
        self.factor = factor
        self.first_epoch = first_epoch

    def on_epoch_begin(self, epoch, logs=None):
        drops = sum(1 for e in self.drop_epochs if e <= epoch - self.first_epoch)
        for optimizer, initial in zip(_optimizers(self.model), self.initial_rates):
            optimizer.learning_rate = initial * self.factor ** drops


def scale_learning_rates(model, factor):
    """Multiplies the learning rate of the model's main and proxy optimisers by `factor`."""
    for optimizer, rate in zip(_optimizers(model), _learning_rates(model)):
        optimizer.learning_rate = rate * factor


def _optimizers(model):
    return [o for o in (model.optimizer, getattr(model, "proxy_optimizer", None)) if o is not None]


def _learning_rates(model):
    return [float(keras.ops.convert_to_numpy(o.learning_rate)) for o in _optimizers(model)]
