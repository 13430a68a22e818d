"""Trains a ProxyNCA++ embedder and measures it on the unseen classes.

    python -m pnpp_tf.train --flagfile=configs/demo.flags

Writes to --model_dir: checkpoints/ (weights after every epoch), logs/ (TensorBoard),
embedder.keras (the trained embedder) and results.json (test metrics before and after training,
the flags used and timings).
"""

import json
import os
import sys
import time

import keras
from absl import app, flags, logging

from pnpp_tf import callbacks, flags as pnpp_flags
from pnpp_tf.data import load_splits, pipeline
from pnpp_tf.data.datasets import verify_images
from pnpp_tf.model import ProxyNCAModel, build_embedder, resolve_jit_compile
from pnpp_tf.optimizers import TorchAdam
from pnpp_tf.retrieval import RetrievalEvaluator

FLAGS = flags.FLAGS
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
    if not config.model_dir:
        raise ValueError("--model_dir is required: checkpoints and results.json are written there.")
    ks = _parse_ks(config.eval_ks)
    splits = load_splits(config.dataset, config.data_dir)
    train_split = splits["train"]
    for split in splits.values():
        verify_images(split.paths)
    sampler = pipeline.ClassBalancedSampler(
        train_split.labels, config.batch_size, config.classes_per_batch, seed=config.seed
    )
    evaluator = RetrievalEvaluator(
        splits.get("test", splits.get("query")), config.image_size, ks,
        gallery=splits.get("gallery"), batch_size=config.eval_batch_size,
    )
    logging.info("Data: %s", ", ".join(
        f"{name} {len(s)} images of {s.num_classes} classes" for name, s in splits.items()))

    os.makedirs(config.model_dir, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    if config.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(config.mixed_precision)
    embedder = build_embedder(
        config.backbone, config.image_size, config.embedding_dim, config.pooling,
        config.layer_norm, config.weights,
    )
    model = ProxyNCAModel(embedder, train_split.num_classes, config.temperature, config.loss)
    jit_compile = resolve_jit_compile(config.jit_compile)
    logging.info("XLA for the train step: %s (--jit_compile=%s)", jit_compile, config.jit_compile)

    start = time.perf_counter()
    before = evaluator.measure(model, with_nmi=True)
    logging.info("Before training: %s", _summary(before, ks))
    eval_seconds = time.perf_counter() - start

    history = {}
    start = time.perf_counter()
    phases = [("warm-up", config.warmup_epochs, True), ("training", config.epochs, False)]
    first_epoch = 0
    for phase, epochs, freeze_backbone in phases:
        if epochs <= 0:
            continue
        logging.info("%s: %d epochs of %d batches", phase, epochs, sampler.num_batches)
        # A new optimiser per phase: the main training starts with fresh Adam state.
        model.compile(
            optimizer=TorchAdam(config.lr, clipvalue=config.clip_value or None),
            proxy_optimizer=TorchAdam(config.proxy_lr),
            freeze_backbone=freeze_backbone,
            jit_compile=jit_compile,
        )
        data = pipeline.train_dataset(
            train_split.paths, train_split.labels, sampler, config.image_size, epochs,
            first_epoch=first_epoch, seed=config.seed, flip=config.flip,
        )
        fit = model.fit(
            data,
            epochs=first_epoch + epochs,
            initial_epoch=first_epoch,
            steps_per_epoch=sampler.num_batches,
            shuffle=False,  # the sampler already decides the order
            callbacks=_callbacks(config, evaluator),
            verbose=config.verbose,
        )
        for name, values in fit.history.items():
            history.setdefault(name, []).extend(float(v) for v in values)
        first_epoch += epochs
    train_seconds = time.perf_counter() - start

    start = time.perf_counter()
    after = evaluator.measure(model, with_nmi=True)
    eval_seconds += time.perf_counter() - start
    logging.info("After training: %s", _summary(after, ks))

    embedder.save(os.path.join(config.model_dir, "embedder.keras"))
    results = {
        "dataset": config.dataset,
        "metrics": after,
        "before_training": before,
        "history": history,
        "timings": {
            "train_seconds": train_seconds,
            "eval_seconds": eval_seconds,
            "train_images_per_second": first_epoch * sampler.num_batches * config.batch_size
            / max(train_seconds, 1e-9),
        },
        "flags": {name: getattr(config, name) for name in _flag_names()},
    }
    _write_json(os.path.join(config.model_dir, "results.json"), results)
    return results


def _callbacks(config, evaluator):
    return [
        callbacks.RecallAtK(evaluator, every_n_epochs=config.eval_every),
        callbacks.LearningRateLogger(),
        keras.callbacks.TensorBoard(os.path.join(config.model_dir, "logs")),
        keras.callbacks.ModelCheckpoint(
            os.path.join(config.model_dir, "checkpoints", "last.weights.h5"), save_weights_only=True
        ),
    ]


def _parse_ks(values):
    try:
        ks = sorted({int(k) for k in values})
    except ValueError:
        raise ValueError(f"--eval_ks must be positive integers, got {','.join(values)}.") from None
    if not ks or ks[0] < 1:
        raise ValueError(f"--eval_ks must be positive integers, got {','.join(values)}.")
    return ks


def _summary(metrics, ks):
    names = [f"recall@{k}" for k in ks] + ["map@r", "nmi"]
    return " ".join(f"{name}={metrics[name]:.4f}" for name in names if name in metrics)


def _flag_names():
    return sorted(
        flag.name for module in ("pnpp_tf.flags",)
        for flag in FLAGS.get_flags_for_module(module)
    )


def _write_json(path, payload):
    """Writes atomically, so a reader never sees half a file."""
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as file:
        json.dump(payload, file, indent=2, sort_keys=True)
    os.replace(partial, path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        results = train(FLAGS)
    except ValueError as error:
        print(f"pnpp_tf.train: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"metrics": results["metrics"], "before_training": results["before_training"]}))


if __name__ == "__main__":
    app.run(main)
