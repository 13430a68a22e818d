"""Tiny KerasHub presets, built from configs with random weights and saved with save_to_preset:
what a user's local preset directory holds, made offline in a second.

Import this module only after `pytest.importorskip("keras_hub")`.
"""

import keras_hub

IMAGE_SIZE = 28
REGISTER_TOKENS = 4
# ImageNet's mean and std as a converter's scale and offset (timm's and torchvision's weights).
IMAGENET_SCALE = [1 / (255 * s) for s in (0.229, 0.224, 0.225)]
IMAGENET_OFFSET = [-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]


def dinov2(registers=REGISTER_TOKENS, image_size=IMAGE_SIZE):
    """DINOv2 with register tokens, patch 14: [CLS, 4 registers, 4 patches] at 28 px."""
    backbone = keras_hub.models.DINOV2Backbone(
        patch_size=14, num_layers=2, hidden_dim=16, num_heads=2, intermediate_dim=32,
        num_register_tokens=registers, image_shape=(image_size, image_size, 3),
        position_embedding_shape=(56, 56, 3))
    converter = keras_hub.layers.DINOV2ImageConverter(image_size=(56, 56), scale=IMAGENET_SCALE,
                                                      offset=IMAGENET_OFFSET)
    return backbone, converter


def vit(image_size=IMAGE_SIZE, use_class_token=True):
    """ViT, patch 7: [CLS, 16 patches] at 28 px; its position embeddings fix the image size."""
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(image_size, image_size, 3), patch_size=7, num_layers=2, num_heads=2, hidden_dim=16,
        mlp_dim=32, use_class_token=use_class_token)
    converter = keras_hub.layers.ViTImageConverter(image_size=(image_size, image_size), scale=1 / 127.5,
                                                   offset=-1.0)
    return backbone, converter


def resnet():
    """ResNet v1.5-style basic blocks (64 and 32 channels), any image size."""
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 32],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block")
    converter = keras_hub.layers.ResNetImageConverter(image_size=(IMAGE_SIZE, IMAGE_SIZE), scale=IMAGENET_SCALE,
                                                      offset=IMAGENET_OFFSET)
    return backbone, converter


FAMILIES = {"dinov2": dinov2, "vit": vit, "resnet": resnet}


def save_preset(directory, family="dinov2", converter=True, **kwargs):
    """Saves a tiny preset of `family` to `directory`; returns (its path as str, the backbone)."""
    backbone, image_converter = FAMILIES[family](**kwargs)
    backbone.save_to_preset(str(directory))
    if converter:
        image_converter.save_to_preset(str(directory))
    return str(directory), backbone
