"""Run by test_distribute.py in fresh processes (TensorFlow's devices are fixed at start-up).

    python distributed_worker.py mirrored_step OUT.npz TESTS_DIR DATA_DIR
    python distributed_worker.py multi_worker OUT.npz -- <pnpp_tf.train flags>
"""

import sys

import numpy as np
import tensorflow as tf


def mirrored_step(out):
    """One step on one device and one under MirroredStrategy on two logical CPUs, same start.

    The step runs once in float64 and once in float32. OUT.npz holds "<strategy>_replicas", and
    "<dtype>:<strategy>:loss" and "<dtype>:<strategy>:<weight path>" for every weight.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras  # pylint: disable=import-outside-toplevel

    from pnpp_tf.training import distribute  # pylint: disable=import-outside-toplevel
    from pnpp_tf.data import pipeline  # pylint: disable=import-outside-toplevel
    from pnpp_tf.modeling.model import ProxyNCAModel, build_embedder, synchronize_batch_norm  # pylint: disable=import-outside-toplevel
    from pnpp_tf.data import load_splits  # pylint: disable=import-outside-toplevel
    from pnpp_tf.modeling.optimizers import TorchAdam  # pylint: disable=import-outside-toplevel
    sys.path.insert(0, sys.argv[3])
    from conftest import make_folder_dataset  # pylint: disable=import-outside-toplevel

    train = load_splits("folder", make_folder_dataset(sys.argv[4]))["train"]
    sampler = pipeline.ClassBalancedSampler(train.labels, batch_size=8, classes_per_batch=2, seed=0)
    results = {}
    initial = None
    # One strategy per kind for both dtypes: a second MirroredStrategy would reuse the first one's
    # collective instance keys with another dtype, which TensorFlow rejects.
    strategies = {name: distribute.make_strategy(name) for name in ("default", "mirrored")}
    for dtype in ("float64", "float32"):
        keras.config.set_dtype_policy(dtype)
        for name, strategy in strategies.items():
            keras.utils.set_random_seed(0)
            with strategy.scope():
                embedder = build_embedder("small_cnn", 32, 16)
                if strategy.num_replicas_in_sync > 1:
                    synchronize_batch_norm(embedder)
                model = ProxyNCAModel(embedder, train.num_classes)
                model.compile(optimizer=TorchAdam(1e-2), proxy_optimizer=TorchAdam(1.0), clip_value=10)
            if initial is None:
                initial = model.get_weights()
            else:
                model.set_weights(initial)
            data = distribute.distributed_train_dataset(strategy, train.paths, train.labels, sampler, 32, 1, 0, 0,
                                                        True)
            history = model.fit(data, epochs=1, steps_per_epoch=1, verbose=0)
            results[f"{name}_replicas"] = np.array(strategy.num_replicas_in_sync)
            results[f"{dtype}:{name}:loss"] = np.array(history.history["loss"][0])
            for variable in model.weights:
                results[f"{dtype}:{name}:{variable.path}".replace("/", ".")] = variable.numpy()
    keras.config.set_dtype_policy("float32")
    np.savez(out, **results)


def multi_worker(out, train_args):
    from pnpp_tf import flags, train  # pylint: disable=import-outside-toplevel
    from pnpp_tf.config import TrainConfig  # pylint: disable=import-outside-toplevel

    model, _ = train.train_model(flags.parse(TrainConfig, ["train", *train_args]))
    np.savez(out, *model.get_weights())


if __name__ == "__main__":
    if sys.argv[1] == "mirrored_step":
        mirrored_step(sys.argv[2])
    else:
        multi_worker(sys.argv[2], sys.argv[sys.argv.index("--") + 1:])
