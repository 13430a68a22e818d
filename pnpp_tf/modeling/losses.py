"""ProxyNCA and ProxyNCA++ losses.

The loss layer owns the proxies (one per training class) as a trainable weight, so that the model
can hand them to their own fast optimiser. The maths lives in pure functions below the layer.
"""

import keras
import numpy as np
import tensorflow as tf

VARIANTS = ("proxynca_pp", "proxynca")

# RECIPE: proxies ~ N(0, 1) / 8. Only their direction matters: they are normalised every step.
PROXY_INIT_STDDEV = 1.0 / 8.0

# RECIPE: x / max(||x||, 1e-12). Squared, so the clamp is applied before the square root and the
# gradient stays finite for an all-zero vector.
_MIN_SQUARED_NORM = 1e-24


@keras.saving.register_keras_serializable(package="pnpp_tf")
class ProxyNCALoss(keras.layers.Layer):
    """ProxyNCA++ (or original ProxyNCA) loss, holding one proxy per training class.

    Calling the layer on `(embeddings, labels)` returns the scalar mean loss in float32, whatever
    the dtype policy: the proxies, the logits and the softmax always run in float32. The one
    exception is a float64 policy (tools/parity_with_reference.py --dtype=float64), under which
    they run in float64, so that the whole step is free of float32's rounding.

    Args:
        num_classes: number of training classes, i.e. of proxies.
        embedding_dim: size of the embeddings (and of each proxy).
        temperature: softmax temperature T; logits are -||x̂ - p̂||² / T. The paper uses 1/9.
        variant: "proxynca_pp" (softmax over all proxies, positive included) or "proxynca"
            (the original ProxyNCA: positive proxy excluded from the denominator; the loss can
            then be negative).
    """

    def __init__(
        self, num_classes, embedding_dim, temperature=1.0 / 9.0, variant="proxynca_pp", **kwargs
    ):
        kwargs["dtype"] = _loss_dtype()
        super().__init__(**kwargs)
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
        if int(embedding_dim) < 1:
            raise ValueError(f"embedding_dim must be positive, got {embedding_dim}.")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
        self.num_classes = int(num_classes)
        self.embedding_dim = int(embedding_dim)
        self.temperature = float(temperature)
        self.variant = variant
        self.proxies = self.add_weight(
            name="proxies",
            shape=(self.num_classes, self.embedding_dim),
            initializer=keras.initializers.RandomNormal(stddev=PROXY_INIT_STDDEV),
            dtype=kwargs["dtype"],
            trainable=True,
        )
        self.built = True

    def call(self, embeddings, labels):
        labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
        if tf.executing_eagerly():
            _check_labels(labels.numpy(), self.num_classes)
        logits = proxy_logits(embeddings, self.proxies, self.temperature)
        return proxy_nca_loss(logits, labels, self.variant)

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        config.update(
            num_classes=self.num_classes,
            embedding_dim=self.embedding_dim,
            temperature=self.temperature,
            variant=self.variant,
        )
        return config


def proxy_logits(embeddings, proxies, temperature):
    """Logits -||x̂_i - p̂_c||² / T for every embedding i and proxy c, in float32 (or float64).

    Args:
        embeddings: [batch, dim] tensor, any float dtype.
        proxies: [num_classes, dim] tensor.
        temperature: positive float.

    Returns:
        [batch, num_classes] logits: float32, float64 for float64 proxies.
    """
    dtype = tf.float64 if proxies.dtype == tf.float64 else tf.float32
    x = l2_normalize(tf.cast(embeddings, dtype))
    p = l2_normalize(tf.cast(proxies, dtype))
    squared_distances = (
        tf.reduce_sum(tf.square(x), axis=1, keepdims=True)
        + tf.reduce_sum(tf.square(p), axis=1)[tf.newaxis, :]
        - 2.0 * tf.matmul(x, p, transpose_b=True)
    )
    # Rounding can push the distance of (near-)identical unit vectors slightly below zero.
    return -tf.maximum(squared_distances, 0.0) / temperature


def proxy_nca_loss(logits, labels, variant="proxynca_pp"):
    """Mean ProxyNCA / ProxyNCA++ loss from proxy logits.

    Args:
        logits: [batch, num_classes] float32, from `proxy_logits`.
        labels: [batch] integer class ids in [0, num_classes).
        variant: "proxynca_pp" or "proxynca", see `ProxyNCALoss`.

    Returns:
        Scalar float32 mean loss over the batch.
    """
    if variant == "proxynca_pp":
        per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    elif variant == "proxynca":
        positive = tf.one_hot(labels, tf.shape(logits)[1], on_value=True, off_value=False)
        positive_logit = tf.reduce_sum(tf.where(positive, logits, 0.0), axis=1)
        negatives_only = tf.where(positive, tf.constant(-np.inf, logits.dtype), logits)
        per_example = tf.reduce_logsumexp(negatives_only, axis=1) - positive_logit
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    return tf.reduce_mean(per_example)


def l2_normalize(x, axis=-1):
    """x / max(||x||₂, 1e-12) along `axis`, in the graph, with a finite gradient at zero.

    The same function as `pnpp_tf.retrieval.neighbours.unit_rows`, for another job: this one is part of
    the model (the loss, `ProxyNCAModel` and every export run it on the device, and training
    differentiates it), while `unit_rows` prepares numpy embeddings for the k-NN engine so that
    both of its backends search bit-identical unit rows.

    Args:
        x: float tensor.
        axis: the axis whose vectors are normalised.

    Returns:
        A tensor of the shape and dtype of `x`.
    """
    squared_norm = tf.reduce_sum(tf.square(x), axis=axis, keepdims=True)
    return x * tf.math.rsqrt(tf.maximum(squared_norm, _MIN_SQUARED_NORM))


def _loss_dtype():
    """float32, the recipe's, under every policy but float64 (whose loss is float64 too)."""
    return "float64" if keras.config.dtype_policy().name == "float64" else "float32"


def _check_labels(labels, num_classes):
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(
            f"Labels must be in [0, {num_classes}) (one proxy per training class), "
            f"got {bad[:5].tolist()}{' ...' if bad.size > 5 else ''}."
        )
