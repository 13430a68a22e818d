"""The embedder and the ProxyNCA++ training model.

    images [0, 255] -> normalisation -> backbone trunk -> global max pool -> LayerNorm -> Dense
        = raw embedding (the embedder);  ProxyNCAModel(images) = L2-normalised embedding.

A transformer trunk's tokens are pooled by `TokenPooling`: max or average over the patch tokens
(never its CLS or register tokens), or its CLS token.

`ProxyNCAModel.train_step` applies two optimisers: the main one to backbone and head, and a
separate fast one to the proxies held by the loss layer.
"""

import copy
import math

import keras
import tensorflow as tf
from keras import layers

from pnpp_tf.errors import UserError
# Also registers TorchBatchNormalization (the registry imports the torchvision trunk), which the
# embedder.keras files of resnet50_torchvision hold.
from pnpp_tf.modeling import backbones, trunks
from pnpp_tf.modeling.losses import ProxyNCALoss, l2_normalize

POOLINGS = ("max", "avg", "cls")
BACKBONE_LAYER_NAME = "backbone"


def build_embedder(
    backbone="resnet50",
    image_size=256,
    embedding_dim=2048,
    pooling="max",
    layer_norm=True,
    weights="none",
    backbone_preset=None,
):
    """Builds the embedder: a functional `keras.Model` from RGB images to raw embeddings.

    Args:
        backbone: registered backbone name, see `pnpp_tf.modeling.backbones.available_backbones()`.
        image_size: side of the square input images, in pixels.
        embedding_dim: size of the embedding.
        pooling: "max" (global max pooling, ProxyNCA++) or "avg" (the ablation); of a
            transformer's patch tokens, or "cls": its CLS token.
        layer_norm: LayerNorm without affine parameters on the pooled features (ProxyNCA++).
        weights: "none", a pretrained weights name (e.g. "imagenet", which is a preset's own
            weights with backbone "keras_hub") or a weights file path.
        backbone_preset: the KerasHub preset handle or directory of backbone "keras_hub".

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
    trunk = _build_trunk(spec, input_shape, backbones.resolve_weights(spec, weights), backbone_preset)

    images = keras.Input(input_shape, name="images")
    x = trunk.normalization(images)
    x = trunk.model(x)
    x = _pooling(pooling, trunk.tokens, backbone, backbone_preset)(x)
    if layer_norm:
        x = layers.LayerNormalization(epsilon=1e-5, center=False, scale=False, name="layer_norm")(x)
    # RECIPE: PyTorch's default nn.Linear init, weights and bias ~ U(±1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(x.shape[-1])
    init = keras.initializers.RandomUniform(-bound, bound)
    embeddings = layers.Dense(
        int(embedding_dim),
        kernel_initializer=init,
        bias_initializer=init,
        dtype=_float32_if_mixed(),
        name="embedding",
    )(x)
    return keras.Model(images, embeddings, name="embedder")


def _build_trunk(spec, input_shape, weights, preset):
    """`spec.build`, with a weights file that does not load named in a one-line ValueError."""
    if weights is None or weights in spec.pretrained_weights or weights == trunks.PRESET_WEIGHTS:
        return spec.build(input_shape, weights, preset)
    try:
        return spec.build(input_shape, weights, preset)
    except (OSError, ValueError) as error:  # h5py's OSError for a non-HDF5 file, Keras' ValueError for a mismatch
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"--weights={weights}: cannot load this file into backbone {spec.name!r} ({reason}); "
                         "pass a weights file saved from this backbone, or --weights=none.") from error


def cls_of_a_feature_map(where):
    """The `UserError` of --pooling=cls on a backbone that gives a feature map (`where` names it)."""
    return UserError(f"--pooling=cls needs a transformer with a CLS token (--backbone=keras_hub with a DINOv2, "
                     f"DINOv3 or ViT preset); {where} gives a feature map: use --pooling=max or avg.")


def _pooling(pooling, tokens, backbone, preset):
    """The pooling layer of a feature map (`tokens` None) or of tokens laid out as `tokens` says."""
    if tokens is not None:
        if pooling == "cls" and not tokens.has_cls:
            raise UserError(f"--pooling=cls: --backbone_preset={preset} has no CLS token; use --pooling=max or avg.")
        return TokenPooling(pooling, tokens.prefix_tokens, name=f"token_{pooling}_pool")
    if pooling == "cls":
        raise cls_of_a_feature_map(f"--backbone_preset={preset}" if preset else f"--backbone={backbone}")
    pool = layers.GlobalMaxPooling2D if pooling == "max" else layers.GlobalAveragePooling2D
    return pool(name=f"global_{pooling}_pool")


@keras.saving.register_keras_serializable(package="pnpp_tf")
class TokenPooling(layers.Layer):
    """Pools a transformer's tokens [batch, tokens, channels] to [batch, channels].

    Args:
        mode: "max" or "avg" over the patch tokens (ProxyNCA++'s global max pooling, carried over
            to a ViT's patch grid), or "cls": token 0.
        prefix_tokens: tokens before the patch tokens (CLS and register tokens): max and avg
            never see them. Register tokens hold global scratch values, not image regions.
    """

    MODES = ("max", "avg", "cls")

    def __init__(self, mode, prefix_tokens, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}.")
        if mode == "cls" and prefix_tokens < 1:
            raise ValueError("mode 'cls' needs a CLS token, i.e. prefix_tokens >= 1.")
        self.mode = mode
        self.prefix_tokens = int(prefix_tokens)

    def call(self, tokens):
        if self.mode == "cls":
            return tokens[:, 0, :]
        patches = tokens[:, self.prefix_tokens:, :]
        return keras.ops.max(patches, axis=1) if self.mode == "max" else keras.ops.mean(patches, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "prefix_tokens": self.prefix_tokens}


@keras.saving.register_keras_serializable(package="pnpp_tf")
class ProxyNCAModel(keras.Model):
    """An embedder trained with the ProxyNCA++ loss and its own proxy optimiser.

    Calling the model returns L2-normalised embeddings. Compile it with `optimizer` (backbone and
    embedding head), `proxy_optimizer` (the proxies) and `clip_value` (10 in the recipe).
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
        self.clip_value = None

    def call(self, images, training=False):
        return l2_normalize(tf.cast(self.embedder(images, training=training), tf.float32))

    def compile(self, optimizer, proxy_optimizer, freeze_backbone=False, clip_value=None, **kwargs):
        """Configures training.

        Args:
            optimizer: optimiser of the backbone and embedding head.
            proxy_optimizer: optimiser of the proxies (the recipe's much higher learning rate).
            freeze_backbone: leave the backbone's weights untouched (warm-up).
            clip_value: clip the backbone and embedding gradients to [-clip_value, clip_value]
                (not the proxies'). Applied to the global-batch gradient, so that a multi-replica
                step equals the single-device one (an optimiser's own `clipvalue` clips each
                replica's share before they are summed).
            **kwargs: passed to `keras.Model.compile` (e.g. `jit_compile`, `steps_per_execution`).
        """
        if clip_value is not None and not clip_value > 0:
            raise ValueError(f"clip_value must be positive or None, got {clip_value}.")
        super().compile(optimizer=optimizer, **kwargs)
        self.proxy_optimizer = proxy_optimizer
        self.freeze_backbone = bool(freeze_backbone)
        self.clip_value = clip_value
        # Built here, on exactly the variables each one updates, so Keras does not give the main
        # optimiser slots for every trainable variable (the proxies included) on its own.
        self.optimizer.build(self.main_variables)
        self.proxy_optimizer.build([self.loss_layer.proxies])
        self.built = True  # every layer and both optimisers exist now

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Private Keras hook (TF backend), overridden for lack of a public switch: with a strategy
        # set, fit() pulls one batch and all-reduces it across replicas just to build the model,
        # even an already built one. The reduction fails under MultiWorkerMirroredStrategy
        # (TF 2.21), and compile() has built everything. setup.py pins the Keras versions on
        # which tests/test_model.py proves the hook is still called and the peek still skipped.
        if not self.built:
            super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

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
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        loss_scale_optimizer = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        with tf.GradientTape() as tape:
            embeddings = self.embedder(images, training=True)
            loss = self.loss_layer(embeddings, labels)
            # Replica gradients are summed: each contributes its share of the global-batch mean.
            scaled_loss = loss / replicas
            if loss_scale_optimizer:
                scaled_loss = self.optimizer.scale_loss(scaled_loss)
        gradients = tape.gradient(scaled_loss, main_variables + [proxies])
        main_gradients, proxy_gradient = gradients[:-1], gradients[-1]
        # Variables the loss does not reach have no gradient (a KerasHub DINOv2's mask token, used
        # only in masked-image pretraining): they are left out, as Keras' own fit does.
        if any(g is None for g in main_gradients):
            main_gradients, main_variables = zip(*[(g, v) for g, v in zip(main_gradients, main_variables)
                                                   if g is not None])
        # The scale of this step, read before the main optimiser updates it.
        scale = self.optimizer.scale_loss(1.0) if loss_scale_optimizer else 1.0
        if self.clip_value:
            main_gradients = _clip_global_gradients(main_gradients, self.clip_value * scale, replicas,
                                                    keep_non_finite=loss_scale_optimizer)
        if loss_scale_optimizer:
            # The proxies' gradient is computed in float32 end to end (proxies, logits and the
            # embedding layer are float32), so it cannot overflow: it only needs unscaling.
            proxy_gradient = proxy_gradient / tf.cast(scale, proxy_gradient.dtype)
        self.optimizer.apply_gradients(zip(main_gradients, main_variables))
        self.proxy_optimizer.apply_gradients([(proxy_gradient, proxies)])
        self.loss_tracker.update_state(loss)
        result = self.loss_tracker.result()
        if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
            # Keras averages multi-worker logs over axis 0, which a scalar does not have.
            result = tf.reshape(result, [1])
        return {"loss": result}

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
        # Deserialising consumes the nested config; a copy leaves the caller's reusable.
        embedder = keras.saving.deserialize_keras_object(copy.deepcopy(config["embedder"]))
        return cls(**{**config, "embedder": embedder})


def _clip_global_gradients(gradients, clip_value, replicas, keep_non_finite=False):
    """Clips by value the gradient of the global batch; returns each replica's share of it.

    With one replica this is plain clipping. With several, the replicas' gradients are summed
    first (the optimiser's own sum of the returned shares then restores the clipped total).
    With `keep_non_finite`, Inf and NaN pass unclipped: a float16 overflow must still reach the
    LossScaleOptimizer's finite check, which skips the step and lowers the scale.
    """
    if replicas > 1:
        gradients = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, gradients)

    def clip(g):
        clipped = tf.clip_by_value(g, -tf.cast(clip_value, g.dtype), tf.cast(clip_value, g.dtype))
        return tf.where(tf.math.is_finite(g), clipped, g) if keep_non_finite else clipped

    clipped = [clip(g) for g in gradients]
    return [g / replicas for g in clipped] if replicas > 1 else clipped


def synchronize_batch_norm(embedder):
    """Makes every BatchNorm of the embedder average its batch statistics over all replicas.

    Under a multi-replica strategy each replica sees a slice of the class-balanced batch; with
    synchronised statistics BatchNorm normalises over the whole batch, as on one device.
    """
    norms = trunks.batch_norm_layers(embedder.get_layer(BACKBONE_LAYER_NAME))  # KerasHub's are nested
    for layer in norms:
        layer.synchronized = True
    return len(norms)


def resolve_jit_compile(jit_compile, num_replicas=1):
    """Maps the `--jit_compile` value to what `keras.Model.compile` takes; "auto" stays "auto".

    Keras' own "auto" is XLA only with a GPU and no tf.distribute strategy: off on CPU (where XLA
    made the ResNet-50 train step 1.7x slower, tools/bench_train.py) and under every strategy.
    `model.jit_compile` holds the resolved bool after `compile`.

    Args:
        jit_compile: True, False, or "auto" / "true" / "false".
        num_replicas: replicas of the distribution strategy.

    Returns:
        True, False or "auto".

    Raises:
        UserError: an unknown value, or XLA asked for with several CPU replicas.
    """
    if isinstance(jit_compile, bool):
        value = jit_compile
    elif str(jit_compile).lower() in ("auto", "true", "false"):
        value = {"auto": "auto", "true": True, "false": False}[str(jit_compile).lower()]
    else:
        raise UserError(f"--jit_compile must be auto, true or false, got {jit_compile!r}.")
    if value is True and num_replicas > 1 and not tf.config.list_physical_devices("GPU"):
        raise UserError("--jit_compile=true with a multi-replica strategy on CPU is not supported by "
                        "TensorFlow; use --jit_compile=false or auto.")
    return value


def _float32_if_mixed():
    """The embedding layer computes in float32 under mixed precision: it feeds the loss."""
    policy = keras.config.dtype_policy()
    return "float32" if policy.compute_dtype != policy.variable_dtype else None
