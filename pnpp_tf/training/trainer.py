"""The training loop of `pnpp_tf.train`: a warm-up phase, then the main phase, resumable.

A phase is a range of epochs trained with one fresh pair of optimisers (the network's and the
proxies'); the warm-up phase keeps the backbone frozen. A run resumed from a checkpoint taken
mid-epoch first finishes that epoch, then fits whole epochs.
"""

import math
import os
import time
from typing import NamedTuple

import keras
import tensorflow as tf
from absl import logging

from pnpp_tf.training import distribute
from pnpp_tf.training.phase_callbacks import PhaseCallbacks
from pnpp_tf.data import protocol
from pnpp_tf.data.faults import stand_ins
from pnpp_tf.errors import UserError
from pnpp_tf.modeling.model import ProxyNCAModel, build_embedder, resolve_jit_compile, synchronize_batch_norm
from pnpp_tf.modeling.optimizers import TorchAdam

# --eval_every=auto: measuring may take this share of the training time; a train step costs about
# three forward passes per image (the backward pass about two).
EVAL_TIME_SHARE = 0.1
FORWARD_PASSES_PER_TRAIN_IMAGE = 3


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


class TrainingData(NamedTuple):
    """What a run trains on and is measured on.

    Attributes:
        train_split: the training `Split`.
        sampler: the batch sampler over `train_split`.
        evaluator: the `RetrievalEvaluator` of the held-out classes.
        evaluated_on: the name of the evaluator's split: "val_half", "test" or "query_gallery".
        skipped_images: {split name: the unreadable images left out of it at the start}.
        fingerprint: the `DataFingerprint` of the dataset as the run found it.
        faults: the `ImageFaults` naming (and with --on_bad_image=skip, leaving out) the images
            that stop reading mid-run.
    """

    train_split: object
    sampler: object
    evaluator: object
    evaluated_on: str
    skipped_images: dict
    fingerprint: object = None
    faults: object = None


class Schedule(NamedTuple):
    """The main (post-warm-up) epochs and the main epochs after which --mode=trainval drops the
    learning rates."""

    epochs: int
    lr_drop_epochs: tuple


class Trainer:
    """Trains a ProxyNCA++ model through its phases, checkpointing and resuming as it goes.

    Constructed ready: the model is built under the strategy's scope and, if the run has a
    checkpoint, restored from it. `fit()` trains what is left and returns the results.

    Args:
        config: the run's `pnpp_tf.config.TrainConfig`.
        strategy: the `tf.distribute.Strategy` to train under.
        data: the run's `TrainingData`.
        schedule: the run's `Schedule`.
        checkpoint: the run's `RunCheckpoint`; TensorBoard logs and schedule.json go beside its
            directory.
    """

    def __init__(self, config, strategy, data, schedule, checkpoint):
        self.config = config
        self.strategy = strategy
        self.data = data
        self.schedule = schedule
        self.checkpoint = checkpoint
        self.output_dir = os.path.dirname(checkpoint.directory)
        self.total_epochs = config.warmup_epochs + schedule.epochs
        self.phases = (Phase("warm-up", 0, config.warmup_epochs, True),
                       Phase("training", config.warmup_epochs, self.total_epochs, False))
        self.with_nmi = protocol(config.dataset).nmi
        self.jit_compile = resolve_jit_compile(config.jit_compile, strategy.num_replicas_in_sync)
        self.eval_every = 1 if config.mode == "train" else eval_interval(
            config.eval_every, data.sampler.num_batches * config.batch_size,
            len(data.evaluator.query) + len(data.evaluator.gallery or ()))
        logging.info("Recall@K on the %s split %s (--eval_every=%s)", data.evaluated_on,
                     f"every {self.eval_every} epoch(s)" if self.eval_every else "after the last epoch only",
                     config.eval_every)
        self.model = self._build_model()
        self.finished_epochs, self.record = checkpoint.restore_model(self.model)
        _check_steps_per_execution(config.steps_per_execution, data.sampler.num_batches,
                                   self.record.get("step_in_epoch", 0))
        self.history = self.record.get("history", {})
        # Checkpoints before the split timings kept one train_seconds, the phases' wall time: an
        # upper bound of the training time, so the rate it gives errs low.
        legacy = self.record.get("train_seconds", 0.0)
        self.timings = dict(self.record.get("timings", {"train_seconds": legacy, "wall_seconds": legacy}))
        self.before = self.record.get("before_training")
        self._phase = None
        # What the training pipeline reads: an image that stops reading mid-run is replaced by
        # another of its class (--on_bad_image=skip), so every batch keeps its classes.
        self._train_paths = list(data.train_split.paths)
        self._bad_train_paths = set()

    def fit(self):
        """Measures the untrained model (unless the checkpoint did), trains the phases left and
        measures the trained model.

        Returns:
            The results dict of `pnpp_tf.train`.

        Raises:
            NumericalFault: a loss was NaN or infinite; the last good checkpoint is on disk.
        """
        if self.before is None:
            self.before = self.data.evaluator.measure(self.model, with_nmi=self.with_nmi,
                                                      distance=self.config.eval_distance)
            logging.info("Before training: %s", summary(self.before))
        after = None
        for phase in self.phases:
            if self.finished_epochs < phase.end_epoch:
                after = self._train_phase(phase)
        if after is None:  # the last epoch was trained by an earlier, interrupted run
            start = time.perf_counter()
            after = (self.data.evaluator.measure(self.model, with_nmi=self.with_nmi, distance=self.config.eval_distance),
                     time.perf_counter() - start)
        after, final_eval_seconds = after
        logging.info("After training: %s", summary(after))
        return self._results(after, final_eval_seconds)

    def _build_model(self):
        config, strategy = self.config, self.strategy
        logging.info("Strategy %s with %d replica(s)", config.strategy, strategy.num_replicas_in_sync)
        with strategy.scope():
            embedder = build_embedder(
                config.backbone, config.image_size, config.embedding_dim, config.pooling,
                config.layer_norm, config.weights, backbone_preset=config.backbone_preset,
            )
            if strategy.num_replicas_in_sync > 1 and config.sync_batch_norm:
                logging.info("Synchronised BatchNorm in %d layers", synchronize_batch_norm(embedder))
            return ProxyNCAModel(embedder, self.data.train_split.num_classes, config.temperature, config.loss)

    def _results(self, after, final_eval_seconds):
        config = self.config
        images = self.total_epochs * self.data.sampler.num_batches * config.batch_size
        return {
            "dataset": config.dataset,
            "evaluated_on": self.data.evaluated_on,
            "eval_distance": config.eval_distance,
            "metrics": after,
            "before_training": self.before,
            "history": self.history,
            "lr_drop_epochs": list(self.schedule.lr_drop_epochs),
            "eval_every": self.eval_every,
            "skipped_images": self._skipped_images(),
            "skipped_during_run": self._skipped_during_run(),
            "timings": {
                **self.timings,
                "final_eval_seconds": final_eval_seconds,
                # Training alone: per-epoch evaluation and checkpoints are timed apart.
                "train_images_per_second": images / max(self.timings.get("train_seconds", 0.0), 1e-9),
            },
            "flags": config.to_dict(),
        }

    def _train_phase(self, phase):
        """Trains what is left of `phase`.

        Args:
            phase: the `Phase`; the restored checkpoint ended before its last epoch.

        Returns:
            (the final metrics, the seconds measuring them took), if this phase trained the run's
            last epoch and measured them; else None.

        Raises:
            NumericalFault: a loss was NaN or infinite.
        """
        resume_epoch = max(phase.first_epoch, self.finished_epochs)
        # The checkpoint's step belongs to this phase only if the phase had begun.
        resume_step = self.record.get("step_in_epoch", 0) if self.finished_epochs >= phase.first_epoch else 0
        logging.info("%s: epochs %d-%d of %d batches", phase.name, resume_epoch + 1, phase.end_epoch,
                     self.data.sampler.num_batches)
        self._compile(phase.freeze_backbone)
        if resume_epoch > phase.first_epoch or resume_step:
            self.checkpoint.restore_optimizers(self.model)
        self._phase = PhaseCallbacks(self, phase, resume_step)
        for segment in segments(resume_epoch, resume_step, phase.end_epoch):
            self._fit_segment(segment)
            if self._phase.guard.tripped_at is not None:
                break
        self.timings = self._phase.timings()
        if self._phase.guard.tripped_at is not None:
            raise NumericalFault(self._phase.guard.message(self.checkpoint))
        recall = self._phase.recall
        return None if recall.final_metrics is None else (recall.final_metrics, recall.final_seconds)

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
                steps_per_execution=config.steps_per_execution,
            )
        logging.info("XLA for the train step: %s (--jit_compile=%s)", self.model.jit_compile, config.jit_compile)

    def _fit_segment(self, segment):
        """Runs `model.fit` over `segment` with the phase's callbacks, going on from the step it
        stopped at when an image stopped reading and --on_bad_image=skip leaves it out.

        Raises:
            UserError: an image stopped reading (named) and --on_bad_image=error; the last
                checkpoint is intact.
        """
        while True:
            # The proxies' optimiser steps once per batch trained, in every phase and whatever
            # --steps_per_execution: it says exactly where a fit that failed had got to.
            before = self._steps_trained()
            try:
                return self._fit(segment)
            except tf.errors.OpError as error:
                if self.data.faults is None:
                    raise
                done = segment.first_step + self._steps_trained() - before
                epoch, step = segment.first_epoch + done // self.data.sampler.num_batches, \
                    done % self.data.sampler.num_batches
                during = (f"training (epoch {epoch + 1}, step {step + 1}); the last checkpoint, "
                          f"{self.checkpoint.latest or 'none yet'}, is intact")
                self._leave_out(self.data.faults.bad_images(error, self._train_paths, during))
                if epoch >= segment.end_epoch:
                    return None
                segment = Segment(epoch, step, segment.end_epoch)
                _check_steps_per_execution(self.config.steps_per_execution, self.data.sampler.num_batches, step)
                self._phase.resume_at(step)

    def _steps_trained(self):
        # Read through NumPy: under a strategy the counter is a distributed variable, which
        # int() does not take.
        return int(keras.ops.convert_to_numpy(self.model.proxy_optimizer.iterations))

    def _leave_out(self, bad_paths):
        """Reads, in place of each of `bad_paths`, the next readable image of its class."""
        if bad_paths:
            self._bad_train_paths.update(bad_paths)
            self._train_paths = stand_ins(self.data.train_split, self._bad_train_paths)

    def _skipped_images(self):
        skipped = {name: list(paths) for name, paths in self.data.skipped_images.items()}
        for item in self._skipped_during_run():
            skipped.setdefault(item["split"], []).append(item["path"])
        return skipped

    def _skipped_during_run(self):
        return list(self.data.faults.skipped) if self.data.faults else []

    def _fit(self, segment):
        """Runs one `model.fit` over `segment` with the phase's callbacks."""
        config, steps = self.config, self.data.sampler.num_batches
        dataset = distribute.distributed_train_dataset(
            self.strategy, self._train_paths, self.data.train_split.labels, self.data.sampler,
            config.image_size, segment.end_epoch - segment.first_epoch, first_epoch=segment.first_epoch,
            seed=config.seed, flip=config.flip, first_step=segment.first_step, max_pixels=config.max_pixels,
        )
        self.model.fit(
            dataset,
            epochs=segment.end_epoch,
            initial_epoch=segment.first_epoch,
            steps_per_epoch=steps - segment.first_step,
            shuffle=False,  # the sampler already decides the order
            callbacks=self._phase.all,
            verbose=config.verbose,
        )

    def _record(self, epoch, logs):
        """Appends an epoch's logs to the history; returns the record a checkpoint keeps.

        Args:
            epoch: the Keras epoch index (unused: the history is in order).
            logs: the epoch's logs; None for a mid-epoch checkpoint.

        Returns:
            The JSON-able record: history, metrics before training, timings, schedule state,
            config.
        """
        for name, value in (logs or {}).items():
            self.history.setdefault(name, []).append(float(value))
        record = {"history": self.history, "before_training": self.before, "timings": self._phase.timings(),
                  "flags": self.config.to_dict(), "skipped_during_run": self._skipped_during_run()}
        if self.data.fingerprint is not None:
            record["data"] = {"digest": self.data.fingerprint.digest, "splits": self.data.fingerprint.summary()}
        for callback in self._phase.schedule:
            if hasattr(callback, "get_state"):
                record["schedule"] = callback.get_state()
        return record


def _check_steps_per_execution(steps_per_execution, steps_per_epoch, resume_step=0):
    # Keras (3.15) runs whole executions: the last one of an epoch would train on the next
    # epoch's batches.
    if (steps_per_epoch - resume_step) % steps_per_execution and not steps_per_epoch % steps_per_execution:
        raise UserError(f"--steps_per_execution={steps_per_execution} does not divide the "
                        f"{steps_per_epoch - resume_step} batches left of the epoch this run resumes at step "
                        f"{resume_step}; resume with --steps_per_execution={math.gcd(steps_per_epoch, resume_step)} "
                        "or a divisor of it.")
    if steps_per_epoch % steps_per_execution:
        divisors = [n for n in range(1, steps_per_epoch + 1) if steps_per_epoch % n == 0]
        raise UserError(f"--steps_per_execution={steps_per_execution} does not divide the {steps_per_epoch} "
                        f"batches of an epoch; choose one of {', '.join(map(str, divisors[:12]))}"
                        f"{', ...' if len(divisors) > 12 else ''}.")


def eval_interval(eval_every, train_images, eval_images):
    """`--eval_every` as a number of epochs.

    "auto" is the fewest epochs between measurements for which measuring takes at most
    `EVAL_TIME_SHARE` of the time: an evaluation embeds each of its `eval_images` once, and an epoch
    costs about `FORWARD_PASSES_PER_TRAIN_IMAGE` forward passes for each of its `train_images`, so
    the share of a measurement every N epochs is e / (3tN + e).

    Args:
        eval_every: "auto", or a number of epochs as a string or int (0: never between epochs).
        train_images: images trained on per epoch.
        eval_images: images a measurement embeds.

    Returns:
        The number of epochs (0: only the final measurement).
    """
    if eval_every != "auto":
        return int(eval_every)
    share = EVAL_TIME_SHARE
    epochs = eval_images * (1.0 - share) / (FORWARD_PASSES_PER_TRAIN_IMAGE * max(train_images, 1) * share)
    return max(1, math.ceil(epochs))


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
