"""tf.distribute: MirroredStrategy matches one device; two real workers agree; mixed precision."""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

from cli_helpers import REPO, TINY_RUN, run_python
from conftest import make_folder_dataset
from pnpp_tf.training import distribute
from pnpp_tf.modeling.model import ProxyNCAModel, build_embedder
from pnpp_tf.modeling.optimizers import TorchAdam

WORKER = str(REPO / "tests" / "distributed_worker.py")


@pytest.mark.slow
def test_mirrored_step_on_two_cpus_equals_the_single_device_step(tmp_path):
    """Synchronised BatchNorm, the replicas' gradient sum and global clipping give one device's step.

    Compared in float64. In float32 the comparison is ill-posed: max pooling routes its gradient to
    the larger of two inputs, and a window whose two largest inputs differ by less than float32
    rounding sends it one way on one device and the other way on two. On the test's own batch one
    of 32768 block-2 windows holds 0.37777007 and 0.37776908 (a gap of 2.6e-6 relative): on a CPU
    without AVX-512 the default kernels round them apart in opposite orders, and every gradient
    below that layer moves by up to 4 % (first conv kernel 7.9e-4 apart after one step, while the
    float64 step agrees with the multi-replica float32 one to 1.9e-7). In float64 such a tie would
    need a gap below 1e-15. What stays float32 in a float64 model is the loss (the proxies and
    logits are float32 by design); its rounding, ~1e-7 of each gradient, moves the proxies (learning
    rate 1, so a step of g / (|g| + 1)) by at most ~1e-6, within `atol`.

    The float32 step is still checked where it is continuous: the loss and BatchNorm's moving
    statistics depend on the forward pass only, so they agree to float32 rounding of the batch
    statistics (~1e-6 relative).
    """
    out = tmp_path / "weights.npz"
    result = run_python(WORKER, "mirrored_step", str(out), str(REPO / "tests"), str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr[-3000:]
    weights = np.load(out)
    assert int(weights["default_replicas"]) == 1 and int(weights["mirrored_replicas"]) == 2

    def compare(dtype, names, **tolerance):
        for name in names:
            np.testing.assert_allclose(weights[f"{dtype}:mirrored:{name}"], weights[f"{dtype}:default:{name}"],
                                       err_msg=f"{dtype} {name}", **tolerance)

    names = [k.split(":", 2)[2] for k in weights if k.startswith("float64:default:") and not k.endswith(":loss")]
    assert len(names) > 20  # backbone, BatchNorm statistics, embedding layer and proxies
    assert weights[f"float64:default:{names[0]}"].dtype == np.float64
    compare("float64", names, rtol=1e-4, atol=1e-5)
    moving = [name for name in names if "moving_" in name]
    assert len(moving) == 16  # mean and variance of the eight BatchNorm layers
    compare("float32", ["loss"] + moving, rtol=1e-5, atol=1e-6)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_worker_job_ends_with_identical_weights(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data")
    cluster = {"worker": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]}
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    processes = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        env = dict(os.environ, TF_CONFIG=tf_config, PYTHONPATH=python_path, TF_CPP_MIN_LOG_LEVEL="2")
        args = [sys.executable, WORKER, "multi_worker", str(tmp_path / f"worker{index}.npz"), "--",
                *TINY_RUN, "--dataset=folder", f"--data_dir={data_dir}", f"--model_dir={tmp_path / 'run'}",
                "--strategy=multi_worker", "--epochs=1", "--warmup_epochs=0", "--eval_ks=1", "--eval_every=0"]
        processes.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    chief, other = np.load(tmp_path / "worker0.npz"), np.load(tmp_path / "worker1.npz")
    assert len(chief.files) == len(other.files) > 20
    for name in chief.files:
        np.testing.assert_array_equal(chief[name], other[name], err_msg=name)
    # Only the chief writes the run's files.
    assert (tmp_path / "run" / "results.json").is_file()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["flags"]["strategy"] == "multi_worker"


def test_mixed_float16_step_keeps_loss_and_proxies_in_float32():
    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    labels = np.repeat(np.arange(4), 2).astype(np.int32)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = ProxyNCAModel(build_embedder("small_cnn", 32, 16), 4)
        model.compile(optimizer=TorchAdam(1e-3), proxy_optimizer=TorchAdam(1.0))
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        proxies_before = model.loss_layer.proxies.numpy().copy()
        logs = model.train_on_batch(images, labels, return_dict=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.loss_layer.proxies.dtype == "float32"
    assert model.embedder.get_layer("backbone").get_layer("block1_conv1").compute_dtype == "float16"
    assert model.embedder.output.dtype == "float32"
    assert np.isfinite(logs["loss"])
    step = model.loss_layer.proxies.numpy() - proxies_before
    # Unscaled: the first Adam step is at most the learning rate (1.0) per coordinate.
    assert np.all(np.isfinite(step)) and 0 < np.abs(step).max() <= 1.0 + 1e-6


def test_whole_classes_per_replica_is_enforced():
    two = type("TwoReplicas", (), {"num_replicas_in_sync": 2})()
    with pytest.raises(ValueError, match="--classes_per_batch=3 is not divisible by the 2 replicas"):
        distribute.check_batch_fits(two, 12, 3, "balanced")
    distribute.check_batch_fits(two, 12, 3, "random")


def test_multi_worker_without_tf_config_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        distribute.make_strategy("multi_worker")


def test_tpu_without_a_tpu_is_a_clear_error():
    # No TPU on these machines: this checks the message, not TPUStrategy itself.
    with pytest.raises(ValueError, match=r"--strategy=tpu: no TPU reachable at this machine .*set --tpu"):
        distribute.make_strategy("tpu")


def test_per_replica_slices_reassemble_the_global_batch(folder_dataset):
    from pnpp_tf.data import load_splits, pipeline  # pylint: disable=import-outside-toplevel

    train = load_splits("folder", folder_dataset)["train"]
    sampler = pipeline.ClassBalancedSampler(train.labels, batch_size=8, classes_per_batch=4, seed=0)
    whole = list(pipeline.train_dataset(train.paths, train.labels, sampler, 24, 1).as_numpy_iterator())
    halves = [list(pipeline.train_dataset(train.paths, train.labels, sampler, 24, 1, num_replicas=2,
                                          pipeline_index=i, num_pipelines=2).as_numpy_iterator()) for i in range(2)]
    for step, (images, labels) in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([halves[0][step][1], halves[1][step][1]]), labels)
        np.testing.assert_allclose(np.concatenate([halves[0][step][0], halves[1][step][0]]), images)
        # Each replica holds whole classes: 2 classes x 2 images.
        assert all(len(set(h[step][1])) == 2 for h in halves)
