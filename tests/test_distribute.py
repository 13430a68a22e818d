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
from pnpp_tf import distribute
from pnpp_tf.model import ProxyNCAModel, build_embedder
from pnpp_tf.optimizers import TorchAdam

WORKER = str(REPO / "tests" / "distributed_worker.py")


def test_mirrored_step_on_two_cpus_equals_the_single_device_step(tmp_path):
    out = tmp_path / "weights.npz"
    result = run_python(WORKER, "mirrored_step", str(out), str(REPO / "tests"), str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr[-3000:]
    weights = np.load(out)
    assert int(weights["default_replicas"]) == 1 and int(weights["mirrored_replicas"]) == 2
    names = sorted(k for k in weights if k.startswith("default_") and k != "default_replicas")
    assert len(names) > 20  # backbone, BatchNorm statistics, embedding layer and proxies
    for name in names:
        np.testing.assert_allclose(weights[name.replace("default", "mirrored", 1)], weights[name],
                                   rtol=1e-4, atol=1e-5, err_msg=name)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
