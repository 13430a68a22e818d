"""TorchAdam follows torch.optim.Adam's update, not Keras' epsilon-hat form."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from pnpp_tf.modeling.optimizers import TorchAdam


def torch_adam_reference(w, gradients, lr, eps, beta_1=0.9, beta_2=0.999):
    """torch.optim.Adam's documented update, step by step, in float64."""
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, g in enumerate(gradients, start=1):
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g * g
        m_hat = m / (1 - beta_1 ** t)
        v_hat = v / (1 - beta_2 ** t)
        w = w - lr * m_hat / (np.sqrt(v_hat) + eps)
    return w


@pytest.mark.parametrize("eps", [1.0, 1e-8])
def test_matches_torch_update(eps):
    rng = np.random.default_rng(0)
    # Two variables of different shapes: each must be updated with its own moment estimates.
    starts = [rng.normal(size=(3, 4)), rng.normal(size=(5,))]
    gradients = [[rng.normal(scale=scale, size=w.shape) for _ in range(5)] for w, scale in zip(starts, (0.05, 2.0))]
    variables = [tf.Variable(w, dtype=tf.float32) for w in starts]
    optimizer = TorchAdam(0.1, epsilon=eps)
    for step in zip(*gradients):
        optimizer.apply_gradients([(tf.constant(g, tf.float32), v) for g, v in zip(step, variables)])
    for variable, w0, history in zip(variables, starts, gradients):
        np.testing.assert_allclose(variable.numpy(), torch_adam_reference(w0, history, 0.1, eps), rtol=1e-4, atol=1e-5)


def test_float64_variables_follow_the_update_to_float64_rounding():
    """No float32 constant inside the update: tools/parity_with_reference.py --dtype=float64
    relies on it (beta_2 rounded to float32 once put 5e-6 into the weights after one step)."""
    rng = np.random.default_rng(1)
    start = rng.normal(size=(4, 3))
    gradients = [rng.normal(size=start.shape) for _ in range(3)]
    variable = tf.Variable(start, dtype=tf.float64)
    optimizer = TorchAdam(0.125, epsilon=1e-8)  # a learning rate float32 holds exactly
    for gradient in gradients:
        optimizer.apply_gradients([(tf.constant(gradient, tf.float64), variable)])
    np.testing.assert_allclose(variable.numpy(), torch_adam_reference(start, gradients, 0.125, 1e-8), rtol=1e-12)


def test_differs_from_keras_adam_with_large_epsilon():
    # With eps = 1 Keras' epsilon-hat form takes a ~30x smaller first step: the reason TorchAdam exists.
    g = tf.constant([0.01])
    ours, keras_adam = tf.Variable([0.0]), tf.Variable([0.0])
    TorchAdam(1.0).apply_gradients([(g, ours)])
    tf.keras.optimizers.Adam(1.0, epsilon=1.0).apply_gradients([(g, keras_adam)])
    assert abs(ours.numpy()[0]) > 20 * abs(keras_adam.numpy()[0])
    np.testing.assert_allclose(ours.numpy(), [-0.01 / 1.01], rtol=1e-5)


def test_clipvalue_clips_gradients():
    variable = tf.Variable([0.0, 0.0])
    TorchAdam(1.0, epsilon=1.0, clipvalue=10.0).apply_gradients([(tf.constant([100.0, -3.0]), variable)])
    np.testing.assert_allclose(variable.numpy(), [-10.0 / 11.0, 3.0 / 4.0], rtol=1e-5)


def test_amsgrad_is_rejected():
    with pytest.raises(ValueError, match="amsgrad"):
        TorchAdam(amsgrad=True)


def test_keras_still_offers_the_hook_torch_adam_finds_its_slots_with():
    assert hasattr(keras.optimizers.Optimizer, "_get_variable_index"), (
        f"Keras {keras.__version__} dropped Optimizer._get_variable_index, which TorchAdam.update_step "
        "uses (as Keras' Optimizer docstring shows) to find a variable's slots: update pnpp_tf/modeling/optimizers.py "
        "and the keras pin in setup.py")


def test_config_round_trip_and_keras_adam_configs_load():
    optimizer = TorchAdam(0.5, beta_1=0.8, beta_2=0.99, epsilon=0.1, clipvalue=2.0)
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(clone, TorchAdam)
    assert (clone.beta_1, clone.beta_2, clone.epsilon, clone.clipvalue) == (0.8, 0.99, 0.1, 2.0)
    # Configs saved when TorchAdam subclassed keras' Adam carry amsgrad=False.
    assert TorchAdam.from_config(keras.optimizers.Adam(0.5, epsilon=1.0).get_config()).epsilon == 1.0


def test_restores_a_checkpoint_of_the_adam_based_torch_adam(tmp_path):
    # keras' Adam stands for the earlier TorchAdam(keras.optimizers.Adam): same slots, same order.
    rng = np.random.default_rng(0)
    starts = [rng.normal(size=(3, 4)), rng.normal(size=(5,))]
    old_variables = [tf.Variable(w, dtype=tf.float32) for w in starts]
    old = keras.optimizers.Adam(0.1, epsilon=1.0)
    old.apply_gradients([(tf.constant(rng.normal(size=w.shape), tf.float32), v) for w, v in zip(starts, old_variables)])
    prefix = tf.train.Checkpoint(optimizer=old).save(str(tmp_path / "ckpt"))

    new = TorchAdam(0.1)
    new.build([tf.Variable(w, dtype=tf.float32) for w in starts])
    tf.train.Checkpoint(optimizer=new).restore(prefix).assert_existing_objects_matched()
    assert int(new.iterations.numpy()) == 1
    for before, after in zip(old.variables, new.variables):
        np.testing.assert_array_equal(before.numpy(), after.numpy())
