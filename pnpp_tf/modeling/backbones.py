"""Backbone registry: every backbone is a trunk builder plus the input normalisation it expects.

A trunk maps float RGB images to a feature map [batch, h, w, channels], or, for a transformer, to
tokens [batch, tokens, channels]; pooling and the embedding head are added by
`pnpp_tf.modeling.model`. Adding a backbone is one `register_backbone` call. The "keras_hub" entry
builds any KerasHub preset (`pnpp_tf.modeling.hub_backbones`): its normalisation and token layout
come from the preset. What the builders share (`Trunk`, the normalisation layers) is in
`pnpp_tf.modeling.trunks`.
"""

import dataclasses
import os
import typing
from typing import Callable

import keras
from keras import layers

from pnpp_tf.errors import UserError
from pnpp_tf.modeling.torchvision_resnet import build_resnet50_torchvision
from pnpp_tf.modeling.trunks import BATCH_NORM_MOMENTUM, PRESET_WEIGHTS, ImageNormalization, Trunk


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


# torchvision's ResNet-50 (v1.5), the authors' backbone. No named weights: Keras cannot download
# torchvision's; convert a state dict with tools/convert_torchvision_resnet50.py.
register_backbone(
    Backbone(
        name="resnet50_torchvision",
        build_trunk=build_resnet50_torchvision,
        normalization="torch",
        feature_dim=2048,
        pretrained_weights=(),
    )
)


def _build_keras_hub(input_shape, weights, preset):
    # Imported on use: keras-hub is an optional extra, and importing it takes seconds.
    from pnpp_tf.modeling.hub_backbones import build_hub_trunk  # pylint: disable=import-outside-toplevel

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
