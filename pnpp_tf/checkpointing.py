"""Resumable runs: full training state after every epoch, and a stop on numerical faults.

A checkpoint holds the model (backbone, embedding layer, proxies, BatchNorm statistics), both
optimisers (Adam moments, iteration counts, learning rates), the number of finished epochs and a
JSON record of the rest: the per-epoch history, the metrics before training, the LR schedule's
state and, for a mid-epoch checkpoint, the step within the epoch. The sampler and the augmentation need no state: both are functions of (seed, epoch,
position). TensorFlow writes a checkpoint's files before it points the `checkpoint` index at
them, so a kill mid-write leaves the previous checkpoint in use; only the last few are kept.
"""

import json
import math

import keras
import tensorflow as tf
from absl import logging


class RunCheckpoint:
    """The checkpoints of one run in `<directory>`.

    Args:
        directory: where the checkpoints are written.
        keep: how many of the latest checkpoints are kept.
        restore_from: where the checkpoints to resume from are, if not `directory`: a worker that
            is not the chief writes to a private directory but resumes from the chief's, so that
            every worker starts from the same state.
    """

    def __init__(self, directory, keep=3, restore_from=None):
        self.directory = directory
        self.restore_from = restore_from or directory
        self.keep = keep
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="finished_epochs")
        self.record = tf.Variable("{}", dtype=tf.string, trainable=False, name="record")

    @property
    def latest(self):
        """The newest checkpoint written by this run, else the one it resumes from (or None)."""
        return tf.train.latest_checkpoint(self.directory) or tf.train.latest_checkpoint(self.restore_from)

    def restore_model(self, model):
        """Restores the model, the epoch count and the record from the latest checkpoint.

        Returns:
            (finished epochs, record dict); (0, {}) when there is no checkpoint yet.
        """
        if not self.latest:
            return 0, {}
        # The embedder and the loss layer, not the model: a model carries its optimisers, which
        # would be restored (deferred) into the fresh ones of a new phase.
        tf.train.Checkpoint(embedder=model.embedder, loss_layer=model.loss_layer, epoch=self.epoch,
                            record=self.record).restore(self.latest).expect_partial()
        record = json.loads(self.record.numpy().decode("utf-8"))
        step = record.get("step_in_epoch", 0)
        logging.info("Resuming from %s: %d epochs done%s", self.latest, int(self.epoch.numpy()),
                     f" and {step} steps of the next" if step else "")
        return int(self.epoch.numpy()), record

    def restore_optimizers(self, model):
        """Restores both optimisers' state (call after compiling, when resuming mid-phase)."""
        checkpoint = tf.train.Checkpoint(optimizer=model.optimizer, proxy_optimizer=model.proxy_optimizer)
        checkpoint.restore(self.latest).expect_partial()

    def callback(self, record_fn, steps_per_epoch, guard=None, every_steps=0, first_step=0):
        """A Keras callback writing a checkpoint after every epoch (and every N steps).

        Args:
            record_fn: `(epoch, logs) -> dict`, the JSON-able record saved with the weights;
                called with `logs=None` for a mid-epoch checkpoint.
            steps_per_epoch: batches in a full epoch.
            guard: a `NonFiniteGuard`; nothing is saved once it has tripped.
            every_steps: also save every this many steps within an epoch (0: only at its end).
            first_step: the step the first epoch of this fit starts at (resuming mid-epoch).
        """
        return _SaveCheckpoints(self, record_fn, steps_per_epoch, guard, every_steps, first_step)

    def save(self, model, finished_epochs, record, step_in_epoch=0, steps_per_epoch=1):
        """Writes one checkpoint, numbered by the global step, and keeps the last `keep`."""
        record = {**record, "step_in_epoch": step_in_epoch}
        self.epoch.assign(finished_epochs)
        self.record.assign(json.dumps(record))
        checkpoint = tf.train.Checkpoint(embedder=model.embedder, loss_layer=model.loss_layer,
                                         optimizer=model.optimizer, proxy_optimizer=model.proxy_optimizer,
                                         epoch=self.epoch, record=self.record)
        manager = tf.train.CheckpointManager(checkpoint, self.directory, max_to_keep=self.keep)
        return manager.save(checkpoint_number=finished_epochs * steps_per_epoch + step_in_epoch)


# Flags that change how a run is watched, stored or found, not what it computes: a run is resumed,
# or recognised as finished, whatever their values.
BOOKKEEPING_FLAGS = frozenset({"verbose", "debug_numerics", "keep_checkpoints", "checkpoint_every_steps",
                               "eval_batch_size", "eval_every", "model_dir", "data_dir"})


def changed_flags(earlier, now, defaults, allowed=()):
    """The flags whose values differ between two runs in what the runs compute.

    Where --cache_dir is does not count, whether there is one does; `BOOKKEEPING_FLAGS` do not
    count either.

    Args:
        earlier: {flag name: value} an earlier run recorded.
        now: {flag name: value} of this run.
        defaults: {flag name: default}; a flag the earlier run did not know ran with its default.
        allowed: flags that may also differ (e.g. "epochs", to train a resumed run for longer).

    Returns:
        The sorted names of the changed flags.
    """
    ignored = BOOKKEEPING_FLAGS | set(allowed)

    def comparable(values):
        values = {name: value for name, value in values.items() if name not in ignored}
        values["cache_dir"] = bool(values.get("cache_dir"))
        return values

    earlier, now = comparable(earlier), comparable(now)
    return sorted(name for name in set(earlier) | set(now) if earlier.get(name, defaults.get(name)) != now.get(name))


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


class _SaveCheckpoints(_StepInEpoch):
    def __init__(self, checkpoint, record_fn, steps_per_epoch, guard, every_steps, first_step):
        super().__init__(first_step)
        self.checkpoint = checkpoint
        self.record_fn = record_fn
        self.steps_per_epoch = steps_per_epoch
        self.guard = guard
        self.every_steps = every_steps

    def on_train_batch_end(self, batch, logs=None):
        step = self.step_in_epoch(batch)
        if self._tripped() or not self.every_steps or step % self.every_steps or step >= self.steps_per_epoch:
            return
        path = self.checkpoint.save(self.model, self._epoch, self.record_fn(self._epoch, None), step,
                                    self.steps_per_epoch)
        logging.info("Saved %s (epoch %d, step %d)", path, self._epoch + 1, step)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self._tripped():
            return
        path = self.checkpoint.save(self.model, epoch + 1, self.record_fn(epoch, logs or {}), 0,
                                    self.steps_per_epoch)
        logging.info("Saved %s", path)

    def _tripped(self):
        return self.guard is not None and self.guard.tripped_at is not None
