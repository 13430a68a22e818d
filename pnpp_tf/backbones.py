"""Backbone registry: every backbone is a trunk builder plus the input normalisation it expects.

A trunk maps float RGB images to a feature map [batch, h, w, channels]; pooling and the embedding
head are added by `pnpp_tf.model`. Adding a backbone is one `register_backbone` call.
"""

import dataclasses
import os
from typing import Callable

import keras
from keras import layers

from pnpp_tf.errors import UserError

# RECIPE: BatchNorm trains with PyTorch's momentum 0.1, which is Keras' momentum 0.9.
BATCH_NORM_MOMENTUM = 0.9

_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_IMAGENET_RGB_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_RGB_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclasses.dataclass(frozen=True)
class Backbone:
    """How to build one trunk.

    Attributes:
        name: registry key, the value of `--backbone`.
        build_trunk: `(input_shape, weights) -> keras.Model` returning the last feature map.
        normalization: mode of `ImageNormalization` the trunk's weights expect.
        feature_dim: channels of the feature map.
        pretrained_weights: the named weights `--weights` accepts besides "none" and a path.
    """

    name: str
    build_trunk: Callable
    normalization: str
    feature_dim: int
    pretrained_weights: tuple = ()


_REGISTRY = {}


def register_backbone(backbone):
    """Adds `backbone` to the registry under `backbone.name`."""
    if backbone.name in _REGISTRY:
        raise ValueError(f"Backbone {backbone.name!r} is already registered.")
    _REGISTRY[backbone.name] = backbone
    return backbone


def get_backbone(name):
    """Returns the registered `Backbone` called `name`."""
    if name not in _REGISTRY:
        raise UserError(f"Unknown backbone {name!r}; choose one of {sorted(_REGISTRY)}.")
    return _REGISTRY[name]


def available_backbones():
    """Names of the registered backbones, sorted."""
    return sorted(_REGISTRY)


def resolve_weights(backbone, weights):
    """Maps the `--weights` value to what the trunk builder takes.

    Args:
        backbone: a `Backbone`.
        weights: "none", one of `backbone.pretrained_weights` (e.g. "imagenet"), or a file path.

    Returns:
        None, the pretrained weights' name, or the checked path.
    """
    if weights is None or str(weights).lower() == "none":
        return None
    if weights in backbone.pretrained_weights:
        return weights
    if os.path.isfile(weights):
        return weights
    choices = ", ".join(("none",) + backbone.pretrained_weights + ("a weights file path",))
    raise UserError(
        f"--weights={weights!r} is neither a file nor a known name for backbone "
        f"{backbone.name!r}; choose one of: {choices}."
    )


@keras.saving.register_keras_serializable(package="pnpp_tf")
class ImageNormalization(layers.Layer):
    """Maps RGB images in [0, 255] to the input range a backbone's weights expect.

    Args:
        mode: "caffe" (RGB->BGR, minus the ImageNet BGR mean: Keras' ResNet50 weights),
            "torch" (ImageNet mean/std on [0, 1] RGB: torchvision weights) or
            "symmetric" ([-1, 1], for backbones trained from scratch).
    """

    MODES = ("caffe", "torch", "symmetric")

    def __init__(self, mode, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}.")
        self.mode = mode

    def call(self, images):
        images = keras.ops.cast(images, self.compute_dtype)
        if self.mode == "caffe":
            return images[..., ::-1] - keras.ops.array(_CAFFE_BGR_MEAN, self.compute_dtype)
        if self.mode == "torch":
            mean = keras.ops.array(_IMAGENET_RGB_MEAN, self.compute_dtype)
            std = keras.ops.array(_IMAGENET_RGB_STD, self.compute_dtype)
            return (images - mean) / std
        return images / 127.5 - 1.0

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def _build_resnet50(input_shape, weights):
    trunk = keras.applications.ResNet50(include_top=False, weights=weights, input_shape=input_shape)
    for layer in trunk.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = BATCH_NORM_MOMENTUM
    return keras.Model(trunk.input, trunk.output, name="backbone")


def _build_small_cnn(input_shape, weights):
    """Four blocks of (conv3x3-BN-ReLU)x2 + 2x2 max-pool, 32 to 256 channels: learns from scratch
    in minutes on a CPU, which ResNet-50 does not."""
    inputs = keras.Input(input_shape)
    x = inputs
    for block, channels in enumerate((32, 64, 128, 256)):
        for conv in range(2):
            name = f"block{block + 1}_conv{conv + 1}"
            x = layers.Conv2D(channels, 3, padding="same", use_bias=False, name=name)(x)
            x = layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, name=f"{name}_bn")(x)
            x = layers.ReLU(name=f"{name}_relu")(x)
        x = layers.MaxPooling2D(2, name=f"block{block + 1}_pool")(x)
    trunk = keras.Model(inputs, x, name="backbone")
    if weights is not None:
        trunk.load_weights(weights)
    return trunk


register_backbone(
    Backbone(
        name="resnet50",
        build_trunk=_build_resnet50,
        normalization="caffe",
        feature_dim=2048,
        pretrained_weights=("imagenet",),
    )
)
register_backbone(
    Backbone(name="small_cnn", build_trunk=_build_small_cnn, normalization="symmetric", feature_dim=256)
)


def _build_resnet50_torchvision(input_shape, weights):
    # Imported on use: pnpp_tf.torchvision_resnet imports BATCH_NORM_MOMENTUM from this module.
    from pnpp_tf.torchvision_resnet import build_resnet50_torchvision

    return build_resnet50_torchvision(input_shape, weights)


# torchvision's ResNet-50 (v1.5), the authors' backbone. No named weights: Keras cannot download
# torchvision's; convert a state dict with tools/convert_torchvision_resnet50.py.
register_backbone(
    Backbone(
        name="resnet50_torchvision",
        build_trunk=_build_resnet50_torchvision,
        normalization="torch",
        feature_dim=2048,
        pretrained_weights=(),
    )
)
