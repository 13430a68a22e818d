"""The callbacks of one training phase (`pnpp_tf.training.trainer.Phase`), shared by its fits, and
the time they account for: Recall@K, the learning-rate logger and schedule, the NaN guard,
TensorBoard and the checkpoint saver, in the order their end-of-epoch work must run."""

import os
import time

import keras

from pnpp_tf.training import callbacks


class PhaseCallbacks:
    """The callbacks of one phase, shared by its fits, and the time they account for.

    Args:
        trainer: the `Trainer`.
        phase: the `Phase` being trained.
        resume_step: the step its first epoch resumes at (0 unless resuming mid-epoch).
    """

    def __init__(self, trainer, phase, resume_step):
        config, data = trainer.config, trainer.data
        self.base_timings = trainer.timings
        self.start = time.perf_counter()
        self.clock = callbacks.TrainingClock()
        self.recall = callbacks.RecallAtK(
            data.evaluator, every_n_epochs=trainer.eval_every,
            prefix="val_" if data.evaluated_on == "val_half" else "test_",
            last_epoch=trainer.total_epochs - 1, with_nmi=trainer.with_nmi, distance=config.eval_distance)
        self.schedule = [] if phase.freeze_backbone else schedule_callbacks(trainer, phase.first_epoch)
        self.guard = callbacks.NonFiniteGuard(first_step=resume_step)
        self.saver = callbacks.SaveCheckpoints(trainer.checkpoint, trainer._record, data.sampler.num_batches,
                                               self.guard, config.checkpoint_every_steps, resume_step)
        self.all = [
            self.clock,  # first: its time ends before any other callback's end-of-epoch work
            self.recall,
            callbacks.LearningRateLogger(),  # before the schedule: the rates the epoch used
            *self.schedule,
            self.guard,  # before the saver, which saves nothing once the guard has tripped
            keras.callbacks.TensorBoard(os.path.join(trainer.output_dir, "logs")),
            self.saver,
        ]

    def resume_at(self, step):
        """The next fit starts its first epoch at `step` (going on after images were left out)."""
        self.guard.first_step = self.saver.first_step = step

    def timings(self):
        """The run's timings so far: the checkpoint's, plus this phase's."""
        base = self.base_timings
        spent = {
            "train_seconds": self.clock.elapsed() - self.saver.mid_epoch_seconds,
            "epoch_eval_seconds": self.recall.seconds,
            "checkpoint_seconds": self.saver.seconds,
            "wall_seconds": time.perf_counter() - self.start,
        }
        return {name: base.get(name, 0.0) + value for name, value in spent.items()}


def schedule_callbacks(trainer, first_epoch):
    """The LR schedule of the main phase, in the state the checkpoint recorded.

    Args:
        trainer: the `Trainer`.
        first_epoch: the Keras epoch index of the first main epoch.

    Returns:
        A list of callbacks, to follow Recall@K (which they read) and the LR logger (which
        records the rates the epoch used).
    """
    config = trainer.config
    if config.mode == "train":
        schedule = [callbacks.PlateauSchedule(
            os.path.join(trainer.output_dir, callbacks.SCHEDULE_FILE), monitor="val_recall@1",
            factor=config.lr_decay, patience=config.plateau_patience, first_epoch=first_epoch,
        )]
    elif trainer.schedule.lr_drop_epochs:
        schedule = [callbacks.MultiStepSchedule(trainer.schedule.lr_drop_epochs, (config.lr, config.proxy_lr),
                                                config.lr_decay, first_epoch=first_epoch)]
    else:
        schedule = []
    for callback in schedule:
        if hasattr(callback, "set_state") and "schedule" in trainer.record:
            callback.set_state(trainer.record["schedule"])
    return schedule
