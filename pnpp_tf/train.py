"""Trains a ProxyNCA++ embedder and measures it on the unseen classes.

    python -m pnpp_tf.train --flagfile=configs/demo.flags

Writes to --model_dir: checkpoints/ (the full training state after every epoch; rerunning the
command resumes from it), logs/ (TensorBoard), embedder.keras (the trained embedder),
results.json (test metrics before and after training, the flags used and timings), curves.png
and, with --mode=train, schedule.json (the LR drops and best epoch that --mode=trainval
--lr_schedule_from=<that model_dir> replays).
"""

import contextlib
import json
import os
import sys

import keras
import tensorflow as tf
from absl import logging
# Private: TensorFlow exports `enable_op_determinism` and `enable_check_numerics` alone, not how to
# ask whether they are on (nor, for determinism, how to turn it off), which `train()` needs to
# leave the process as it found it. Read on TensorFlow 2.21 (setup.py bounds it below 2.22);
# tests/test_process_state.py fails naming them if a release moves or changes them.
from tensorflow.python.debug.lib import check_numerics_callback as _tf_check_numerics
from tensorflow.python.framework import config as _tf_framework_config

from pnpp_tf import flags, plots, run_lock
from pnpp_tf.training import distribute
from pnpp_tf.artifacts import ModelDir
from pnpp_tf.training.checkpoints import RunCheckpoint
from pnpp_tf.config import TrainConfig
from pnpp_tf.data import load_splits, pipeline, protocol
from pnpp_tf.data.cache import ImageCache, default_short_side
from pnpp_tf.data.faults import ImageFaults
from pnpp_tf.data.fingerprint import DataFingerprint, fingerprint_path
from pnpp_tf.data.image_check import check_images, drop_or_raise
from pnpp_tf.data.split import class_halves
from pnpp_tf.errors import UserError
from pnpp_tf.io_utils import check_writable_dir, read_json_object, save_keras_atomic, write_json
from pnpp_tf.retrieval.evaluator import RetrievalEvaluator
from pnpp_tf.training.callbacks import SCHEDULE_FILE
from pnpp_tf.training.trainer import NumericalFault, Schedule, Trainer, TrainingData


def train(config):
    """Runs the whole recipe: warm-up, training, evaluation; returns the results dict.

    What the run sets for the whole process is set back when it returns or raises: Keras' global
    dtype policy (`config.mixed_precision`; "none" trains in float32 whatever the caller's policy
    is), TensorFlow's op determinism (`config.deterministic`) and its NaN/Inf check
    (`config.debug_numerics`, for the calling thread); a setting the caller had already turned on
    stays on. Two things stay as the run leaves them, because they are global by nature: the
    random seeds (`keras.utils.set_random_seed(config.seed)` seeds Python's `random`, NumPy's
    global generator and TensorFlow's; there is no state to give back that would not replay the
    same numbers again), and a `config.strategy` of multi_worker or tpu, which connects the
    process to its cluster for good.

    Args:
        config: a `pnpp_tf.config.TrainConfig`.

    Returns:
        The dict also written to `<model_dir>/results.json`.
    """
    return train_model(config)[1]


def train_model(config):
    """Like `train`, returning (the trained `ProxyNCAModel`, the results dict).

    Raises:
        UserError: bad data, a --model_dir in use by another run, or holding a run with other
            flags.
        OutOfSpaceError: the disk filled up; the last checkpoint written is whole.
        NumericalFault: a loss was NaN or infinite.
    """
    # First: a multi-worker strategy must exist before any other TensorFlow op runs.
    strategy = distribute.make_strategy(config.strategy, config.tpu)
    # Before anything is read from --model_dir: a second run on it must stop before it restores
    # (and later overwrites) the first one's checkpoints. Only the chief writes there.
    with run_lock.lock_unless(distribute.is_chief(strategy), config.model_dir):
        return _train_model_locked(config, strategy)


def _train_model_locked(config, strategy):
    # Every worker writes cache entries. A cache directory already there may be a prebuilt one on
    # read-only storage: a missing entry that cannot be written is named when it is built.
    if config.cache_dir and not tf.io.gfile.isdir(config.cache_dir):
        check_writable_dir(config.cache_dir, "--cache_dir")
    schedule = _schedule(config)
    output_dir = distribute.writable_dir(config.model_dir, strategy)
    checkpoint = RunCheckpoint(os.path.join(output_dir, "checkpoints"), keep=config.keep_checkpoints,
                               restore_from=os.path.join(config.model_dir, "checkpoints"))
    # The checkpoint's record before its weights: a run with other flags (another
    # --embedding_dim, say) is refused here, not by TensorFlow's restore.
    finished_epochs, record = checkpoint.read_state()
    total_epochs = config.warmup_epochs + schedule.epochs
    finished = _finished_results(config, finished_epochs, total_epochs)
    splits = load_splits(config.dataset, config.data_dir)
    # A stat per file, no image read: a change is named before any image is decoded or any
    # weight restored (a class added would otherwise fail TensorFlow's restore of the proxies).
    fingerprint = DataFingerprint.of_splits(splits, config.data_dir)
    if finished is None:
        _check_resumable(config, record, finished_epochs, total_epochs)
        _check_data_unchanged(config, record, fingerprint)
    data = _data(config, splits, fingerprint, record.get("skipped_during_run", ()))
    os.makedirs(config.model_dir, exist_ok=True)
    if distribute.is_chief(strategy):
        fingerprint.save(config.model_dir)
    with _process_settings(config):
        distribute.check_batch_fits(strategy, config.batch_size, config.classes_per_batch, config.sampler)
        trainer = Trainer(config, strategy, data, schedule, checkpoint)
        if finished is not None:
            logging.info("%s/results.json: this run is finished; not training again.", config.model_dir)
            return trainer.model, finished

        results = trainer.fit()
        if distribute.is_chief(strategy):
            run = ModelDir(config.model_dir)
            save_keras_atomic(trainer.model.embedder, run.embedder_path)
            write_json(run.results_path, results)
            _draw_curves(run, results)
        return trainer.model, results


def _draw_curves(run, results):
    try:
        plots.save_run_curves(results["history"], results["flags"], run.curves_path,
                              os.path.basename(os.path.normpath(run.path)), eval_every=results.get("eval_every"))
    except (OSError, ValueError) as error:  # a figure must never fail a finished run
        logging.warning("Could not draw curves.png: %s", error)


@contextlib.contextmanager
def _process_settings(config):
    """Seeds the run and sets its dtype policy, op determinism and NaN check; all but the seeds
    are set back on exit (see `train`)."""
    policy = keras.mixed_precision.global_policy()
    # Only what this call turns on is turned off: the caller's own settings are theirs.
    turn_off_determinism = config.deterministic and not op_determinism_enabled()
    turn_off_numerics = config.debug_numerics and not check_numerics_enabled()
    try:
        keras.utils.set_random_seed(config.seed)
        if config.deterministic:
            tf.config.experimental.enable_op_determinism()
        if config.debug_numerics:
            tf.debugging.enable_check_numerics()
        # Explicitly float32 for "none": a policy the caller (or an earlier run) set would
        # otherwise build this run's model in it, with no loss scaling and a wrong results.json.
        keras.mixed_precision.set_global_policy("float32" if config.mixed_precision == "none"
                                                else config.mixed_precision)
        yield
    finally:
        keras.mixed_precision.set_global_policy(policy)
        if turn_off_determinism:
            _tf_framework_config.disable_op_determinism()
        if turn_off_numerics:
            tf.debugging.disable_check_numerics()


def op_determinism_enabled():
    """Whether TensorFlow's op determinism is on (process-wide)."""
    return _tf_framework_config.is_op_determinism_enabled()


def check_numerics_enabled():
    """Whether `tf.debugging.enable_check_numerics` is in effect on this thread."""
    # Where enable_check_numerics keeps its callback, per thread, and what its disable looks for.
    return hasattr(_tf_check_numerics._state, "check_numerics_callback")  # pylint: disable=protected-access


def _finished_results(config, finished_epochs, total_epochs):
    """The results of an earlier run of the same command that got to the end, else None."""
    if finished_epochs < total_epochs:
        return None
    results = ModelDir(config.model_dir).read_results(required=("flags",))
    if results is None:
        return None
    changed = config.changed_from(results.flags)
    if changed:
        raise UserError(f"--model_dir={config.model_dir} holds a finished run with other flags "
                        f"({', '.join(changed)}); choose another --model_dir.")
    return results.data


def _check_resumable(config, record, finished_epochs, total_epochs):
    """Refuses to resume a checkpointed run with flags that change what it computes.

    --epochs may grow, never shrink below what the checkpoint has trained: the run's history and
    its results would disagree.
    """
    # Checkpoints written before the record held the flags are resumed unchecked.
    # --on_bad_image may change too: whatever it leaves out of the data, the fingerprint names.
    changed = config.changed_from(record["flags"], allowed={"epochs", "on_bad_image"}) if "flags" in record else []
    if changed:
        raise UserError(f"--model_dir={config.model_dir} holds an unfinished run made with other flags "
                        f"({', '.join(changed)}); rerun with its flags to resume it (see its results "
                        "or checkpoints), or choose another --model_dir.")
    if finished_epochs > total_epochs:
        raise UserError(f"--epochs={config.epochs}: the run in --model_dir={config.model_dir} has already "
                        f"trained {finished_epochs - config.warmup_epochs} main epochs (after "
                        f"{config.warmup_epochs} of warm-up); --epochs may only grow when resuming. Pass "
                        f"--epochs={finished_epochs - config.warmup_epochs} or more, or choose another --model_dir.")


def _check_data_unchanged(config, record, fingerprint):
    """Refuses to resume on data other than the checkpointed run's, naming what changed.

    Other classes cannot be resumed (the proxies are one per class); changed files can, with
    --accept_data_change. Images the run itself skipped mid-run are known changes.
    """
    recorded = record.get("data")
    if not recorded and record:
        logging.warning("--model_dir=%s was checkpointed before runs recorded their data: resuming without "
                        "checking that --data_dir is unchanged.", config.model_dir)
    if not recorded or recorded.get("digest") == fingerprint.digest:
        return  # a fresh start, a checkpoint from before fingerprints, or the same data
    where = f"--data_dir={config.data_dir} has changed since the run in --model_dir={config.model_dir} was checkpointed"
    earlier = DataFingerprint.load(config.model_dir, recorded["digest"], config.data_dir)
    if earlier is None:
        described = f"the record of its data, {fingerprint_path(config.model_dir, recorded['digest'])}, is gone"
        classes_changed = False
    else:
        changes = earlier.changes_to(fingerprint, [item["path"] for item in record.get("skipped_during_run", ())])
        if not changes:
            return
        described = "; ".join(change.describe() for change in changes)
        classes_changed = any(change.classes_changed for change in changes)
    if classes_changed:
        raise UserError(f"{where} ({described}); a run has one proxy per class and cannot resume on other "
                        "classes: restore the data, or choose another --model_dir.")
    if not config.accept_data_change:
        raise UserError(f"{where} ({described}); restore the files, or rerun with --accept_data_change to "
                        "resume on the data as it is now.")
    logging.warning("Resuming on changed data (--accept_data_change): %s", described)


def _data(config, splits, fingerprint, skipped_during_run=()):
    """The run's `TrainingData`: the splits checked (and cached), the sampler, the evaluator.

    Args:
        config: the `TrainConfig`.
        splits: the dataset's splits as read.
        fingerprint: their `DataFingerprint`, the state mid-run failures are compared with.
        skipped_during_run: the images an earlier process of this run skipped mid-run.
    """
    caches = _caches(config)
    skipped = {}
    for name in list(splits):
        # With a cache, the check decodes each image once, into the cache it will be read from.
        check = ((caches[0] if name == "train" else caches[1]).check_and_build) if caches else check_images
        splits[name], bad = drop_or_raise(splits[name], name, config.on_bad_image, progress=config.verbose == 1,
                                          check=check, max_pixels=config.max_pixels)
        if bad:
            skipped[name] = bad
    logging.info("Data: %s", ", ".join(
        f"{name} {len(s)} images of {s.num_classes} classes" for name, s in splits.items()))
    ks = config.eval_ks or protocol(config.dataset).ks
    if config.mode == "train":
        train_split, query = class_halves(splits["train"])
        gallery, evaluated_on = None, "val_half"
        logging.info("--mode=train: training on %d classes, validating on the other %d",
                     train_split.num_classes, query.num_classes)
    else:
        train_split, gallery = splits["train"], splits.get("gallery")
        query = splits.get("test", splits.get("query"))
        evaluated_on = "test" if "test" in splits else "query_gallery"
    if train_split.num_classes < 2:
        raise UserError(f"--data_dir={config.data_dir}: training needs at least 2 classes, the training split "
                        f"has {train_split.num_classes}.")
    faults = ImageFaults(fingerprint, config.on_bad_image, config.max_pixels, skipped_during_run)
    fingerprint_split = "train" if config.mode == "train" else None
    sources = (train_split, query, gallery)
    if caches:
        train_split, query, gallery = _cached(caches, train_split, query, gallery, config.verbose == 1,
                                              config.max_pixels)
    for name, read, source, cache in (("train", train_split, sources[0], caches and caches[0]),
                                      (fingerprint_split or ("test" if "test" in splits else "query"), query,
                                       sources[1], caches and caches[1]),
                                      ("gallery", gallery, sources[2], caches and caches[1])):
        if read is not None:
            faults.register(name, read.paths, source.paths, cache or None)
    evaluator = RetrievalEvaluator(query, config.image_size, ks, gallery=gallery, batch_size=config.eval_batch_size,
                                   max_pixels=config.max_pixels, faults=faults)
    sampler = pipeline.make_sampler(config.sampler, train_split.labels, config.batch_size,
                                    config.classes_per_batch, config.seed)
    return TrainingData(train_split, sampler, evaluator, evaluated_on, skipped, fingerprint, faults)


def _caches(config):
    """(training images' cache, evaluation images' cache) in --cache_dir, or () without one.

    Evaluation images are cached at the side evaluation resizes to, so that evaluating from the
    cache matches evaluating from the files whatever --cache_short_side the training images use.
    """
    if not config.cache_dir:
        return ()
    eval_cache = ImageCache(config.cache_dir, default_short_side(config.image_size))
    train_side = config.cache_short_side or eval_cache.short_side
    return ImageCache(config.cache_dir, train_side), eval_cache


def _cached(caches, train_split, query, gallery, progress, max_pixels):
    """The splits read through the (training, evaluation) `ImageCache`s of `_caches`."""
    train_cache, eval_cache = caches
    return (train_cache.cached_split(train_split, progress, max_pixels),
            eval_cache.cached_split(query, progress, max_pixels),
            eval_cache.cached_split(gallery, progress, max_pixels) if gallery else None)


def _schedule(config):
    """The run's `Schedule`: from the flags, or from a stage-1 run's schedule.json."""
    if config.mode == "train" or not config.lr_schedule_from:
        return Schedule(config.epochs, config.lr_drop_epochs)
    path = os.path.join(config.lr_schedule_from, SCHEDULE_FILE)
    if not tf.io.gfile.exists(path):
        raise UserError(f"--lr_schedule_from={config.lr_schedule_from}: no {SCHEDULE_FILE} there; run "
                        "--mode=train with that --model_dir first.")
    schedule = read_json_object(path, "stage-1 schedule")
    try:
        epochs, drops = int(schedule["best_epoch"]), tuple(int(e) for e in schedule["lr_drop_epochs"])
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path}: not a stage-1 schedule (no integer best_epoch and lr_drop_epochs: "
                        f"{error!r}); rerun --mode=train with that --model_dir.") from error
    if epochs < 1:
        raise UserError(f"{path}: best_epoch is {epochs}; the stage-1 run recorded no epoch.")
    logging.info("Schedule from %s: %d epochs, LR drops after epochs %s", path, epochs, list(drops))
    return Schedule(epochs, drops)


def main(config):
    try:
        results = train(config)
    except NumericalFault as error:
        print(f"pnpp_tf.train: error: {error}", file=sys.stderr)
        return 3
    print(json.dumps({"metrics": results["metrics"], "before_training": results["before_training"]}))
    return 0


if __name__ == "__main__":
    flags.run(main, TrainConfig, "pnpp_tf.train")
