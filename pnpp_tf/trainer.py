"""The training loop of `pnpp_tf.train`: a warm-up phase, then the main phase, resumable.

A phase is a range of epochs trained with one fresh pair of optimisers (the network's and the
proxies'); the warm-up phase keeps the backbone frozen. A run resumed from a checkpoint taken
mid-epoch first finishes that epoch, then fits whole epochs.
"""

import functools
import os
import time
from typing import NamedTuple

import keras
from absl import logging

from pnpp_tf import callbacks, checkpointing, distribute
from pnpp_tf.checkpointing import RunCheckpoint
from pnpp_tf.data import protocol
from pnpp_tf.model import ProxyNCAModel, build_embedder, resolve_jit_compile, synchronize_batch_norm
from pnpp_tf.optimizers import TorchAdam

SCHEDULE_FILE = "schedule.json"


class NumericalFault(RuntimeError):
    """Training produced a NaN or infinite loss."""


class Phase(NamedTuple):
    """Epochs `first_epoch` to `end_epoch - 1` (Keras numbering), trained with the same optimisers."""

    name: str
    first_epoch: int
    end_epoch: int
    freeze_backbone: bool


class Segment(NamedTuple):
    """One `model.fit`: epochs `first_epoch` to `end_epoch - 1`, the first from batch `first_step` on."""

    first_epoch: int
    first_step: int
    end_epoch: int


class Trainer:
    """Trains a ProxyNCA++ model through its phases, checkpointing and resuming as it goes.

    Use in this order: `build_model`, `restore`, `fit`, `results`.

    Args:
        config: an object with the attributes of the flags in `pnpp_tf.flags`.
        strategy: the `tf.distribute.Strategy` to train under.
        train_split: the training `Split`.
        sampler: the batch sampler over `train_split`.
        evaluator: the `RetrievalEvaluator` of the held-out classes.
        evaluated_on: the name of the evaluator's split: "val_half", "test" or "query_gallery".
        epochs: main (post-warm-up) epochs.
        lr_drop_epochs: main epochs after which --mode=trainval drops the learning rates.
        flag_values: {flag name: value} of this run, kept in every checkpoint and in results.json.
    """

    def __init__(self, config, strategy, train_split, sampler, evaluator, evaluated_on, epochs, lr_drop_epochs,
                 flag_values):
        self.config = config
        self.flag_values = flag_values
        self.strategy = strategy
        self.train_split = train_split
        self.sampler = sampler
        self.evaluator = evaluator
        self.evaluated_on = evaluated_on
        self.lr_drop_epochs = lr_drop_epochs
        self.total_epochs = config.warmup_epochs + epochs
        self.phases = (Phase("warm-up", 0, config.warmup_epochs, True),
                       Phase("training", config.warmup_epochs, self.total_epochs, False))
        self.with_nmi = protocol(config.dataset).nmi
        self.model = None
        self.jit_compile = False
        self.output_dir = None
        self.checkpoint = None
        self.finished_epochs, self.record = 0, {}
        self.before = None
        self.history = {}
        self.train_seconds = 0.0

    def build_model(self):
        """Builds the embedder and the (uncompiled) `ProxyNCAModel` under the strategy's scope.

        Returns:
            The model.
        """
        config, strategy = self.config, self.strategy
        self.jit_compile = resolve_jit_compile(config.jit_compile, strategy.num_replicas_in_sync)
        logging.info("Strategy %s with %d replica(s); XLA for the train step: %s (--jit_compile=%s)",
                     config.strategy, strategy.num_replicas_in_sync, self.jit_compile, config.jit_compile)
        with strategy.scope():
            embedder = build_embedder(
                config.backbone, config.image_size, config.embedding_dim, config.pooling,
                config.layer_norm, config.weights,
            )
            if strategy.num_replicas_in_sync > 1 and config.sync_batch_norm:
                logging.info("Synchronised BatchNorm in %d layers", synchronize_batch_norm(embedder))
            self.model = ProxyNCAModel(embedder, self.train_split.num_classes, config.temperature, config.loss)
        return self.model

    def restore(self):
        """Restores the model, the history and the timings from the run's latest checkpoint, if any.

        Returns:
            The number of epochs that checkpoint had finished (0 without a checkpoint).
        """
        self.output_dir = distribute.writable_dir(self.config.model_dir, self.strategy)
        self.checkpoint = RunCheckpoint(os.path.join(self.output_dir, "checkpoints"),
                                        keep=self.config.keep_checkpoints,
                                        restore_from=os.path.join(self.config.model_dir, "checkpoints"))
        self.finished_epochs, self.record = self.checkpoint.restore_model(self.model)
        self.history = self.record.get("history", {})
        self.train_seconds = self.record.get("train_seconds", 0.0)
        return self.finished_epochs

    def fit(self):
        """Measures the untrained model (unless the checkpoint did), then trains the phases left.

        Raises:
            NumericalFault: a loss was NaN or infinite; the last good checkpoint is on disk.
        """
        if "before_training" in self.record:
            self.before = self.record["before_training"]
        else:
            self.before = self.evaluator.measure(self.model, with_nmi=self.with_nmi)
            logging.info("Before training: %s", summary(self.before))
        for phase in self.phases:
            if self.finished_epochs < phase.end_epoch:
                self._train_phase(phase)

    def results(self, skipped_images):
        """Measures the trained model and gathers what results.json records.

        Args:
            skipped_images: {split name: the unreadable images left out of it}.

        Returns:
            The results dict.
        """
        start = time.perf_counter()
        after = self.evaluator.measure(self.model, with_nmi=self.with_nmi)
        eval_seconds = time.perf_counter() - start
        logging.info("After training: %s", summary(after))
        images = self.total_epochs * self.sampler.num_batches * self.config.batch_size
        return {
            "dataset": self.config.dataset,
            "evaluated_on": self.evaluated_on,
            "metrics": after,
            "before_training": self.before,
            "history": self.history,
            "lr_drop_epochs": self.lr_drop_epochs,
            "skipped_images": skipped_images,
            "timings": {
                "train_seconds": self.train_seconds,
                "final_eval_seconds": eval_seconds,
                "train_images_per_second": images / max(self.train_seconds, 1e-9),
            },
            "flags": self.flag_values,
        }

    def _train_phase(self, phase):
        """Trains what is left of `phase`.

        Args:
            phase: the `Phase`; the restored checkpoint ended before its last epoch.

        Raises:
            NumericalFault: a loss was NaN or infinite.
        """
        resume_epoch = max(phase.first_epoch, self.finished_epochs)
        # The checkpoint's step belongs to this phase only if the phase had begun.
        resume_step = self.record.get("step_in_epoch", 0) if self.finished_epochs >= phase.first_epoch else 0
        logging.info("%s: epochs %d-%d of %d batches", phase.name, resume_epoch + 1, phase.end_epoch,
                     self.sampler.num_batches)
        self._compile(phase.freeze_backbone)
        if resume_epoch > phase.first_epoch or resume_step:
            self.checkpoint.restore_optimizers(self.model)
        schedule = [] if phase.freeze_backbone else self._schedule_callbacks(phase.first_epoch)
        phase_start = time.perf_counter()
        record_fn = functools.partial(self._record, schedule, phase_start)
        epoch_callbacks = [
            callbacks.RecallAtK(self.evaluator,
                                every_n_epochs=1 if self.config.mode == "train" else self.config.eval_every,
                                prefix="val_" if self.evaluated_on == "val_half" else "test_"),
            callbacks.LearningRateLogger(),  # before the schedule: the rates the epoch used
            *schedule,
        ]
        tensorboard = keras.callbacks.TensorBoard(os.path.join(self.output_dir, "logs"))
        tripped = None
        for segment in segments(resume_epoch, resume_step, phase.end_epoch):
            guard = self._fit_segment(segment, epoch_callbacks, tensorboard, record_fn)
            if guard.tripped_at is not None:
                tripped = guard
                break
        self.train_seconds += time.perf_counter() - phase_start
        if tripped is not None:
            raise NumericalFault(tripped.message(self.checkpoint))

    def _compile(self, freeze_backbone):
        """Compiles the model with new optimisers: the main phase starts with fresh Adam state."""
        config = self.config
        with self.strategy.scope():
            self.model.compile(
                optimizer=TorchAdam(config.lr),
                proxy_optimizer=TorchAdam(config.proxy_lr),
                freeze_backbone=freeze_backbone,
                clip_value=config.clip_value or None,
                jit_compile=self.jit_compile,
            )

    def _schedule_callbacks(self, first_epoch):
        """The LR schedule of the main phase, in the state the checkpoint recorded.

        Args:
            first_epoch: the Keras epoch index of the first main epoch.

        Returns:
            A list of callbacks, to follow Recall@K (which they read) and the LR logger (which
            records the rates the epoch used).
        """
        config = self.config
        if config.mode == "train":
            schedule = [callbacks.PlateauSchedule(
                os.path.join(self.output_dir, SCHEDULE_FILE), monitor="val_recall@1",
                factor=config.lr_decay, patience=config.plateau_patience, first_epoch=first_epoch,
            )]
        elif self.lr_drop_epochs:
            schedule = [callbacks.MultiStepSchedule(self.lr_drop_epochs, (config.lr, config.proxy_lr),
                                                    config.lr_decay, first_epoch=first_epoch)]
        else:
            schedule = []
        for callback in schedule:
            if hasattr(callback, "set_state") and "schedule" in self.record:
                callback.set_state(self.record["schedule"])
        return schedule

    def _fit_segment(self, segment, epoch_callbacks, tensorboard, record_fn):
        """Runs one `model.fit` over `segment`.

        Args:
            segment: the `Segment` to fit.
            epoch_callbacks: the phase's callbacks that precede the guard.
            tensorboard: the phase's TensorBoard callback.
            record_fn: `(epoch, logs) -> dict`, the record saved with each checkpoint.

        Returns:
            The segment's `NonFiniteGuard`, tripped if a loss was NaN or infinite.
        """
        config, steps = self.config, self.sampler.num_batches
        data = distribute.distributed_train_dataset(
            self.strategy, self.train_split.paths, self.train_split.labels, self.sampler, config.image_size,
            segment.end_epoch - segment.first_epoch, first_epoch=segment.first_epoch, seed=config.seed,
            flip=config.flip, first_step=segment.first_step, max_pixels=config.max_pixels,
        )
        guard = checkpointing.NonFiniteGuard(first_step=segment.first_step)
        save = self.checkpoint.callback(record_fn, steps, guard, config.checkpoint_every_steps, segment.first_step)
        self.model.fit(
            data,
            epochs=segment.end_epoch,
            initial_epoch=segment.first_epoch,
            steps_per_epoch=steps - segment.first_step,
            shuffle=False,  # the sampler already decides the order
            # The guard before the saver, which saves nothing once the guard has tripped.
            callbacks=[*epoch_callbacks, guard, tensorboard, save],
            verbose=config.verbose,
        )
        return guard

    def _record(self, schedule, phase_start, epoch, logs):
        """Appends an epoch's logs to the history; returns the record a checkpoint keeps.

        Args:
            schedule: the phase's LR schedule callbacks, whose state is recorded.
            phase_start: `time.perf_counter()` at the start of the phase.
            epoch: the Keras epoch index (unused: the history is in order).
            logs: the epoch's logs; None for a mid-epoch checkpoint.

        Returns:
            The JSON-able record: history, metrics before training, training time, schedule state,
            flags.
        """
        for name, value in (logs or {}).items():
            self.history.setdefault(name, []).append(float(value))
        # train_seconds grows only at the end of a phase: add this phase's time so far.
        record = {"history": self.history, "before_training": self.before,
                  "train_seconds": self.train_seconds + time.perf_counter() - phase_start,
                  "flags": self.flag_values}
        for callback in schedule:
            if hasattr(callback, "get_state"):
                record["schedule"] = callback.get_state()
        return record


def segments(epoch, step, end_epoch):
    """The fits from `step` of `epoch` to `end_epoch`: the rest of a resumed epoch, then whole epochs.

    Args:
        epoch: the first epoch to train.
        step: the batches of `epoch` already trained (0 unless resuming mid-epoch).
        end_epoch: one past the last epoch to train.

    Returns:
        A list of `Segment`s.
    """
    parts = [Segment(epoch, step, epoch + 1)] if step else []
    if epoch + bool(step) < end_epoch:
        parts.append(Segment(epoch + bool(step), 0, end_epoch))
    return parts


def summary(metrics):
    """A one-line summary of the retrieval metrics for the log."""
    return " ".join(f"{name}={value:.4f}" for name, value in metrics.items()
                    if name.startswith(("recall@", "map@r", "nmi")))
