"""Keras callbacks for training: zero-shot Recall@K, learning rates and their schedules, the
training clock, a stop on non-finite losses and checkpoints."""

import math
import time

import keras
from absl import logging

from pnpp_tf.io_utils import write_json

# Where `PlateauSchedule` writes stage 1's schedule in its run directory (--lr_schedule_from reads it).
SCHEDULE_FILE = "schedule.json"


class RecallAtK(keras.callbacks.Callback):
    """Embeds the evaluation split every `every_n_epochs` epochs and logs Recall@K.

    The values go into the epoch logs as "<prefix>recall@K" (and "<prefix>map@r"), so History,
    TensorBoard and any later callback see them. After the run's last epoch it measures
    everything the final results report (with NMI if asked), kept as `final_metrics`, so that
    the same weights are not embedded twice.

    Args:
        evaluator: a `pnpp_tf.retrieval.evaluator.RetrievalEvaluator`.
        every_n_epochs: evaluate after every n-th epoch (and never when n is 0).
        prefix: prefix of the logged names.
        last_epoch: the Keras index of the run's last epoch, measured in full whatever
            `every_n_epochs` says; None: none is.
        with_nmi: the measurement after `last_epoch` includes NMI.
        distance: "cosine" or "euclidean" (`RetrievalEvaluator.measure`); None: the evaluator's.

    Attributes:
        final_metrics: the metrics after `last_epoch`, once it has been trained; else None.
        seconds: the time spent measuring after epochs, that final measurement left out.
        final_seconds: the time the final measurement took.
    """

    def __init__(self, evaluator, every_n_epochs=1, prefix="test_", last_epoch=None, with_nmi=False,
                 distance=None):
        super().__init__()
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0, got {every_n_epochs}.")
        self.evaluator = evaluator
        self.every_n_epochs = every_n_epochs
        self.prefix = prefix
        self.last_epoch = last_epoch
        self.with_nmi = with_nmi
        self.distance = distance
        self.final_metrics = None
        self.seconds = 0.0
        self.final_seconds = None

    def on_epoch_end(self, epoch, logs=None):
        if self.model.stop_training:
            return  # an epoch cut short (a non-finite loss) has nothing worth measuring
        last = epoch == self.last_epoch
        if not last and (not self.every_n_epochs or (epoch + 1) % self.every_n_epochs):
            return
        start = time.perf_counter()
        metrics = self.evaluator.measure(self.model, with_nmi=last and self.with_nmi, distance=self.distance)
        if last:
            self.final_metrics, self.final_seconds = metrics, time.perf_counter() - start
        else:
            self.seconds += time.perf_counter() - start
        if not self.every_n_epochs or (epoch + 1) % self.every_n_epochs:
            return  # measured for the results only: the history keeps its --eval_every rhythm
        logged = {f"recall@{k}": metrics[f"recall@{k}"] for k in self.evaluator.ks}
        logged["map@r"] = metrics["map@r"]
        if logs is not None:
            logs.update({self.prefix + name: value for name, value in logged.items()})
        summary = " ".join(f"{name}={value:.4f}" for name, value in logged.items())
        logging.info("epoch %d %s: %s (%.1fs)", epoch + 1, self.prefix.rstrip("_"), summary,
                     time.perf_counter() - start)


class TrainingClock(keras.callbacks.Callback):
    """Times the epochs' training loops: from an epoch's start to its end, before any other
    callback's end-of-epoch work (list it first), so per-epoch evaluation and checkpoints are
    left out. Keras has read the epoch's metrics back by then, so the time is the device's too.

    Attributes:
        seconds: the time spent in the training loops (input, steps, per-batch callbacks).
    """

    def __init__(self):
        super().__init__()
        self.seconds = 0.0
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds += time.perf_counter() - self._start
        self._start = None

    def elapsed(self):
        """`seconds`, plus the epoch so far when called within one (a mid-epoch checkpoint)."""
        return self.seconds + (time.perf_counter() - self._start if self._start is not None else 0.0)


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


class _StepInEpoch(keras.callbacks.Callback):
    """Knows the epoch and the step within it, counted from the epoch's start even when this fit
    resumed mid-epoch (Keras counts a fit's batches from 0).

    Args:
        first_step: the step the first epoch of this fit starts at (0 unless resuming mid-epoch).
    """

    def __init__(self, first_step=0):
        super().__init__()
        self.first_step = first_step
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        self.first_step = 0  # only the resumed epoch started late

    def step_in_epoch(self, batch):
        """The 1-based step within the epoch of Keras' 0-based `batch` of this fit."""
        return self.first_step + batch + 1


class NonFiniteGuard(_StepInEpoch):
    """Stops training at the first batch whose loss is NaN or infinite.

    A non-finite gradient shows one step later, as the loss of the weights it produced. The
    checkpoint callback saves nothing once the guard has tripped, so the last checkpoint on disk
    is the last good state.

    Args:
        first_step: the step the first epoch of this fit starts at (resuming mid-epoch), so that
            the reported step counts from the start of the epoch, as the checkpoints do.
    """

    def __init__(self, first_step=0):
        super().__init__(first_step)
        self.tripped_at = None

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss) and self.tripped_at is None:
            self.tripped_at = (self._epoch + 1, self.step_in_epoch(batch), loss)
            self.model.stop_training = True

    def message(self, checkpoint):
        epoch, step, loss = self.tripped_at
        last = checkpoint.latest or "none yet"
        return (f"Non-finite loss ({loss}) in epoch {epoch} at step {step}: training stopped. The last "
                f"good checkpoint is {last}. Lower --lr or --proxy_lr, or rerun with --debug_numerics "
                "to find the operation that produced it.")


class SaveCheckpoints(_StepInEpoch):
    """Writes a checkpoint after every epoch, and every `every_steps` steps within one.

    Args:
        checkpoint: the run's `RunCheckpoint`.
        record_fn: `(epoch, logs) -> dict`, the JSON-able record saved with the weights; called
            with `logs=None` for a mid-epoch checkpoint.
        steps_per_epoch: batches in a full epoch.
        guard: a `NonFiniteGuard`; nothing is saved once it has tripped.
        every_steps: also save every this many steps within an epoch (0: only at its end).
        first_step: the step the first epoch of this fit starts at (resuming mid-epoch).

    A full disk raises `OutOfSpaceError` out of `fit`.

    Attributes:
        seconds: the time spent saving.
        mid_epoch_seconds: the part of it spent within epochs (inside `TrainingClock`'s time).
    """

    def __init__(self, checkpoint, record_fn, steps_per_epoch, guard, every_steps, first_step):
        super().__init__(first_step)
        self.checkpoint = checkpoint
        self.record_fn = record_fn
        self.steps_per_epoch = steps_per_epoch
        self.guard = guard
        self.every_steps = every_steps
        self.seconds = 0.0
        self.mid_epoch_seconds = 0.0

    def on_train_batch_end(self, batch, logs=None):
        step = self.step_in_epoch(batch)
        if self._tripped() or not self.every_steps or step % self.every_steps or step >= self.steps_per_epoch:
            return
        start = time.perf_counter()
        path = self._save(self._epoch, self.record_fn(self._epoch, None), step)
        self.mid_epoch_seconds += time.perf_counter() - start
        logging.info("Saved %s (epoch %d, step %d)", path, self._epoch + 1, step)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self._tripped():
            return
        logging.info("Saved %s", self._save(epoch + 1, self.record_fn(epoch, logs or {}), 0))

    def _save(self, finished_epochs, record, step):
        start = time.perf_counter()
        path = self.checkpoint.save(self.model, finished_epochs, record, step, self.steps_per_epoch)
        self.seconds += time.perf_counter() - start
        return path

    def _tripped(self):
        return self.guard is not None and self.guard.tripped_at is not None
