"""Images from files (PNG, JPEG, anything Pillow reads) or arrays, as the tensors the image prefix takes.

An image is converted to the model's channels (RGB or grey; an alpha channel is composited onto black, as the
synthetic datasets' background) and resized to the model's square side with Pillow's bicubic filter, the way
Hugging Face image processors resize. Files that are not images, truncated files, modes that carry no colour
meaning here (CMYK, 16-bit and float) and images over ``MAX_PIXELS`` are refused with one line.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

import numpy as np
import torch

from ..errors import GptlabError
from ..files import read_input

MAX_PIXELS = 4096 * 4096  # larger inputs are refused before decoding (a decompression bomb is far larger)
MAX_FILE_BYTES = 64 * 2**20  # an image file over this is refused before it is read
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 images [B, H, W, C] (or one [H, W, C]) -> float [B, C, H, W] in [0, 1]."""
    t = torch.from_numpy(np.array(pixels, dtype=np.uint8))  # a copy: memory-mapped arrays are read-only
    t = t[None] if t.dim() == 3 else t
    return t.permute(0, 3, 1, 2).float().div_(255.0)


def decode_image(data: bytes, size: int, channels: int, origin: str = "the image") -> np.ndarray:
    """Encoded image bytes -> uint8 [size, size, channels]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:
            w, h = opened.size
            if w * h > MAX_PIXELS:
                raise GptlabError(f"{origin} is {w}x{h} pixels, over the limit of {MAX_PIXELS:,}; downscale it first")
            if opened.mode not in MODES:
                raise GptlabError(
                    f"{origin} has pixel mode {opened.mode}, which gptlab does not read; save it as 8-bit RGB or grey"
                )
            opened.load()
            img: Image.Image = opened
            if img.mode in ("LA", "PA", "RGBA", "P"):
                img = img.convert("RGBA")
                black = Image.new("RGBA", img.size, (0, 0, 0, 255))
                img = Image.alpha_composite(black, img)
            img = img.convert("RGB" if channels == 3 else "L")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BICUBIC)
            arr = np.asarray(img, dtype=np.uint8)
    except UnidentifiedImageError:
        raise GptlabError(f"{origin} is not an image Pillow can read (PNG, JPEG, ...)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise GptlabError(f"{origin} is damaged or truncated ({e}); re-export it") from None
    return arr[..., None] if arr.ndim == 2 else arr


def load_image(path: str | Path, size: int, channels: int) -> np.ndarray:
    """An image file -> uint8 [size, size, channels] (see the module docstring). Only a regular file of at most
    ``MAX_FILE_BYTES`` is read (a device such as /dev/zero, a FIFO or a folder is refused at once)."""
    data = read_input(path, "the image", MAX_FILE_BYTES)
    return decode_image(data, size, channels, f"the image {path}")


def decode_data_uri(uri: str, size: int, channels: int) -> np.ndarray:
    """An OpenAI-style ``data:image/png;base64,...`` URL -> uint8 [size, size, channels]."""
    head, sep, body = uri.partition(",")
    if not (uri.startswith("data:image/") and sep and head.endswith(";base64")):
        raise GptlabError("image_url must be a data:image/...;base64,... URI (gptlab does not fetch URLs)")
    try:
        data = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise GptlabError("image_url holds invalid base64 data") from None
    return decode_image(data, size, channels, "the image_url image")


def as_images(image, cfg) -> torch.Tensor:
    """What the Python API and the CLI accept as an image, for the model of config ``cfg``: a file path, encoded
    bytes, a uint8 array [H, W, C] / [B, H, W, C], or a float tensor [C, S, S] / [B, C, S, S] in [0, 1]
    -> float [B, C, S, S]."""
    if not cfg.image_size:
        raise GptlabError("this model takes no images (its config has image_size = 0); drop the image")
    size, channels = cfg.image_size, cfg.image_channels
    if isinstance(image, (str, Path)):
        return to_tensor(load_image(image, size, channels))
    if isinstance(image, bytes):
        return to_tensor(decode_image(image, size, channels))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (3, 4):
            raise GptlabError(
                f"an image array must be uint8 [H, W, C] or [B, H, W, C], got {image.dtype} {image.shape}"
            )
        return to_tensor(image)
    if isinstance(image, torch.Tensor):
        return image[None] if image.dim() == 3 else image
    raise GptlabError(f"cannot read an image from a {type(image).__name__}; pass a path, bytes, an array or a tensor")
