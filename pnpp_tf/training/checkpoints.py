"""Resumable runs: the full training state after every epoch (and every N steps).

A checkpoint holds the model (backbone, embedding layer, proxies, BatchNorm statistics) and both
optimisers (Adam moments, iteration counts, learning rates); its JSON record beside it
(`checkpoint_files`) holds the rest: the finished epochs, the per-epoch history, the metrics
before training, the LR schedule's state, the config and, for a mid-epoch checkpoint, the step
within the epoch. The sampler and the augmentation need no state: both are functions of (seed,
epoch, position). TensorFlow writes a checkpoint's files before it points the `checkpoint` index
at them, so a kill mid-write leaves the previous checkpoint in use; only the last few are kept.
A run resumes from the newest checkpoint that reads back whole, reporting any newer one it passes
over (cut short by a full disk, say); a save that fails leaves none of its files behind.
"""

import os

import tensorflow as tf
from absl import logging

from pnpp_tf.training import checkpoint_files
from pnpp_tf.io_utils import OutOfSpaceError, is_out_of_space, variables_bytes

_NOT_CHOSEN = object()


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
        self._resume_point = _NOT_CHOSEN
        self._saved = None
        # One checkpoint object and one manager for the whole run: `save` points the checkpoint
        # at the optimisers of the current phase (each phase compiles new ones).
        self._checkpoint = tf.train.Checkpoint()
        self._manager = None

    @property
    def latest(self):
        """The newest checkpoint written by this run, else the one it resumes from (or None)."""
        return self._saved or self.resume_point()

    def resume_point(self):
        """The checkpoint this run resumes from, the newest intact one, chosen once so that the
        record, the model and the optimisers all come from it.

        Returns:
            Its path prefix; None when there is no checkpoint at all (a fresh start).

        Raises:
            UserError: there are checkpoints, but none reads back whole.
        """
        if self._resume_point is _NOT_CHOSEN:
            directories = list(dict.fromkeys((self.directory, self.restore_from)))
            self._resume_point = checkpoint_files.newest_intact_checkpoint(directories)
        return self._resume_point

    def read_state(self):
        """The record of the resume point, read without restoring any weight.

        Returns:
            (finished epochs, record dict); (0, {}) when there is no checkpoint yet.
        """
        prefix = self.resume_point()
        if not prefix:
            return 0, {}
        record = checkpoint_files.read_record(prefix)
        return record["finished_epochs"], record

    def restore_model(self, model):
        """Restores the model from the resume point.

        Returns:
            `read_state()`.
        """
        prefix = self.resume_point()
        if prefix:
            # The embedder and the loss layer, not the model: a model carries its optimisers,
            # which would be restored (deferred) into the fresh ones of a new phase.
            tf.train.Checkpoint(embedder=model.embedder, loss_layer=model.loss_layer).restore(prefix).expect_partial()
        epochs, record = self.read_state()
        if prefix:
            step = record.get("step_in_epoch", 0)
            logging.info("Resuming from %s: %d epochs done%s", prefix, epochs,
                         f" and {step} steps of the next" if step else "")
        return epochs, record

    def restore_optimizers(self, model):
        """Restores both optimisers' state from the resume point (call after compiling, when
        resuming mid-phase)."""
        prefix = self.resume_point()
        if prefix:
            checkpoint = tf.train.Checkpoint(optimizer=model.optimizer, proxy_optimizer=model.proxy_optimizer)
            checkpoint.restore(prefix).expect_partial()

    def save(self, model, finished_epochs, record, step_in_epoch=0, steps_per_epoch=1):
        """Writes one checkpoint, numbered by the global step, and keeps the last `keep`.

        Args:
            model: the compiled `ProxyNCAModel`.
            finished_epochs: epochs finished before this point.
            record: the JSON-able rest of the state (history, schedule, config, ...).
            step_in_epoch: batches of the next epoch already trained (a mid-epoch checkpoint).
            steps_per_epoch: batches in a full epoch.

        Returns:
            The checkpoint's path prefix.

        Raises:
            OutOfSpaceError: the disk filled up. None of this checkpoint's files is left, and
                the `checkpoint` index still names the previous one.
        """
        number = finished_epochs * steps_per_epoch + step_in_epoch
        prefix = os.path.join(self.directory, f"{checkpoint_files.PREFIX}-{number}")
        earlier = set(tf.io.gfile.glob(f"{prefix}.*"))
        for name in ("embedder", "loss_layer", "optimizer", "proxy_optimizer"):
            setattr(self._checkpoint, name, getattr(model, name))
        try:
            # The record first: a checkpoint on disk always has its record.
            checkpoint_files.write_record(prefix, {**record, "finished_epochs": finished_epochs,
                                                   "step_in_epoch": step_in_epoch})
            self._saved = self._manager_once().save(checkpoint_number=number)
        except BaseException as error:
            checkpoint_files.remove_partial_save(self.directory, prefix, earlier)
            # Its bookkeeping may now count the checkpoint just removed.
            self._manager = None
            if is_out_of_space(error):
                needed = variables_bytes([*model.embedder.weights, *model.loss_layer.weights,
                                          *model.optimizer.variables, *model.proxy_optimizer.variables])
                raise OutOfSpaceError(prefix, needed) from error
            raise
        checkpoint_files.remove_orphan_records(self.directory)
        return self._saved

    def _manager_once(self):
        """The run's `tf.train.CheckpointManager`, made at the first save (and again only after a
        failed one)."""
        if self._manager is None:
            checkpoint_files.repair_index(self.directory)
            self._manager = tf.train.CheckpointManager(self._checkpoint, self.directory, max_to_keep=self.keep)
        return self._manager
