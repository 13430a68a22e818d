"""Resumable runs: full training state after every epoch, and a stop on numerical faults.

A checkpoint holds the model (backbone, embedding layer, proxies, BatchNorm statistics), both
optimisers (Adam moments, iteration counts, learning rates), the number of finished epochs and a
JSON record of the rest: the per-epoch history, the metrics before training, the LR schedule's
state and, for a mid-epoch checkpoint, the step within the epoch. The sampler and the
augmentation need no state: both are functions of (seed, epoch, position). TensorFlow writes a
checkpoint's files before it points the `checkpoint` index at them, so a kill mid-write leaves the
previous checkpoint in use; only the last few are kept. A run resumes from the newest checkpoint
that reads back whole, reporting any newer one it passes over (cut short by a full disk, say); a
save that fails leaves none of its files behind.
"""

import contextlib
import json
import math
import os
import re
import time

import keras
import tensorflow as tf
from absl import logging

from pnpp_tf.io_utils import OutOfSpaceError, is_out_of_space, variables_bytes, write_atomic

INDEX_FILE = "checkpoint"  # TensorFlow's list of a directory's checkpoints, newest named first
_PREFIX = "ckpt"  # tf.train.CheckpointManager's name for them: ckpt-<number>.index, .data-*
_NOT_CHOSEN = object()
# What reading a checkpoint raises: OpErrors, and the builtin exceptions TensorFlow translates
# some statuses into (IndexError for a file cut short, ValueError, RuntimeError).
_READ_ERRORS = (tf.errors.OpError, IndexError, ValueError, RuntimeError)


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
        self._resume_point = _NOT_CHOSEN
        self._saved = None
        self._manager, self._tracked = None, None

    @property
    def latest(self):
        """The newest checkpoint written by this run, else the one it resumes from (or None)."""
        return self._saved or self.resume_point()

    def resume_point(self):
        """The checkpoint this run resumes from, the newest intact one, chosen once so that
        `restore_model` and `restore_optimizers` both restore it.

        Returns:
            Its path prefix; None when there is no checkpoint at all (a fresh start).

        Raises:
            ValueError: there are checkpoints, but none reads back whole.
        """
        if self._resume_point is _NOT_CHOSEN:
            directories = list(dict.fromkeys((self.directory, self.restore_from)))
            self._resume_point = newest_intact_checkpoint(directories)
        return self._resume_point

    def restore_model(self, model):
        """Restores the model, the epoch count and the record from the resume point.

        Returns:
            (finished epochs, record dict); (0, {}) when there is no checkpoint yet.

        Raises:
            ValueError: there are checkpoints, but none reads back whole.
        """
        prefix = self.resume_point()
        if not prefix:
            return 0, {}
        # The embedder and the loss layer, not the model: a model carries its optimisers, which
        # would be restored (deferred) into the fresh ones of a new phase.
        tf.train.Checkpoint(embedder=model.embedder, loss_layer=model.loss_layer, epoch=self.epoch,
                            record=self.record).restore(prefix).expect_partial()
        record = json.loads(self.record.numpy().decode("utf-8"))
        step = record.get("step_in_epoch", 0)
        logging.info("Resuming from %s: %d epochs done%s", prefix, int(self.epoch.numpy()),
                     f" and {step} steps of the next" if step else "")
        return int(self.epoch.numpy()), record

    def restore_optimizers(self, model):
        """Restores both optimisers' state from the resume point (call after compiling, when
        resuming mid-phase)."""
        prefix = self.resume_point()
        if prefix:
            checkpoint = tf.train.Checkpoint(optimizer=model.optimizer, proxy_optimizer=model.proxy_optimizer)
            checkpoint.restore(prefix).expect_partial()

    def callback(self, record_fn, steps_per_epoch, guard=None, every_steps=0, first_step=0):
        """A Keras callback writing a checkpoint after every epoch (and every N steps).

        Args:
            record_fn: `(epoch, logs) -> dict`, the JSON-able record saved with the weights;
                called with `logs=None` for a mid-epoch checkpoint.
            steps_per_epoch: batches in a full epoch.
            guard: a `NonFiniteGuard`; nothing is saved once it has tripped.
            every_steps: also save every this many steps within an epoch (0: only at its end).
            first_step: the step the first epoch of this fit starts at (resuming mid-epoch).

        The callback raises `OutOfSpaceError` out of `fit` when the disk is full.
        """
        return _SaveCheckpoints(self, record_fn, steps_per_epoch, guard, every_steps, first_step)

    def save(self, model, finished_epochs, record, step_in_epoch=0, steps_per_epoch=1):
        """Writes one checkpoint, numbered by the global step, and keeps the last `keep`.

        Returns:
            The checkpoint's path prefix.

        Raises:
            OutOfSpaceError: the disk filled up. None of this checkpoint's files is left, and
                the `checkpoint` index still names the previous one.
        """
        record = {**record, "step_in_epoch": step_in_epoch}
        self.epoch.assign(finished_epochs)
        self.record.assign(json.dumps(record))
        manager = self._manager_for(model)
        number = finished_epochs * steps_per_epoch + step_in_epoch
        prefix = os.path.join(self.directory, f"{_PREFIX}-{number}")
        earlier = set(tf.io.gfile.glob(f"{prefix}.*"))
        try:
            self._saved = manager.save(checkpoint_number=number)
        except BaseException as error:
            _remove_partial_save(self.directory, prefix, earlier)
            # Its bookkeeping may now count the checkpoint just removed.
            self._manager = None
            if is_out_of_space(error):
                needed = variables_bytes([*model.embedder.weights, *model.loss_layer.weights,
                                          *model.optimizer.variables, *model.proxy_optimizer.variables])
                raise OutOfSpaceError(prefix, needed) from error
            raise
        return self._saved

    def _manager_for(self, model):
        """The `tf.train.CheckpointManager` of `model` and its current optimisers, made once per
        phase (each phase compiles new optimisers)."""
        parts = {"embedder": model.embedder, "loss_layer": model.loss_layer,
                 "optimizer": model.optimizer, "proxy_optimizer": model.proxy_optimizer}
        if self._manager is None or any(parts[name] is not self._tracked[name] for name in parts):
            _repair_index(self.directory)
            checkpoint = tf.train.Checkpoint(**parts, epoch=self.epoch, record=self.record)
            self._manager = tf.train.CheckpointManager(checkpoint, self.directory, max_to_keep=self.keep)
            self._tracked = parts
        return self._manager


def newest_intact_checkpoint(directories):
    """The newest checkpoint in `directories` (searched in order) that reads back whole,
    logging a warning that names the bad file of each one passed over.

    Returns:
        Its path prefix; None when there is no checkpoint at all.

    Raises:
        ValueError: one line: there are checkpoints, but none reads back whole.
    """
    problems = []
    for directory in directories:
        for prefix in checkpoints_in(directory):
            problem = checkpoint_problem(prefix)
            if problem is None:
                if problems:
                    logging.warning("Resuming from %s, the newest intact checkpoint; the training "
                                    "after it is done again.", prefix)
                return prefix
            logging.warning("Passing over an unreadable checkpoint: %s.", problem)
            problems.append(problem)
    if problems:
        where = " or ".join(directories)
        raise ValueError(f"{where}: no intact checkpoint to resume from ({'; '.join(problems)}). "
                         f"Restore the checkpoints from a copy, or move {directories[0]} away to "
                         "start the run afresh.")
    return None


def checkpoints_in(directory):
    """The checkpoints (path prefixes ".../ckpt-N") of `directory`, newest first: those its
    `checkpoint` index lists, then any others found beside it (all when the index is unreadable).
    """
    found = _found_checkpoints(directory)
    listed = _listed_checkpoints(directory)
    if listed is None:
        listed = []
        if found:
            logging.warning("%s, the index of the checkpoints, is unreadable; using the %d "
                            "checkpoint(s) found beside it.", os.path.join(directory, INDEX_FILE),
                            len(found))
    return list(dict.fromkeys(listed + found))


def checkpoint_problem(prefix):
    """Why the checkpoint `prefix` cannot be restored, naming its bad file; None if it can.

    Every value is read, so a data file cut short or corrupted (its checksums then fail) shows
    here, before anything is restored, rather than midway through a restore.
    """
    index = f"{prefix}.index"
    if not tf.io.gfile.exists(index):
        return f"{index} is missing (the checkpoint's files are gone)"
    try:
        reader = tf.train.load_checkpoint(prefix)
    except _READ_ERRORS as error:
        return f"{index} is unreadable ({_reason(error)})"
    try:
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except _READ_ERRORS as error:
        data = sorted(tf.io.gfile.glob(f"{prefix}.data-*")) or [f"{prefix}.data-*"]
        return f"{', '.join(data)} is unreadable ({_reason(error)})"
    return None


def _listed_checkpoints(directory):
    """The checkpoints the `checkpoint` index of `directory` lists, newest first: [] without an
    index, None when it is unreadable."""
    if not tf.io.gfile.exists(os.path.join(directory, INDEX_FILE)):
        return []
    try:
        state = tf.train.get_checkpoint_state(directory)
    except ValueError:  # an empty index
        state = None
    if state is None or not state.model_checkpoint_path:
        return None
    return list(dict.fromkeys([state.model_checkpoint_path, *reversed(state.all_model_checkpoint_paths)]))


def _found_checkpoints(directory):
    """The checkpoints whose .index is in `directory`, newest (highest number) first."""
    indexes = [path for path in tf.io.gfile.glob(os.path.join(directory, f"{_PREFIX}-*.index"))
               if _checkpoint_number(path) >= 0]
    return [path[:-len(".index")] for path in sorted(indexes, key=_checkpoint_number, reverse=True)]


def _repair_index(directory):
    """Rewrites an unreadable `checkpoint` index to list the checkpoints beside it: TensorFlow's
    manager refuses an empty index, and forgets the checkpoints of a garbled one, which it would
    then never delete."""
    found = _found_checkpoints(directory)
    if not found or _listed_checkpoints(directory) is not None:
        return
    # The text form of TensorFlow's CheckpointState; every entry younger than the "preserved"
    # time, so that the manager deletes them in turn as it saves newer ones.
    now = time.time()
    lines = [f'model_checkpoint_path: "{os.path.basename(found[0])}"']
    lines += [f'all_model_checkpoint_paths: "{os.path.basename(p)}"' for p in reversed(found)]
    lines += [f"all_model_checkpoint_timestamps: {now}"] * len(found)
    lines.append(f"last_preserved_timestamp: {now - 1}")
    write_atomic(os.path.join(directory, INDEX_FILE), "\n".join(lines) + "\n")
    logging.warning("Rewrote the unreadable checkpoint index %s, listing %s.",
                    os.path.join(directory, INDEX_FILE), ", ".join(reversed(found)))


def _remove_partial_save(directory, prefix, earlier):
    """Removes what a failed save of `prefix` left: TensorFlow's `<prefix>_temp` folder, the
    files of `prefix` that were not there before it (`earlier`), and a temporary of the index."""
    leftovers = [path for path in tf.io.gfile.glob(f"{prefix}.*") if path not in earlier]
    leftovers += tf.io.gfile.glob(os.path.join(directory, f"{INDEX_FILE}.tmp*"))
    for path in leftovers:
        with contextlib.suppress(tf.errors.OpError):
            tf.io.gfile.remove(path)
    with contextlib.suppress(tf.errors.OpError):
        if tf.io.gfile.isdir(f"{prefix}_temp"):
            tf.io.gfile.rmtree(f"{prefix}_temp")


def _checkpoint_number(path):
    match = re.search(rf"{_PREFIX}-(\d+)\.index$", path)
    return int(match.group(1)) if match else -1


def _reason(error):
    """The gist of a TensorFlow error message, on one line."""
    message = getattr(error, "message", None) or str(error)
    message = re.sub(r"\{\{[^}]*\}\}\s*", "", message)  # TensorFlow's "{{function_node ...}}"
    return " ".join(message.split()) or type(error).__name__


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
