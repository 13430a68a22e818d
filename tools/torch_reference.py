"""The authors' ProxyNCA++ training loop in plain PyTorch, written from ../shared/RECIPE.md.

    from torch_reference import build_reference

    reference = build_reference(num_classes=100, embedding_dim=2048, lr=4e-3, proxy_lr=4e2)
    reference.start_warmup()                 # backbone at lr 0, embedding and proxies train
    loss = reference.step(images, labels)    # images: float32 NHWC in [0, 255]; labels: ints
    reference.start_main()                   # a fresh Adam for everything
    gradients = reference.last_gradients     # {torchvision-style name: numpy}, before clipping

The network is torchvision's ResNet-50 (v1.5) re-written in `torch.nn` (torchvision is not
importable beside this torch), with torchvision's module names, so its state dict has
torchvision's keys and tools/convert_torchvision_resnet50.py's mapping applies; then global max
pooling, LayerNorm without affine parameters (eps 1e-5) and a Linear layer. The loss is
ProxyNCA++: softmax over -||3 x_hat - 3 p_hat||^2 (T = 1/9). Adam has eps = 1 and three parameter
groups (backbone, embedding, proxies); backbone and embedding gradients are clipped by value.

Kept free of TensorFlow so that tools/bench_train.py can time this step beside pnpp_tf's, and so
that tools/torch_process.py can run it in a child process that never imports TensorFlow (with the
CUDA build of torch, `torch.optim.Adam` crashes a process that has imported TensorFlow).
"""

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# torchvision's ResNet-50: Bottleneck blocks per stage and their inner widths (output 4x).
STAGE_BLOCKS = (3, 4, 6, 3)
STAGE_WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
# ImageNet mean and std on [0, 255], as pnpp_tf's "torch" ImageNormalization applies them.
IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# RECIPE: proxies ~ N(0, 1) / 8; Adam eps 1, betas (0.9, 0.999).
PROXY_INIT_STDDEV = 1.0 / 8.0
ADAM_EPSILON = 1.0


class Bottleneck(nn.Module):
    """torchvision's `Bottleneck`: 1x1 -> 3x3 (with the stride: v1.5) -> 1x1 (x4), + shortcut."""

    def __init__(self, inplanes, width, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * EXPANSION)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """torchvision's `resnet50()` without its average pool and classifier, initialised as
    torchvision initialises it: convs Kaiming-normal (fan_out, ReLU), BatchNorm 1 and 0."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for stage, (blocks, width) in enumerate(zip(STAGE_BLOCKS, STAGE_WIDTHS)):
            stride = 1 if stage == 0 else 2
            downsample = nn.Sequential(nn.Conv2d(inplanes, width * EXPANSION, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(width * EXPANSION))
            layers = [Bottleneck(inplanes, width, stride, downsample)]
            layers += [Bottleneck(width * EXPANSION, width) for _ in range(blocks - 1)]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
            inplanes = width * EXPANSION
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class Embedder(nn.Module):
    """Images in [0, 255] (NCHW) -> ImageNet normalisation -> ResNet-50 -> GMP -> LayerNorm -> Linear."""

    def __init__(self, embedding_dim):
        super().__init__()
        self.backbone = ResNet50()
        self.embedding = nn.Linear(2048, embedding_dim)
        # Made in float64, so that a float64 network does not see float32-rounded constants.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN_255, dtype=torch.float64).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD_255, dtype=torch.float64).view(1, 3, 1, 1))

    def forward(self, images):
        features = self.backbone((images - self.mean) / self.std)
        pooled = torch.amax(features, dim=(2, 3))
        return self.embedding(F.layer_norm(pooled, pooled.shape[1:], eps=1e-5))


class ProxyNCAPlusPlus(nn.Module):
    """The ProxyNCA++ loss, holding one proxy per training class."""

    def __init__(self, num_classes, embedding_dim, temperature=1.0 / 9.0):
        super().__init__()
        self.proxies = nn.Parameter(torch.randn(num_classes, embedding_dim) * PROXY_INIT_STDDEV)
        self.scale = math.sqrt(1.0 / temperature)

    def forward(self, embeddings, labels):
        # In the proxies' dtype: float32 as in the recipe, float64 only when the whole loop is
        # float64 (a comparison free of float32's rounding).
        x = F.normalize(embeddings.to(self.proxies.dtype), p=2, dim=-1) * self.scale
        p = F.normalize(self.proxies, p=2, dim=-1) * self.scale
        distances = (x.pow(2).sum(1, keepdim=True) + p.pow(2).sum(1)[None, :] - 2.0 * x @ p.t()).clamp_min(0.0)
        return F.cross_entropy(-distances, labels)


class ReferenceLoop:
    """The authors' loop: one step is forward, backward, clip by value, Adam.

    Args:
        model: an `Embedder`.
        criterion: a `ProxyNCAPlusPlus`.
        lr: base learning rate (backbone and embedding).
        proxy_lr: the proxies' learning rate.
        clip_value: backbone and embedding gradients are clipped to [-clip_value, clip_value].
        keep_gradients: copy each step's gradients to `last_gradients` (off when timing the step).
        channels_last: feed the network NHWC images (the model should be in
            `torch.channels_last`): the same maths with other kernels and summation orders.

    Attributes:
        optimizer: the current Adam (None before `start_warmup` or `start_main`).
        last_gradients: {name: numpy} of the last step's gradients, before clipping; names are
            the state dict's ("backbone." stripped: torchvision keys), "embedding.*", "proxies".
    """

    def __init__(self, model, criterion, lr, proxy_lr, clip_value=10.0, keep_gradients=True, channels_last=False):
        self.model = model.train()  # BatchNorm in training mode throughout, as the authors' loop
        self.criterion = criterion
        self.lr = lr
        self.proxy_lr = proxy_lr
        self.clip_value = clip_value
        self.keep_gradients = keep_gradients
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.optimizer = None
        self.last_gradients = {}

    def _optimizer(self, backbone_lr):
        groups = [{"params": list(self.model.backbone.parameters()), "lr": backbone_lr},
                  {"params": list(self.model.embedding.parameters()), "lr": self.lr},
                  {"params": [self.criterion.proxies], "lr": self.proxy_lr}]
        return torch.optim.Adam(groups, eps=ADAM_EPSILON)

    def start_warmup(self):
        """A warm-up Adam: the backbone's group at lr 0 (its BatchNorm statistics still move)."""
        self.optimizer = self._optimizer(0.0)

    def start_main(self):
        """A fresh Adam, every group at its own learning rate."""
        self.optimizer = self._optimizer(self.lr)

    def step(self, images, labels):
        """One training step.

        Args:
            images: float32 [N, H, W, 3] RGB in [0, 255] (numpy or tensor, NHWC as pnpp_tf's).
            labels: int [N] class ids in [0, num_classes).

        Returns:
            The batch's loss, a Python float.
        """
        dtype = self.model.embedding.weight.dtype
        images = torch.as_tensor(np.asarray(images, np.float32)).permute(0, 3, 1, 2)
        images = images.to(dtype).contiguous(memory_format=self.memory_format)
        labels = torch.as_tensor(np.asarray(labels, np.int64))
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.criterion(self.model(images), labels)
        loss.backward()
        if self.keep_gradients:
            self.last_gradients = {name: parameter.grad.detach().numpy().copy()
                                   for name, parameter in self.named_parameters()}
        # The authors clip model.parameters(): backbone and embedding, not the criterion's proxies.
        torch.nn.utils.clip_grad_value_(self.model.parameters(), self.clip_value)
        self.optimizer.step()
        return float(loss.detach())

    def named_parameters(self):
        """(name, parameter) of every trained tensor, named as `state` names them."""
        for name, parameter in self.model.named_parameters():
            yield _public_name(name), parameter
        yield "proxies", self.criterion.proxies

    def state(self):
        """{name: numpy} of every parameter and BatchNorm running statistic (torchvision keys for
        the backbone, "embedding.weight"/"embedding.bias", "proxies"); no step counters."""
        state = {_public_name(k): v.detach().numpy().copy() for k, v in self.model.state_dict().items()
                 if not k.endswith("num_batches_tracked") and k not in ("mean", "std")}
        state["proxies"] = self.criterion.proxies.detach().numpy().copy()
        return state


def _public_name(name):
    return name[len("backbone."):] if name.startswith("backbone.") else name


def build_reference(num_classes, embedding_dim=2048, lr=4e-3, proxy_lr=4e2, clip_value=10.0,
                    temperature=1.0 / 9.0, state_dict=None, seed=0, dtype="float32", keep_gradients=True,
                    channels_last=False):
    """Builds the authors' loop, from torchvision's random init or from given weights.

    Args:
        num_classes: training classes (proxies).
        embedding_dim: output size of the Linear embedding layer.
        lr: base learning rate; proxy_lr: the proxies' (RECIPE: 4e-3 and 4e2 on CUB).
        clip_value: gradient clipping by value of backbone and embedding.
        temperature: the loss' T.
        state_dict: optional {name: array} of torchvision ResNet-50 keys (e.g. ImageNet weights;
            `fc.*` and `num_batches_tracked` are ignored), and optionally "embedding.weight",
            "embedding.bias" and "proxies"; whatever is absent keeps its seeded random init.
        seed: torch's seed for the random init.
        dtype: "float32" (the recipe), or "float64" for the network, the proxies and the loss:
            a comparison in float64 is free of float32's rounding. The random init is drawn in
            float32 either way (the same weights); `state_dict` is loaded in `dtype`, so float64
            values given there stay float64.
        keep_gradients: as `ReferenceLoop`'s.
        channels_last: as `ReferenceLoop`'s; the model is converted to `torch.channels_last`.

    Returns:
        A `ReferenceLoop`; call `start_warmup()` or `start_main()` before stepping.
    """
    torch.manual_seed(seed)
    model = Embedder(embedding_dim)
    criterion = ProxyNCAPlusPlus(num_classes, embedding_dim, temperature)
    model.to(getattr(torch, dtype))
    criterion.to(getattr(torch, dtype))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if state_dict is not None:
        _load(model, criterion, state_dict)
    return ReferenceLoop(model, criterion, lr, proxy_lr, clip_value, keep_gradients, channels_last)


def _load(model, criterion, state_dict):
    """Copies the tensors of `state_dict` that it has into the model and criterion, in their dtype."""
    backbone = {k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()
                if not k.startswith(("fc.", "embedding.")) and k != "proxies"
                and not k.endswith("num_batches_tracked")}
    if backbone:
        result = model.backbone.load_state_dict(backbone, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        if missing or result.unexpected_keys:
            raise ValueError(f"Not a torchvision ResNet-50 state dict: missing {missing}, "
                             f"unexpected {result.unexpected_keys}.")
    with torch.no_grad():
        for key, target in (("embedding.weight", model.embedding.weight),
                            ("embedding.bias", model.embedding.bias), ("proxies", criterion.proxies)):
            if key in state_dict:
                target.copy_(torch.as_tensor(np.asarray(state_dict[key])))
