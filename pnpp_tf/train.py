"""Trains a ProxyNCA++ embedder and measures it on the unseen classes.

    python -m pnpp_tf.train --flagfile=configs/demo.flags

Writes to --model_dir: checkpoints/ (the full training state after every epoch; rerunning the
command resumes from it), logs/ (TensorBoard), embedder.keras (the trained embedder),
results.json (test metrics before and after training, the flags used and timings), curves.png
and, with --mode=train, schedule.json (the LR drops and best epoch that --mode=trainval
--lr_schedule_from=<that model_dir> replays).
"""

import json
import os
import sys
import time

import keras
import tensorflow as tf
from absl import app, flags, logging

from pnpp_tf import callbacks, checkpointing, distribute, flags as pnpp_flags, plots
from pnpp_tf.checkpointing import RunCheckpoint
from pnpp_tf.data import load_splits, pipeline, protocol
from pnpp_tf.data.image_check import drop_or_raise
from pnpp_tf.data.split import class_halves
from pnpp_tf.io_utils import write_json
from pnpp_tf.model import ProxyNCAModel, build_embedder, resolve_jit_compile, synchronize_batch_norm
from pnpp_tf.optimizers import TorchAdam
from pnpp_tf.retrieval import RetrievalEvaluator

FLAGS = flags.FLAGS
SCHEDULE_FILE = "schedule.json"
pnpp_flags.define_data_flags()
pnpp_flags.define_model_flags()
pnpp_flags.define_training_flags()


def train(config):
    """Runs the whole recipe: warm-up, training, evaluation; returns the results dict.

    Args:
        config: an object with the attributes of the flags in `pnpp_tf.flags` (e.g. absl's FLAGS).

    Returns:
        The dict also written to `<model_dir>/results.json`.
    """
    return train_model(config)[1]


def train_model(config):
    """Like `train`, returning (the trained `ProxyNCAModel`, the results dict)."""
    if not config.model_dir:
        raise ValueError("--model_dir is required: checkpoints and results.json are written there.")
    # First: a multi-worker strategy must exist before any other TensorFlow op runs.
    strategy = distribute.make_strategy(config.strategy, config.tpu)
    epochs, lr_drop_epochs = _schedule(config)
    train_split, evaluator, evaluated_on, skipped_images = _data(config)
    sampler = pipeline.make_sampler(
        config.sampler, train_split.labels, config.batch_size, config.classes_per_batch, config.seed
    )
    with_nmi = protocol(config.dataset).nmi

    os.makedirs(config.model_dir, exist_ok=True)
    _configure_determinism_and_numerics(config)
    distribute.check_batch_fits(strategy, config.batch_size, config.classes_per_batch, config.sampler)
    jit_compile = resolve_jit_compile(config.jit_compile, strategy.num_replicas_in_sync)
    logging.info("Strategy %s with %d replica(s); XLA for the train step: %s (--jit_compile=%s)",
                 config.strategy, strategy.num_replicas_in_sync, jit_compile, config.jit_compile)
    with strategy.scope():
        embedder = build_embedder(
            config.backbone, config.image_size, config.embedding_dim, config.pooling,
            config.layer_norm, config.weights,
        )
        if strategy.num_replicas_in_sync > 1 and config.sync_batch_norm:
            logging.info("Synchronised BatchNorm in %d layers", synchronize_batch_norm(embedder))
        model = ProxyNCAModel(embedder, train_split.num_classes, config.temperature, config.loss)
    output_dir = distribute.writable_dir(config.model_dir, strategy)
    checkpoint = RunCheckpoint(os.path.join(output_dir, "checkpoints"), keep=config.keep_checkpoints)
    finished_epochs, record = checkpoint.restore_model(model)
    total_epochs = config.warmup_epochs + epochs
    finished = _finished_results(config, finished_epochs, total_epochs)
    if finished is not None:
        logging.info("%s/results.json: this run is finished; not training again.", config.model_dir)
        return model, finished

    if "before_training" in record:
        before = record["before_training"]
    else:
        before = evaluator.measure(model, with_nmi=with_nmi)
        logging.info("Before training: %s", _summary(before))
    history = record.get("history", {})
    train_seconds = record.get("train_seconds", 0.0)
    guard = checkpointing.NonFiniteGuard()
    phases = [("warm-up", 0, config.warmup_epochs, True), ("training", config.warmup_epochs, total_epochs, False)]
    for phase, first_epoch, end_epoch, freeze_backbone in phases:
        if finished_epochs >= end_epoch:
            continue
        resume_epoch = max(first_epoch, finished_epochs)
        resume_step = record.get("step_in_epoch", 0) if finished_epochs >= first_epoch else 0
        logging.info("%s: epochs %d-%d of %d batches", phase, resume_epoch + 1, end_epoch, sampler.num_batches)
        # A new optimiser per phase: the main training starts with fresh Adam state.
        with strategy.scope():
            model.compile(
                optimizer=TorchAdam(config.lr),
                proxy_optimizer=TorchAdam(config.proxy_lr),
                freeze_backbone=freeze_backbone,
                clip_value=config.clip_value or None,
                jit_compile=jit_compile,
            )
        if resume_epoch > first_epoch or resume_step:
            checkpoint.restore_optimizers(model)
        schedule = _schedule_callbacks(config, lr_drop_epochs, first_epoch, output_dir) if not freeze_backbone else []
        for callback in schedule:
            if hasattr(callback, "set_state") and "schedule" in record:
                callback.set_state(record["schedule"])
        phase_start = time.perf_counter()

        def record_epoch(epoch, logs, schedule=schedule, phase_start=phase_start):
            for name, value in (logs or {}).items():
                history.setdefault(name, []).append(float(value))
            saved = {"history": history, "before_training": before,
                     "train_seconds": train_seconds + time.perf_counter() - phase_start}
            for callback in schedule:
                if hasattr(callback, "get_state"):
                    saved["schedule"] = callback.get_state()
            return saved

        phase_callbacks = [
            callbacks.RecallAtK(evaluator, every_n_epochs=1 if config.mode == "train" else config.eval_every,
                                prefix="val_" if evaluated_on == "val_half" else "test_"),
            callbacks.LearningRateLogger(),  # before the schedule: the rates the epoch used
            *schedule,
            guard,
            keras.callbacks.TensorBoard(os.path.join(output_dir, "logs")),
        ]
        # Resuming mid-epoch: the rest of that epoch first, then whole epochs.
        segments = [(resume_epoch, resume_step, resume_epoch + 1)] if resume_step else []
        if resume_epoch + bool(resume_step) < end_epoch:
            segments.append((resume_epoch + bool(resume_step), 0, end_epoch))
        for segment_epoch, segment_step, segment_end in segments:
            data = distribute.distributed_train_dataset(
                strategy, train_split.paths, train_split.labels, sampler, config.image_size,
                segment_end - segment_epoch, first_epoch=segment_epoch, seed=config.seed, flip=config.flip,
                first_step=segment_step,
            )
            model.fit(
                data,
                epochs=segment_end,
                initial_epoch=segment_epoch,
                steps_per_epoch=sampler.num_batches - segment_step,
                shuffle=False,  # the sampler already decides the order
                callbacks=[*phase_callbacks, checkpoint.callback(
                    record_epoch, sampler.num_batches, guard, config.checkpoint_every_steps, segment_step)],
                verbose=config.verbose,
            )
            if guard.tripped_at is not None:
                break
        train_seconds += time.perf_counter() - phase_start
        if guard.tripped_at is not None:
            raise NumericalFault(guard.message(checkpoint))

    start = time.perf_counter()
    after = evaluator.measure(model, with_nmi=with_nmi)
    eval_seconds = time.perf_counter() - start
    logging.info("After training: %s", _summary(after))

    results = {
        "dataset": config.dataset,
        "evaluated_on": evaluated_on,
        "metrics": after,
        "before_training": before,
        "history": history,
        "lr_drop_epochs": lr_drop_epochs,
        "skipped_images": skipped_images,
        "timings": {
            "train_seconds": train_seconds,
            "final_eval_seconds": eval_seconds,
            "train_images_per_second": total_epochs * sampler.num_batches * config.batch_size
            / max(train_seconds, 1e-9),
        },
        "flags": _flag_values(config),
    }
    if distribute.is_chief(strategy):
        embedder.save(os.path.join(config.model_dir, "embedder.keras"))
        write_json(os.path.join(config.model_dir, "results.json"), results)
        _draw_curves(config, history)
    return model, results


def _draw_curves(config, history):
    try:
        plots.save_training_curves(
            history, os.path.join(config.model_dir, "curves.png"),
            warmup_epochs=config.warmup_epochs,
            eval_every=1 if config.mode == "train" else config.eval_every,
            title=f"{os.path.basename(os.path.normpath(config.model_dir))}: {config.dataset} {config.backbone}",
        )
    except (OSError, ValueError) as error:  # a figure must never fail a finished run
        logging.warning("Could not draw curves.png: %s", error)


class NumericalFault(RuntimeError):
    """Training produced a NaN or infinite loss."""


def _configure_determinism_and_numerics(config):
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    if config.debug_numerics:
        tf.debugging.enable_check_numerics()
    if config.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(config.mixed_precision)


def _finished_results(config, finished_epochs, total_epochs):
    """The results of an earlier run of the same command that got to the end, else None."""
    path = os.path.join(config.model_dir, "results.json")
    if finished_epochs < total_epochs or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        results = json.load(file)
    ignored = {"verbose"}
    earlier = {k: v for k, v in results.get("flags", {}).items() if k not in ignored}
    now = {k: v for k, v in _flag_values(config).items() if k not in ignored}
    if earlier != now:
        changed = sorted(k for k in set(earlier) | set(now) if earlier.get(k) != now.get(k))
        raise ValueError(f"--model_dir={config.model_dir} holds a finished run with other flags "
                         f"({', '.join(changed)}); choose another --model_dir.")
    return results


def _data(config):
    """(training Split, evaluator, name of the evaluated split, skipped images) for the flags."""
    splits = load_splits(config.dataset, config.data_dir)
    skipped = {}
    for name in list(splits):
        splits[name], bad = drop_or_raise(splits[name], name, config.on_bad_image, progress=config.verbose == 1)
        if bad:
            skipped[name] = bad
    logging.info("Data: %s", ", ".join(
        f"{name} {len(s)} images of {s.num_classes} classes" for name, s in splits.items()))
    ks = _parse_ks(config.eval_ks) or protocol(config.dataset).ks
    if config.mode == "train":
        train_half, val_half = class_halves(splits["train"])
        logging.info("--mode=train: training on %d classes, validating on the other %d",
                     train_half.num_classes, val_half.num_classes)
        evaluator = RetrievalEvaluator(val_half, config.image_size, ks, batch_size=config.eval_batch_size)
        return train_half, evaluator, "val_half", skipped
    query = splits.get("test", splits.get("query"))
    evaluator = RetrievalEvaluator(query, config.image_size, ks, gallery=splits.get("gallery"),
                                   batch_size=config.eval_batch_size)
    return splits["train"], evaluator, "test" if "test" in splits else "query_gallery", skipped


def _schedule(config):
    """(main epochs, LR drop epochs) from the flags, or from a stage-1 run's schedule.json."""
    drops = _parse_ints(config.lr_drop_epochs, "--lr_drop_epochs")
    if config.mode == "train":
        if drops or config.lr_schedule_from:
            raise ValueError("--lr_drop_epochs and --lr_schedule_from are for --mode=trainval; "
                             "--mode=train finds the schedule itself.")
        return config.epochs, []
    if not config.lr_schedule_from:
        return config.epochs, drops
    path = os.path.join(config.lr_schedule_from, SCHEDULE_FILE)
    try:
        with open(path, encoding="utf-8") as file:
            schedule = json.load(file)
        epochs, drops = int(schedule["best_epoch"]), [int(e) for e in schedule["lr_drop_epochs"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--lr_schedule_from: cannot read a stage-1 schedule from {path} ({error}); "
                         "run --mode=train with that --model_dir first.") from None
    if epochs < 1:
        raise ValueError(f"{path}: best_epoch is {epochs}; the stage-1 run recorded no epoch.")
    logging.info("Schedule from %s: %d epochs, LR drops after epochs %s", path, epochs, drops)
    return epochs, drops


def _schedule_callbacks(config, lr_drop_epochs, first_epoch, output_dir):
    """LR schedule of the main phase: after Recall@K (which it reads) and the LR logger (which
    records the rates the epoch used)."""
    if config.mode == "train":
        return [callbacks.PlateauSchedule(
            os.path.join(output_dir, SCHEDULE_FILE), monitor="val_recall@1",
            factor=config.lr_decay, patience=config.plateau_patience, first_epoch=first_epoch,
        )]
    if lr_drop_epochs:
        return [callbacks.MultiStepSchedule(lr_drop_epochs, (config.lr, config.proxy_lr), config.lr_decay,
                                            first_epoch=first_epoch)]
    return []


def _parse_ks(values):
    ks = sorted(set(_parse_ints(values, "--eval_ks")))
    if ks and ks[0] < 1:
        raise ValueError(f"--eval_ks must be positive integers, got {','.join(values)}.")
    return tuple(ks)


def _parse_ints(values, flag):
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ValueError(f"{flag} must be integers, got {','.join(values)}.") from None


def _summary(metrics):
    return " ".join(f"{name}={value:.4f}" for name, value in metrics.items()
                    if name.startswith(("recall@", "map@r", "nmi")))


def _flag_values(config):
    return {flag.name: getattr(config, flag.name) for flag in FLAGS.get_flags_for_module("pnpp_tf.flags")}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        results = train(FLAGS)
    except ValueError as error:
        print(f"pnpp_tf.train: error: {error}", file=sys.stderr)
        sys.exit(2)
    except NumericalFault as error:
        print(f"pnpp_tf.train: error: {error}", file=sys.stderr)
        sys.exit(3)
    print(json.dumps({"metrics": results["metrics"], "before_training": results["before_training"]}))


if __name__ == "__main__":
    app.run(main)
