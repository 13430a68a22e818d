"""Backbone registry: every backbone is a trunk builder plus the input normalisation it expects.

A trunk maps float RGB images to a feature map [batch, h, w, channels], or, for a transformer, to
tokens [batch, tokens, channels]; pooling and the embedding head are added by `pnpp_tf.model`.
Adding a backbone is one `register_backbone` call. The "keras_hub" entry builds any KerasHub
preset (`pnpp_tf.hub_backbones`): its normalisation and token layout come from the preset.
"""

import dataclasses
import os
import typing
from typing import Callable

import keras
from keras import layers

from pnpp_tf.errors import UserError

# RECIPE: BatchNorm trains with PyTorch's momentum 0.1, which is Keras' momentum 0.9.
BATCH_NORM_MOMENTUM = 0.9

_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_IMAGENET_RGB_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_RGB_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# What `resolve_weights` returns for --weights=imagenet (the default) or preset on a preset backbone.
PRESET_WEIGHTS = "preset"


@dataclasses.dataclass(frozen=True)
class Backbone:
    """How to build one trunk.

    Attributes:
        name: registry key, the value of `--backbone`.
        build_trunk: `(input_shape, weights) -> keras.Model` returning the last feature map; with
            `normalization="preset"`, `(input_shape, weights, preset) -> Trunk`.
        normalization: mode of `ImageNormalization` the trunk's weights expect, or "preset"
            (the trunk comes with its own normalisation, read from `--backbone_preset`).
        feature_dim: channels of the feature map (None: as the preset says).
        pretrained_weights: the named weights `--weights` accepts besides "none" and a path.
    """

    name: str
    build_trunk: Callable
    normalization: str
    feature_dim: typing.Optional[int]
    pretrained_weights: tuple = ()

    @property
    def takes_preset(self):
        """Whether the trunk is built from `--backbone_preset`."""
        return self.normalization == "preset"

    def check_preset(self, preset):
        """Raises `UserError` if `--backbone_preset` is missing for this backbone, or given to one
        that does not read it."""
        if self.takes_preset and not preset:
            raise UserError(f"--backbone={self.name} needs --backbone_preset=HANDLE_OR_DIR: a KerasHub preset "
                            "handle (e.g. dinov2_small, hf://timm/resnet50.tv_in1k) or a local preset directory.")
        if preset and not self.takes_preset:
            raise UserError(f"--backbone_preset={preset} is only read with --backbone=keras_hub; drop it or "
                            "pass --backbone=keras_hub.")

    def build(self, input_shape, weights, preset=None):
        """Builds the trunk and its input normalisation.

        Args:
            input_shape: (height, width, 3).
            weights: what `resolve_weights` returned.
            preset: `--backbone_preset` (backbones that take one only).

        Returns:
            A `Trunk`.
        """
        self.check_preset(preset)
        if self.takes_preset:
            return self.build_trunk(input_shape, weights, preset)
        model = self.build_trunk(input_shape, weights)
        return Trunk(model, ImageNormalization(self.normalization, name="normalization"))


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where a transformer puts its tokens along axis 1: [CLS, registers..., patches...].

    Attributes:
        prefix_tokens: tokens before the patch tokens (CLS and register tokens).
        has_cls: whether token 0 is a CLS token.
    """

    prefix_tokens: int
    has_cls: bool


@dataclasses.dataclass(frozen=True)
class Trunk:
    """A built trunk and what the embedder needs to know about it.

    Attributes:
        model: the `keras.Model` named "backbone" (the layer the warm-up freezes).
        normalization: the layer mapping RGB in [0, 255] to the trunk's input range.
        tokens: a `TokenLayout` if the trunk returns tokens, None for a feature map.
    """

    model: keras.Model
    normalization: layers.Layer
    tokens: typing.Optional[TokenLayout] = None


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
        # A preset's own weights go by the name of --weights' default, so that it need not be passed.
        return PRESET_WEIGHTS if backbone.takes_preset else weights
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


@keras.saving.register_keras_serializable(package="pnpp_tf")
class ScaleOffset(layers.Layer):
    """`images * scale + offset`: a KerasHub image converter's normalisation, without its resizing.

    Args:
        scale: a number, or one per channel (a preset's 1 / (255 * std), say).
        offset: a number, or one per channel (-mean / std); None for 0.
    """

    def __init__(self, scale=1.0, offset=None, **kwargs):
        super().__init__(**kwargs)
        self.scale = _floats(scale)
        self.offset = _floats(0.0 if offset is None else offset)

    def call(self, images):
        images = keras.ops.cast(images, self.compute_dtype)
        scale = keras.ops.array(self.scale, self.compute_dtype)
        return images * scale + keras.ops.array(self.offset, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "offset": self.offset}


def _floats(value):
    """A number or a sequence of numbers as a float or a list of floats (JSON-able)."""
    if isinstance(value, (int, float)):
        return float(value)
    return [float(v) for v in value]


def batch_norm_layers(model):
    """Every `BatchNormalization` in `model`, nested models and layers included, each once."""
    found, seen, stack = [], set(), [model]
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, layers.BatchNormalization):
            found.append(layer)
        # A model lists its layers; a layer holding sublayers (a KerasHub block) tracks them as attributes.
        children = list(getattr(layer, "layers", None) or ())
        for value in vars(layer).values():
            children.extend(v for v in (value if isinstance(value, (list, tuple)) else (value,))
                            if isinstance(v, layers.Layer))
        stack.extend(reversed(children))
    return found


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


def _build_keras_hub(input_shape, weights, preset):
    # Imported on use: keras-hub is an optional extra, and importing it takes seconds.
    from pnpp_tf.hub_backbones import build_hub_trunk

    return build_hub_trunk(input_shape, weights, preset)


# Any KerasHub image backbone (DINOv2, DINOv3, ViT, ResNet, EfficientNet, MobileNet, ...), from
# --backbone_preset. Its weights are the preset's: the default --weights=imagenet loads them.
register_backbone(
    Backbone(
        name="keras_hub",
        build_trunk=_build_keras_hub,
        normalization="preset",
        feature_dim=None,
        pretrained_weights=("imagenet", PRESET_WEIGHTS),
    )
)
