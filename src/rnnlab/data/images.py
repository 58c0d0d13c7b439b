"""Reading, validating and transforming images with torchvision (``torchvision.io`` + ``transforms.v2``).

Every image is decoded by :func:`load_image`, which either returns a uint8 RGB tensor
``[3, H, W]`` or raises :class:`ImageError` whose ``reason`` says what is wrong (missing,
empty, not an image, truncated/corrupt JPEG). :func:`validate_images` applies it to a list of
names and returns the good names plus one ``(name, reason)`` per bad file: never silent.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2

from rnnlab.errors import DataError

# torchvision 0.29 warns on every decode that its image IO is deprecated in favour of TorchCodec;
# the issue asks for torchvision.io, so the notice is silenced here only.
_DEPRECATION = r".*image decoding and encoding capabilities of TorchVision are deprecated.*"


class ImageError(DataError):
    """One image could not be used; ``reason`` is short enough for a metrics table."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def decode_image_bytes(data: torch.Tensor, path: Path) -> torch.Tensor:
    """uint8 bytes [n] -> uint8 RGB image [3, H, W]; raise ImageError naming what is wrong."""
    if data.numel() == 0:
        raise ImageError(path, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DEPRECATION)
            image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        message = str(exc)
        if "Unsupported image file" in message:
            reason = "not an image (unrecognised format)"
        elif "truncated" in message or "incomplete" in message:
            reason = "truncated or incomplete image"
        else:
            reason = f"cannot decode: {message.splitlines()[-1].split(', ')[-1][:120]}"
        raise ImageError(path, reason) from None
    if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise ImageError(path, f"decoded to an unexpected shape {tuple(image.shape)}")
    return image


def load_image(path: str | Path) -> torch.Tensor:
    """Read and decode one image file -> uint8 RGB [3, H, W] (grey/CMYK/alpha converted to RGB)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "missing file")
    if not path.is_file():
        raise ImageError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise ImageError(path, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DEPRECATION)
            data = read_file(str(path))
    except (OSError, RuntimeError) as exc:
        raise ImageError(path, f"cannot read ({exc})") from None
    return decode_image_bytes(data, path)


def validate_images(image_dir: str | Path, names: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Decode every named image once; return (ok_names in input order, [(name, reason), ...])."""
    image_dir = Path(image_dir)
    ok, problems = [], []
    for name in names:
        try:
            load_image(image_dir / name)
        except ImageError as exc:
            problems.append((name, exc.reason))
        else:
            ok.append(name)
    return ok, problems


def image_transform(mean, std, size: int = 224) -> v2.Compose:
    """uint8 [3, H, W] -> float [3, size, size] normalised with the encoder's ``mean``/``std``.

    Images are squashed to ``size`` x ``size`` (aspect ratio not kept), as the Flickr8k mirror's
    images already are, so a new image is seen the way the training images were.
    """
    return v2.Compose(
        [
            v2.Resize((size, size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )
