"""ResNet-50 exactly as torchvision builds it (v1.5), and a loader for torchvision state dicts.

The ProxyNCA++ authors fine-tune torchvision's ImageNet ResNet-50. Keras' own `ResNet50` differs
from it in three ways that change the features: it is v1 (stride 2 on the first 1x1 conv of a
downsampling block, not on the 3x3 conv), its convolutions have biases, and its weights expect
caffe-style BGR input. This module rebuilds the torchvision network layer for layer, with layer
names derived from torchvision's parameter names ("layer2.0.conv2" is the Keras layer
"layer2_0_conv2"), so that a torchvision state dict maps onto it one tensor at a time.

PyTorch pads convolutions symmetrically (1 pixel for a 3x3, 3 for the 7x7), whereas Keras'
`padding="same"` with stride 2 on an even input puts the odd pixel at the bottom/right (0/1 for a
3x3, 2/3 for the 7x7), which shifts every sampled location by one pixel. Every padded layer here is
therefore an explicit `ZeroPadding2D` followed by a "valid" layer.

Without weights the trunk starts as torchvision's does (`ResNet.__init__`): convolutions
Kaiming-normal (fan_out, ReLU gain), BatchNorm gamma = 1 and beta = 0 (`zero_init_residual` is
False by default, so no block's last gamma is zeroed). Its BatchNorm layers keep PyTorch's
running statistics (`TorchBatchNormalization`).
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from pnpp_tf.modeling.trunks import BATCH_NORM_MOMENTUM
from pnpp_tf.errors import UserError

# PyTorch's BatchNorm2d default; Keras' default is 1e-3.
BATCH_NORM_EPSILON = 1e-5
# Bottleneck blocks per stage and their inner widths; the output width is 4x the inner width.
STAGE_BLOCKS = (3, 4, 6, 3)
STAGE_WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
# Entries of a torchvision ResNet-50 state dict that the trunk does not use: the classifier and
# BatchNorm's step counter (only used when momentum=None, which torchvision never sets).
IGNORED_KEY_PREFIXES = ("fc.",)
IGNORED_KEY_SUFFIXES = (".num_batches_tracked",)


# torchvision: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"); Keras' fan_out of
# a conv kernel is torchvision's (out_channels * kh * kw).
def conv_initializer():
    """torchvision's conv init as a Keras initializer (a new one per layer, so no two share a seed)."""
    return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")


@keras.saving.register_keras_serializable(package="pnpp_tf")
class TorchBatchNormalization(layers.BatchNormalization):
    """BatchNormalization that keeps `torch.nn.BatchNorm2d`'s running statistics.

    The batch is normalised with the biased batch variance, as in Keras and PyTorch alike, but the
    running variance is updated with the unbiased one, var * n / (n - 1) for n values per channel
    (over all replicas when `synchronized`), as PyTorch does. Momentum and epsilon default to
    PyTorch's 0.1 (Keras momentum 0.9) and 1e-5. Renormalisation and masks are not supported.

    In training, on one replica, NHWC float32 or float16, it runs TensorFlow's fused kernel
    (`FusedBatchNormV3`, oneDNN's on a CPU): the same statistics and the same unbiased running
    variance in one op, 2-3x faster than Keras' composed ops forward and backward (about 15 % of
    the 64 px ResNet-50 step). Synchronised statistics take the composed path.

    Args:
        momentum: Keras' momentum, the weight of the old running value.
        epsilon: added to the variance.
        **kwargs: the other arguments of `keras.layers.BatchNormalization`.
    """

    def __init__(self, momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON, **kwargs):
        if kwargs.get("renorm"):
            raise ValueError("TorchBatchNormalization does not support renorm=True.")
        super().__init__(momentum=momentum, epsilon=epsilon, **kwargs)

    def call(self, inputs, training=None, mask=None):
        if mask is not None:
            raise ValueError("TorchBatchNormalization does not support masks.")
        if not (training and self.trainable):
            return super().call(inputs, training=training)
        if self.fusable(inputs):
            return self._fused_call(inputs)
        # As Keras does: the statistics of float16 activations are computed in float32.
        inputs = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        mean, variance = ops.moments(inputs, axes=self._reduction_axes, synchronized=self.synchronized)
        count = ops.cast(ops.size(inputs) // ops.shape(inputs)[self.axis], inputs.dtype)
        context = tf.distribute.get_replica_context()
        if self.synchronized and context is not None:
            # Keras' synchronised moments sum over the replicas; the distributed input gives every
            # replica the same share of the global batch (whole classes per replica).
            count = count * context.num_replicas_in_sync
        unbiased = variance * count / ops.maximum(count - 1.0, 1.0)
        self.moving_mean.assign(ops.cast(
            ops.cast(self.moving_mean, inputs.dtype) * self.momentum + mean * (1.0 - self.momentum),
            self.moving_mean.dtype))
        self.moving_variance.assign(ops.cast(
            ops.cast(self.moving_variance, inputs.dtype) * self.momentum + unbiased * (1.0 - self.momentum),
            self.moving_variance.dtype))
        gamma = ops.cast(self.gamma, inputs.dtype) if self.scale else None
        beta = ops.cast(self.beta, inputs.dtype) if self.center else None
        outputs = ops.batch_normalization(inputs, mean, variance, axis=self.axis, offset=beta, scale=gamma,
                                          epsilon=self.epsilon)
        return ops.cast(outputs, self.compute_dtype)


    def fusable(self, inputs):
        """Whether training on `inputs` runs the fused kernel."""
        return (keras.backend.backend() == "tensorflow" and not self.synchronized and self.center and self.scale
                and len(inputs.shape) == 4 and self.axis in (-1, 3) and inputs.dtype in ("float32", "float16"))

    def _fused_call(self, inputs):
        outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=tf.cast(self.gamma, tf.float32), offset=tf.cast(self.beta, tf.float32),
            mean=tf.convert_to_tensor(self.moving_mean), variance=tf.convert_to_tensor(self.moving_variance),
            epsilon=self.epsilon, exponential_avg_factor=1.0 - self.momentum, data_format="NHWC", is_training=True)
        # The op returns the running statistics already updated (variance with Bessel's correction).
        self.moving_mean.assign(mean)
        self.moving_variance.assign(variance)
        return ops.cast(outputs, self.compute_dtype)


def _conv(x, filters, kernel_size, stride, name):
    """A bias-free conv with PyTorch's symmetric padding of kernel_size // 2."""
    pad = kernel_size // 2
    if pad:
        x = layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
    return layers.Conv2D(
        filters, kernel_size, strides=stride, padding="valid", use_bias=False,
        kernel_initializer=conv_initializer(), name=name,
    )(x)


def _batch_norm(x, name):
    # Keras' default gamma/beta initialisers are torchvision's ones and zeros.
    return TorchBatchNormalization(name=name)(x)


def _bottleneck(x, width, stride, downsample, name):
    """torchvision's `Bottleneck`: 1x1 -> 3x3 (carries the stride: v1.5) -> 1x1 (x4), + shortcut."""
    shortcut = x
    y = _conv(x, width, 1, 1, f"{name}_conv1")
    y = layers.ReLU(name=f"{name}_relu1")(_batch_norm(y, f"{name}_bn1"))
    y = _conv(y, width, 3, stride, f"{name}_conv2")
    y = layers.ReLU(name=f"{name}_relu2")(_batch_norm(y, f"{name}_bn2"))
    y = _conv(y, width * EXPANSION, 1, 1, f"{name}_conv3")
    y = _batch_norm(y, f"{name}_bn3")
    if downsample:
        # torchvision's `downsample = Sequential(conv1x1(stride), BatchNorm2d)`: indices 0 and 1.
        shortcut = _conv(x, width * EXPANSION, 1, stride, f"{name}_downsample_0")
        shortcut = _batch_norm(shortcut, f"{name}_downsample_1")
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_out")(y)


def build_resnet50_torchvision(input_shape, weights=None):
    """Builds the torchvision ResNet-50 (v1.5) trunk, without its average pool and classifier.

    Keras cannot download torchvision's ImageNet weights, so this backbone has no named pretrained
    weights: convert a torchvision state dict once with

        python tools/convert_torchvision_resnet50.py --input=resnet50.pth \
            --output=resnet50_torchvision.weights.h5

    and pass the result as `--weights=resnet50_torchvision.weights.h5`. The trunk expects
    torchvision's input normalisation, ImageNet mean/std on [0, 1] RGB ("torch" mode of
    `ImageNormalization`).

    Args:
        input_shape: (height, width, 3).
        weights: None (random initialisation) or the path of a `.weights.h5` file written by the
            converter (or by `save_weights` of this trunk).

    Returns:
        A `keras.Model` named "backbone" returning the layer4 feature map
        [N, ceil(height / 32), ceil(width / 32), 2048].
    """
    inputs = keras.Input(input_shape, name="images")
    x = _conv(inputs, 64, 7, 2, "conv1")
    x = layers.ReLU(name="relu")(_batch_norm(x, "bn1"))
    # PyTorch's MaxPool2d pads with -inf (padding never wins the max). Its input is a ReLU output,
    # so all values are >= 0 and every 3x3 window holds at least one real pixel: padding with 0
    # gives exactly the same maxima.
    x = layers.ZeroPadding2D(1, name="maxpool_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="valid", name="maxpool")(x)
    for stage, (blocks, width) in enumerate(zip(STAGE_BLOCKS, STAGE_WIDTHS)):
        for block in range(blocks):
            # Stage 1 keeps the resolution (the max pool already halved it); stages 2-4 halve it
            # in their first block. Every first block changes the width, hence its downsample.
            stride = 2 if block == 0 and stage > 0 else 1
            x = _bottleneck(x, width, stride, block == 0, f"layer{stage + 1}_{block}")
    trunk = keras.Model(inputs, x, name="backbone")
    if weights is not None:
        _load_weights_file(trunk, weights)
    return trunk


def _load_weights_file(trunk, path):
    path = str(path)
    if path.endswith((".pth", ".pt", ".safetensors")):
        raise UserError(
            f"{path} is a PyTorch state dict; convert it first with "
            f"`python tools/convert_torchvision_resnet50.py --input={path} "
            f"--output=resnet50_torchvision.weights.h5` and pass the .weights.h5 file."
        )
    trunk.load_weights(path)


def expected_state_dict_shapes(trunk):
    """The torchvision state-dict keys the trunk needs, with their PyTorch shapes.

    Args:
        trunk: a model from `build_resnet50_torchvision`.

    Returns:
        A dict mapping keys such as "layer1.0.conv1.weight" to (keras variable, torch shape).
    """
    expected = {}
    for layer in trunk.layers:
        prefix = layer.name.replace("_", ".")
        if isinstance(layer, layers.Conv2D):
            kh, kw, cin, cout = layer.kernel.shape
            expected[f"{prefix}.weight"] = (layer.kernel, (cout, cin, kh, kw))
        elif isinstance(layer, layers.BatchNormalization):
            channels = (layer.gamma.shape[0],)
            expected[f"{prefix}.weight"] = (layer.gamma, channels)
            expected[f"{prefix}.bias"] = (layer.beta, channels)
            expected[f"{prefix}.running_mean"] = (layer.moving_mean, channels)
            expected[f"{prefix}.running_var"] = (layer.moving_variance, channels)
    return expected


def is_ignored_key(key):
    """Whether a torchvision key is deliberately not used (classifier, BN step counter)."""
    return key.startswith(IGNORED_KEY_PREFIXES) or key.endswith(IGNORED_KEY_SUFFIXES)


def load_torchvision_state_dict(trunk, state_dict):
    """Copies a torchvision ResNet-50 state dict into the trunk.

    Conv kernels go from PyTorch's [out, in, kh, kw] to Keras' [kh, kw, in, out]; BatchNorm
    weight/bias/running_mean/running_var become gamma/beta/moving_mean/moving_variance. The
    classifier (`fc.*`) and `*.num_batches_tracked` are ignored. Nothing is assigned unless every
    key matches, so a failed load leaves the trunk untouched.

    Args:
        trunk: a model from `build_resnet50_torchvision`.
        state_dict: mapping from torchvision key to a numpy array (or anything `np.asarray` takes).

    Returns:
        The list of ignored keys present in `state_dict`.

    Raises:
        ValueError: naming every missing, unexpected or mis-shaped key.
    """
    expected = expected_state_dict_shapes(trunk)
    ignored = sorted(k for k in state_dict if is_ignored_key(k))
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected and not is_ignored_key(k))
    mis_shaped = []
    arrays = {}
    for key, (_, torch_shape) in expected.items():
        if key not in state_dict:
            continue
        array = np.asarray(state_dict[key], dtype=np.float32)
        if array.shape != tuple(torch_shape):
            mis_shaped.append(f"{key}: got {array.shape}, expected {tuple(torch_shape)}")
        arrays[key] = array
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if mis_shaped:
        problems.append(f"mis-shaped keys ({len(mis_shaped)}): {'; '.join(mis_shaped)}")
    if problems:
        hint = _prefix_hint(missing, unexpected)
        raise UserError(
            f"The state dict is not a torchvision ResNet-50{hint}: " + " | ".join(problems)
        )
    for key, (variable, _) in expected.items():
        array = arrays[key]
        if array.ndim == 4:
            array = array.transpose(2, 3, 1, 0)
        variable.assign(array)
    return ignored


def _prefix_hint(missing, unexpected):
    """Names the key prefix when the ResNet's keys are nested, e.g. under "module." (DataParallel)."""
    if "conv1.weight" not in missing:
        return ""
    prefixes = [k[: -len("conv1.weight")] for k in unexpected if k.endswith(".conv1.weight")]
    prefixes = [p for p in prefixes if f"{p}layer4.2.bn3.running_var" in unexpected]
    if not prefixes:
        return ""
    prefix = min(prefixes, key=len)
    return f" (its keys start with {prefix!r}: convert with --strip_prefix={prefix})"
