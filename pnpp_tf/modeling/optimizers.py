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
class TorchAdam(keras.optimizers.Optimizer):
    """Adam whose epsilon is applied as `torch.optim.Adam` applies it.

    Written as Keras documents custom optimisers (`keras.optimizers.Optimizer`: own `build`,
    `update_step`, `get_config`), so it does not depend on `keras.optimizers.Adam`'s internals.

    Args:
        learning_rate: float, schedule or callable, as for any Keras optimiser.
        beta_1: decay of the first-moment estimate.
        beta_2: decay of the second-moment estimate.
        epsilon: added to sqrt(v̂) after bias correction; the recipe's 1.0 by default.
        amsgrad: accepted so that configs of `keras.optimizers.Adam` load; True is rejected.
        name: the optimiser's name.
        **kwargs: the base optimiser's arguments (`clipvalue`, `global_clipnorm`, ...).
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=RECIPE_EPSILON, amsgrad=False,
                 name="torch_adam", **kwargs):
        if amsgrad:
            raise ValueError("TorchAdam does not implement amsgrad=True.")
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon

    def build(self, var_list):
        """Creates one first- and one second-moment slot per variable.

        Args:
            var_list: the variables this optimiser will update.
        """
        if self.built:
            return
        super().build(var_list)
        # In keras.optimizers.Adam's order (TorchAdam subclassed it before): checkpoints key the
        # slots by creation index, so runs checkpointed by that version still resume.
        self.momentums, self.velocities = self.add_optimizer_variables(var_list, ["momentum", "velocity"])

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        step = ops.cast(self.iterations + 1, dtype)
        # convert_to_tensor, not cast: cast makes a Python float float32 first, which in float64
        # would put 1e-5 of float32 rounding into 1 - beta_2.
        bias_correction_1 = 1 - ops.power(ops.convert_to_tensor(self.beta_1, dtype), step)
        bias_correction_2 = 1 - ops.power(ops.convert_to_tensor(self.beta_2, dtype), step)

        # `_get_variable_index` is how Keras' Optimizer docstring tells custom optimisers to find
        # a variable's slots (it resolves tf.distribute's per-replica copies); tests guard it.
        index = self._get_variable_index(variable)
        m, v = self.momentums[index], self.velocities[index]
        self.assign_add(m, (gradient - m) * (1 - self.beta_1))
        self.assign_add(v, (ops.square(gradient) - v) * (1 - self.beta_2))

        m_hat = m / bias_correction_1
        v_hat = v / bias_correction_2
        self.assign_sub(variable, lr * m_hat / (ops.sqrt(v_hat) + self.epsilon))

    def get_config(self):
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon}
