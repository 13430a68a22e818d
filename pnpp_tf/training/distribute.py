"""tf.distribute: choosing the strategy, feeding it whole classes, and who writes files.

Every replica receives whole classes of the class-balanced global batch: each input pipeline
(one per worker) regenerates the same global batches from the shared seed and keeps the contiguous
slice of its replicas, so the global batch is exactly what one device would have seen.
"""

import json
import os
import tempfile

import tensorflow as tf
from absl import logging

from pnpp_tf.data import pipeline
from pnpp_tf.errors import UserError

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


def make_strategy(name, tpu=None):
    """Builds the `tf.distribute.Strategy` named by `--strategy`.

    Args:
        name: "default" (one device), "mirrored" (all local GPUs, or CPUs), "multi_worker"
            (MultiWorkerMirroredStrategy; the cluster comes from the TF_CONFIG environment
            variable) or "tpu" (TPUStrategy on `tpu`).
        tpu: TPU name or grpc:// address for "tpu"; empty means the local TPU VM.

    Returns:
        The strategy.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise UserError("--strategy=multi_worker needs the TF_CONFIG environment variable describing "
                             "the cluster and this task (see docs/distributed.md).")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        return _tpu_strategy(tpu)
    raise UserError(f"--strategy must be one of {STRATEGIES}, got {name!r}.")


def _tpu_strategy(tpu):
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        # TensorFlow's own message ("Please provide a TPU Name to connect to.") does not say which
        # flag to set.
        where = f"--tpu={tpu}" if tpu else "this machine (no --tpu given, so a local TPU VM)"
        raise UserError(f"--strategy=tpu: no TPU reachable at {where} ({error}). Run on a TPU VM, or "
                         "set --tpu to the TPU's name or grpc://address.") from error
    return tf.distribute.TPUStrategy(resolver)


def check_batch_fits(strategy, batch_size, classes_per_batch, sampler_kind):
    """Every replica must get the same number of whole classes."""
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise UserError(f"--batch_size={batch_size} is not divisible by the {replicas} replicas.")
    if sampler_kind == "balanced" and classes_per_batch % replicas:
        raise UserError(f"--classes_per_batch={classes_per_batch} is not divisible by the {replicas} replicas; "
                         "each replica must receive whole classes.")


def distributed_train_dataset(strategy, paths, labels, sampler, image_size, epochs, first_epoch, seed, flip,
                              first_step=0, max_pixels=pipeline.DEFAULT_MAX_PIXELS):
    """The training batches of `pipeline.train_dataset`, split over the strategy's replicas.

    With one replica this is the plain dataset. Otherwise every input pipeline builds the same
    global batches and keeps its contiguous slice, batched per replica.
    """
    arguments = dict(paths=paths, labels=labels, sampler=sampler, image_size=image_size, epochs=epochs,
                     first_epoch=first_epoch, seed=seed, flip=flip, first_step=first_step, max_pixels=max_pixels)
    if strategy.num_replicas_in_sync == 1:
        return pipeline.train_dataset(**arguments)

    def dataset_fn(context):
        return pipeline.train_dataset(
            **arguments,
            num_replicas=context.num_replicas_in_sync,
            pipeline_index=context.input_pipeline_id,
            num_pipelines=context.num_input_pipelines,
        )

    return strategy.distribute_datasets_from_function(dataset_fn)


def is_chief(strategy):
    """True on the task that writes checkpoints and results (always, without a cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief" or task_type is None:
        return True
    has_chief = "chief" in json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    return task_type == "worker" and task_id == 0 and not has_chief


def writable_dir(model_dir, strategy):
    """`model_dir` on the chief; a private temporary directory on the other workers.

    Every worker must run the checkpoint and TensorBoard callbacks (their collective ops must
    match), but only the chief's files are kept.
    """
    if is_chief(strategy):
        return model_dir
    private = tempfile.mkdtemp(prefix="pnpp_tf_worker_")
    logging.info("Not the chief: writing checkpoints and logs to %s", private)
    return private
