"""What every trunk shares: the types a backbone builder returns and the layers that normalise
its input. The builders (`pnpp_tf.modeling.backbones`, `torchvision_resnet`, `hub_backbones`)
import from here, and the registry imports the builders: imports run one way.
"""

import dataclasses
import typing

import keras
from keras import layers

# RECIPE: BatchNorm trains with PyTorch's momentum 0.1, which is Keras' momentum 0.9.
BATCH_NORM_MOMENTUM = 0.9

_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_IMAGENET_RGB_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_RGB_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# What `resolve_weights` returns for --weights=imagenet (the default) or preset on a preset backbone.
PRESET_WEIGHTS = "preset"


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
