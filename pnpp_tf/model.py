"""The embedder and the ProxyNCA++ training model.

    images [0, 255] -> normalisation -> backbone trunk -> global max pool -> LayerNorm -> Dense
        = raw embedding (the embedder);  ProxyNCAModel(images) = L2-normalised embedding.

`ProxyNCAModel.train_step` applies two optimisers: the main one to backbone and head, and a
separate fast one to the proxies held by the loss layer.
"""

import math

import keras
import tensorflow as tf
from keras import layers

from pnpp_tf import backbones
from pnpp_tf.losses import ProxyNCALoss, l2_normalize

POOLINGS = ("max", "avg")
BACKBONE_LAYER_NAME = "backbone"


def build_embedder(
    backbone="resnet50",
    image_size=256,
    embedding_dim=2048,
    pooling="max",
    layer_norm=True,
    weights="none",
):
    """Builds the embedder: a functional `keras.Model` from RGB images to raw embeddings.

    Args:
        backbone: registered backbone name, see `pnpp_tf.backbones.available_backbones()`.
        image_size: side of the square input images, in pixels.
        embedding_dim: size of the embedding.
        pooling: "max" (global max pooling, ProxyNCA++) or "avg" (the ablation).
        layer_norm: LayerNorm without affine parameters on the pooled features (ProxyNCA++).
        weights: "none", a pretrained weights name (e.g. "imagenet") or a weights file path.

    Returns:
        A `keras.Model` named "embedder" taking float32 [N, image_size, image_size, 3] RGB images
        with values in [0, 255] and returning [N, embedding_dim] un-normalised embeddings. Its
        backbone trunk is the layer named "backbone".
    """
    spec = backbones.get_backbone(backbone)
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
    if int(image_size) < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}.")
    if int(embedding_dim) < 1:
        raise ValueError(f"embedding_dim must be positive, got {embedding_dim}.")
    input_shape = (int(image_size), int(image_size), 3)
    trunk = spec.build_trunk(input_shape, backbones.resolve_weights(spec, weights))

    images = keras.Input(input_shape, name="images")
    x = backbones.ImageNormalization(spec.normalization, name="normalization")(images)
    x = trunk(x)
    pool = layers.GlobalMaxPooling2D if pooling == "max" else layers.GlobalAveragePooling2D
    x = pool(name=f"global_{pooling}_pool")(x)
    if layer_norm:
        x = layers.LayerNormalization(epsilon=1e-5, center=False, scale=False, name="layer_norm")(x)
    # RECIPE: PyTorch's default nn.Linear init, weights and bias ~ U(±1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(spec.feature_dim)
    init = keras.initializers.RandomUniform(-bound, bound)
    embeddings = layers.Dense(
        int(embedding_dim),
        kernel_initializer=init,
        bias_initializer=init,
        dtype=_float32_if_mixed(),
        name="embedding",
    )(x)
    return keras.Model(images, embeddings, name="embedder")


@keras.saving.register_keras_serializable(package="pnpp_tf")
class ProxyNCAModel(keras.Model):
    """An embedder trained with the ProxyNCA++ loss and its own proxy optimiser.

    Calling the model returns L2-normalised embeddings. Compile it with `optimizer` (backbone and
    embedding head; give it `clipvalue=10` as the recipe does) and `proxy_optimizer` (the proxies).
    With `freeze_backbone=True` (the warm-up) the backbone's weights are not updated, while its
    BatchNorm layers still run in training mode and update their moving statistics.

    Args:
        embedder: the model from `build_embedder`.
        num_classes: number of training classes (proxies).
        temperature: softmax temperature of the loss.
        loss_variant: "proxynca_pp" or "proxynca".
    """

    def __init__(self, embedder, num_classes, temperature=1.0 / 9.0, loss_variant="proxynca_pp", **kwargs):
        super().__init__(**kwargs)
        self.embedder = embedder
        self.loss_layer = ProxyNCALoss(
            num_classes, embedder.output.shape[-1], temperature, loss_variant, name="proxy_nca_loss"
        )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.proxy_optimizer = None
        self.freeze_backbone = False

    def call(self, images, training=False):
        return l2_normalize(tf.cast(self.embedder(images, training=training), tf.float32))

    def compile(self, optimizer, proxy_optimizer, freeze_backbone=False, **kwargs):
        """Configures training.

        Args:
            optimizer: optimiser of the backbone and embedding head.
            proxy_optimizer: optimiser of the proxies (the recipe's much higher learning rate).
            freeze_backbone: leave the backbone's weights untouched (warm-up).
            **kwargs: passed to `keras.Model.compile` (e.g. `jit_compile`, `steps_per_execution`).
        """
        super().compile(optimizer=optimizer, **kwargs)
        self.proxy_optimizer = proxy_optimizer
        self.freeze_backbone = bool(freeze_backbone)
        # Built here, on exactly the variables each one updates, so Keras does not give the main
        # optimiser slots for every trainable variable (the proxies included) on its own.
        self.optimizer.build(self.main_variables)
        self.proxy_optimizer.build([self.loss_layer.proxies])

    @property
    def main_variables(self):
        """The variables the main optimiser updates: head only while the backbone is frozen."""
        backbone = self.embedder.get_layer(BACKBONE_LAYER_NAME)
        if not self.freeze_backbone:
            return list(self.embedder.trainable_variables)
        frozen = {id(v) for v in backbone.trainable_variables}
        return [v for v in self.embedder.trainable_variables if id(v) not in frozen]

    @property
    def metrics(self):
        return [self.loss_tracker]

    def train_step(self, data):
        images, labels, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if sample_weight is not None:
            raise ValueError("ProxyNCAModel does not support sample weights.")
        main_variables = self.main_variables
        proxies = self.loss_layer.proxies
        with tf.GradientTape() as tape:
            embeddings = self.embedder(images, training=True)
            loss = self.loss_layer(embeddings, labels)
        gradients = tape.gradient(loss, main_variables + [proxies])
        self.optimizer.apply_gradients(zip(gradients[:-1], main_variables))
        self.proxy_optimizer.apply_gradients([(gradients[-1], proxies)])
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def get_config(self):
        return {
            **super().get_config(),
            "embedder": keras.saving.serialize_keras_object(self.embedder),
            "num_classes": self.loss_layer.num_classes,
            "temperature": self.loss_layer.temperature,
            "loss_variant": self.loss_layer.variant,
        }

    @classmethod
    def from_config(cls, config):
        config["embedder"] = keras.saving.deserialize_keras_object(config["embedder"])
        return cls(**config)


def resolve_jit_compile(jit_compile):
    """Maps the `--jit_compile` value to a bool: "auto" means XLA on a GPU only.

    XLA makes a train step 2-5x slower on CPU, so "auto" turns it off there.
    """
    if isinstance(jit_compile, bool):
        return jit_compile
    value = str(jit_compile).lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    if value == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    raise ValueError(f"jit_compile must be auto, true or false, got {jit_compile!r}.")


def _float32_if_mixed():
    """The embedding layer computes in float32 under mixed precision: it feeds the loss."""
    policy = keras.config.dtype_policy()
    return "float32" if policy.compute_dtype != policy.variable_dtype else None
