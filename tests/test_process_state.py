"""`pnpp_tf.train.train()` leaves the process as it found it: dtype policy, determinism, NaN check."""

import keras
import pytest
import tensorflow as tf

from conftest import make_folder_dataset
from pnpp_tf import train
from pnpp_tf.config import TrainConfig

# TINY_RUN of cli_helpers, in-process: one epoch, no warm-up, measured only at the end.
TINY = dict(dataset="folder", backbone="small_cnn", weights="none", image_size=32, embedding_dim=16, batch_size=8,
            classes_per_batch=2, epochs=1, warmup_epochs=0, eval_every="0", eval_ks=(1,), verbose=0, lr=1e-3,
            proxy_lr=10.0)


def process_state():
    return {"policy": keras.mixed_precision.global_policy().name, "determinism": train.op_determinism_enabled(),
            "numerics": train.check_numerics_enabled()}


@pytest.fixture
def data_dir(tmp_path):
    return make_folder_dataset(tmp_path / "data")


@pytest.fixture(autouse=True)
def clean_process():
    """Each test starts from, and leaves, TensorFlow's and Keras' defaults whatever it asserts."""
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")
    tf.debugging.disable_check_numerics()
    train._tf_framework_config.disable_op_determinism()  # pylint: disable=protected-access


def test_the_private_tensorflow_switches_train_reads_still_work():
    """train.py asks TensorFlow's private modules whether determinism and the NaN check are on
    (no public query exists): a TensorFlow release that moves them fails here, by name."""
    assert not train.op_determinism_enabled() and not train.check_numerics_enabled()
    tf.config.experimental.enable_op_determinism()
    tf.debugging.enable_check_numerics()
    assert train.op_determinism_enabled(), "tensorflow.python.framework.config.is_op_determinism_enabled"
    assert train.check_numerics_enabled(), "tensorflow.python.debug.lib.check_numerics_callback._state"
    train._tf_framework_config.disable_op_determinism()  # pylint: disable=protected-access
    tf.debugging.disable_check_numerics()
    assert not train.op_determinism_enabled(), "tensorflow.python.framework.config.disable_op_determinism"
    assert not train.check_numerics_enabled()


def test_two_runs_in_one_process_each_get_their_own_dtype_policy(data_dir, tmp_path):
    before = process_state()
    model, _ = train.train_model(TrainConfig(**TINY, data_dir=data_dir, model_dir=str(tmp_path / "bf16"),
                                             mixed_precision="mixed_bfloat16"))
    assert {layer.compute_dtype for layer in model.embedder.layers} >= {"bfloat16"}  # the policy applied
    assert process_state() == before

    model, _ = train.train_model(TrainConfig(**TINY, data_dir=data_dir, model_dir=str(tmp_path / "none")))
    assert {layer.compute_dtype for layer in model.embedder.layers} == {"float32"}
    assert {weight.dtype for weight in model.weights} == {"float32"}
    assert process_state() == before


class StopAtTrainer:
    """Stands in for the Trainer: records the process state the run set up, then raises."""

    seen = None

    def __init__(self, *args, **kwargs):
        del args, kwargs
        StopAtTrainer.seen = process_state()
        raise RuntimeError("stopped where the model would be built")


@pytest.mark.parametrize("caller_policy", ["float32", "mixed_float16"])
def test_a_run_that_raises_sets_everything_back(data_dir, tmp_path, monkeypatch, caller_policy):
    monkeypatch.setattr(train, "Trainer", StopAtTrainer)
    keras.mixed_precision.set_global_policy(caller_policy)
    before = process_state()
    for mixed_precision, expected in (("mixed_bfloat16", "mixed_bfloat16"), ("none", "float32")):
        with pytest.raises(RuntimeError, match="stopped where"):
            train.train(TrainConfig(**TINY, data_dir=data_dir, model_dir=str(tmp_path / mixed_precision),
                                    mixed_precision=mixed_precision, deterministic=True, debug_numerics=True))
        assert StopAtTrainer.seen == {"policy": expected, "determinism": True, "numerics": True}
        assert process_state() == before


def test_what_the_caller_turned_on_stays_on(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "Trainer", StopAtTrainer)
    tf.config.experimental.enable_op_determinism()
    tf.debugging.enable_check_numerics()
    for flag in (True, False):
        with pytest.raises(RuntimeError, match="stopped where"):
            train.train(TrainConfig(**TINY, data_dir=data_dir, model_dir=str(tmp_path / str(flag)),
                                    deterministic=flag, debug_numerics=flag))
        assert StopAtTrainer.seen == {"policy": "float32", "determinism": True, "numerics": True}
        assert process_state() == {"policy": "float32", "determinism": True, "numerics": True}
