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

import keras
import tensorflow as tf
from absl import app, flags, logging

from pnpp_tf import checkpointing, distribute, flags as pnpp_flags, plots, run_lock
from pnpp_tf.data import load_splits, pipeline, protocol
from pnpp_tf.data.cache import ImageCache, default_short_side
from pnpp_tf.data.image_check import check_images, drop_or_raise
from pnpp_tf.data.split import class_halves
from pnpp_tf.io_utils import OutOfSpaceError, read_json_object, save_keras_atomic, write_json
from pnpp_tf.retrieval import RetrievalEvaluator
from pnpp_tf.trainer import SCHEDULE_FILE, NumericalFault, Trainer

FLAGS = flags.FLAGS
pnpp_flags.define_data_flags()
pnpp_flags.define_cache_flags()
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
    """Like `train`, returning (the trained `ProxyNCAModel`, the results dict).

    Raises:
        ValueError: bad flags or data, or --model_dir is in use by another run.
    """
    if not config.model_dir:
        raise ValueError("--model_dir is required: checkpoints and results.json are written there.")
    # First: a multi-worker strategy must exist before any other TensorFlow op runs.
    strategy = distribute.make_strategy(config.strategy, config.tpu)
    # Before anything is read from --model_dir: a second run on it must stop before it restores
    # (and later overwrites) the first one's checkpoints. Only the chief writes there.
    with run_lock.lock_unless(distribute.is_chief(strategy), config.model_dir):
        return _train_model_locked(config, strategy)


def _train_model_locked(config, strategy):
    epochs, lr_drop_epochs = _schedule(config)
    train_split, evaluator, evaluated_on, skipped_images = _data(config)
    sampler = pipeline.make_sampler(
        config.sampler, train_split.labels, config.batch_size, config.classes_per_batch, config.seed
    )
    os.makedirs(config.model_dir, exist_ok=True)
    _configure_determinism_and_numerics(config)
    distribute.check_batch_fits(strategy, config.batch_size, config.classes_per_batch, config.sampler)
    trainer = Trainer(config, strategy, train_split, sampler, evaluator, evaluated_on, epochs, lr_drop_epochs,
                      _flag_values(config))
    model = trainer.build_model()
    finished = _finished_results(config, trainer.restore(), trainer.total_epochs)
    if finished is not None:
        logging.info("%s/results.json: this run is finished; not training again.", config.model_dir)
        return model, finished
    _check_resumable(config, trainer.record, trainer.finished_epochs, trainer.total_epochs)

    trainer.fit()
    results = trainer.results(skipped_images)
    if distribute.is_chief(strategy):
        save_keras_atomic(model.embedder, os.path.join(config.model_dir, "embedder.keras"))
        write_json(os.path.join(config.model_dir, "results.json"), results)
        _draw_curves(config, results["history"])
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
    results = read_json_object(path, "results.json of a training run")
    if not isinstance(results.get("flags"), dict):
        raise ValueError(f"{path}: no 'flags' object, so it cannot be matched with this command; "
                         "restore the file or choose another --model_dir.")
    changed = _changed_flags(results["flags"], config)
    if changed:
        raise ValueError(f"--model_dir={config.model_dir} holds a finished run with other flags "
                         f"({', '.join(changed)}); choose another --model_dir.")
    return results


def _check_resumable(config, record, finished_epochs, total_epochs):
    """Refuses to resume a checkpointed run with flags that change what it computes.

    --epochs may grow, never shrink below what the checkpoint has trained: the run's history and
    its results would disagree.
    """
    # Checkpoints written before the record held the flags are resumed unchecked.
    changed = _changed_flags(record["flags"], config, allowed={"epochs"}) if "flags" in record else []
    if changed:
        raise ValueError(f"--model_dir={config.model_dir} holds an unfinished run made with other flags "
                         f"({', '.join(changed)}); rerun with its flags to resume it (see its results "
                         "or checkpoints), or choose another --model_dir.")
    if finished_epochs > total_epochs:
        raise ValueError(f"--epochs={config.epochs}: the run in --model_dir={config.model_dir} has already "
                         f"trained {finished_epochs - config.warmup_epochs} main epochs (after "
                         f"{config.warmup_epochs} of warm-up); --epochs may only grow when resuming. Pass "
                         f"--epochs={finished_epochs - config.warmup_epochs} or more, or choose another --model_dir.")


def _changed_flags(earlier_values, config, allowed=()):
    """`checkpointing.changed_flags` between an earlier run's recorded flags and `config`."""
    defaults = {flag.name: flag.default for flag in FLAGS.get_flags_for_module("pnpp_tf.flags")}
    return checkpointing.changed_flags(earlier_values, _flag_values(config), defaults, allowed)


def _data(config):
    """(training Split, evaluator, name of the evaluated split, skipped images) for the flags."""
    splits = load_splits(config.dataset, config.data_dir)
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
    ks = pnpp_flags.parse_eval_ks(config.eval_ks) or protocol(config.dataset).ks
    if config.mode == "train":
        train_split, query = class_halves(splits["train"])
        gallery, evaluated_on = None, "val_half"
        logging.info("--mode=train: training on %d classes, validating on the other %d",
                     train_split.num_classes, query.num_classes)
    else:
        train_split, gallery = splits["train"], splits.get("gallery")
        query = splits.get("test", splits.get("query"))
        evaluated_on = "test" if "test" in splits else "query_gallery"
    if caches:
        train_split, query, gallery = _cached(caches, train_split, query, gallery, config.verbose == 1,
                                              config.max_pixels)
    evaluator = RetrievalEvaluator(query, config.image_size, ks, gallery=gallery, batch_size=config.eval_batch_size,
                                   max_pixels=config.max_pixels)
    return train_split, evaluator, evaluated_on, skipped


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
    if not tf.io.gfile.exists(path):
        raise ValueError(f"--lr_schedule_from={config.lr_schedule_from}: no {SCHEDULE_FILE} there; run "
                         "--mode=train with that --model_dir first.")
    schedule = read_json_object(path, "stage-1 schedule")
    try:
        epochs, drops = int(schedule["best_epoch"]), [int(e) for e in schedule["lr_drop_epochs"]]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: not a stage-1 schedule (no integer best_epoch and lr_drop_epochs: "
                         f"{error!r}); rerun --mode=train with that --model_dir.") from error
    if epochs < 1:
        raise ValueError(f"{path}: best_epoch is {epochs}; the stage-1 run recorded no epoch.")
    logging.info("Schedule from %s: %d epochs, LR drops after epochs %s", path, epochs, drops)
    return epochs, drops


def _parse_ints(values, flag):
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ValueError(f"{flag} must be integers, got {','.join(values)}.") from None


def _flag_values(config):
    return {flag.name: getattr(config, flag.name) for flag in FLAGS.get_flags_for_module("pnpp_tf.flags")}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        results = train(FLAGS)
    except (ValueError, OutOfSpaceError) as error:
        print(f"pnpp_tf.train: error: {error}", file=sys.stderr)
        sys.exit(2)
    except NumericalFault as error:
        print(f"pnpp_tf.train: error: {error}", file=sys.stderr)
        sys.exit(3)
    print(json.dumps({"metrics": results["metrics"], "before_training": results["before_training"]}))


if __name__ == "__main__":
    app.run(main, flags_parser=pnpp_flags.parse_flags_or_exit("pnpp_tf.train"))
