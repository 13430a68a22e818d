"""TorchAdam follows torch.optim.Adam's update, not Keras' epsilon-hat form."""

import numpy as np
import pytest
import tensorflow as tf

from pnpp_tf.optimizers import TorchAdam


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
    w0 = rng.normal(size=(3, 4))
    gradients = [rng.normal(scale=0.05, size=(3, 4)) for _ in range(5)]
    variable = tf.Variable(w0, dtype=tf.float32)
    optimizer = TorchAdam(0.1, epsilon=eps)
    for g in gradients:
        optimizer.apply_gradients([(tf.constant(g, tf.float32), variable)])
    np.testing.assert_allclose(variable.numpy(), torch_adam_reference(w0, gradients, 0.1, eps), rtol=1e-4, atol=1e-5)


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
