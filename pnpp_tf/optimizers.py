"""Adam with PyTorch's epsilon semantics: the one optimiser behaviour Keras lacks.

Keras' Adam adds epsilon to sqrt(v) before bias correction ("epsilon hat"); PyTorch adds it after:
    PyTorch: w -= lr · m̂ / (sqrt(v̂) + eps),   m̂ = m / (1 - β₁ᵗ),  v̂ = v / (1 - β₂ᵗ)
The ProxyNCA++ recipe uses eps = 1, where the two differ by up to ~30x in the first steps, so a
faithful port needs PyTorch's form. It equals Keras' update with eps·sqrt(1 - β₂ᵗ) in place of eps.
"""

import keras
from keras import ops

# RECIPE: Adam(eps=1.0, betas=(0.9, 0.999), weight_decay=0) for every parameter group.
RECIPE_EPSILON = 1.0


@keras.saving.register_keras_serializable(package="pnpp_tf")
class TorchAdam(keras.optimizers.Adam):
    """`keras.optimizers.Adam` whose epsilon is applied as `torch.optim.Adam` applies it.

    Takes the same arguments as `keras.optimizers.Adam` (including `clipvalue`), with the
    recipe's epsilon of 1.0 as default. AMSGrad is not supported.
    """

    def __init__(self, learning_rate=0.001, epsilon=RECIPE_EPSILON, name="torch_adam", **kwargs):
        if kwargs.get("amsgrad"):
            raise ValueError("TorchAdam does not implement amsgrad=True.")
        super().__init__(learning_rate=learning_rate, epsilon=epsilon, name=name, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        step = ops.cast(self.iterations + 1, dtype)
        bias_correction_1 = 1 - ops.power(ops.cast(self.beta_1, dtype), step)
        bias_correction_2 = 1 - ops.power(ops.cast(self.beta_2, dtype), step)

        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        self.assign_add(m, (gradient - m) * (1 - self.beta_1))
        self.assign_add(v, (ops.square(gradient) - v) * (1 - self.beta_2))

        m_hat = m / bias_correction_1
        v_hat = v / bias_correction_2
        self.assign_sub(variable, lr * m_hat / (ops.sqrt(v_hat) + self.epsilon))
