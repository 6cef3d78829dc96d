"""The image prefix: pixels -> a sequence of ``n_embd`` vectors placed before the text, GPT-4 style.

The default follows Fuyu (Bavishi et al. 2023, "Fuyu-8B"): the image is cut into ``patch_size`` x ``patch_size``
patches, each patch's raw pixels are mapped by one linear layer into the decoder's embedding space, and a learned
2-D position (a row vector plus a column vector) tells the decoder where each patch sits. There is no vision tower.
``image_encoder="cnn"`` first runs a residual block of two 3x3 convolutions over the pixels (He et al. 2016; at the
default width, the image's channels, the block adds its output to the pixels, so the patches still see them);
``projector="mlp"``
swaps the linear map for LLaVA-1.5's Linear-GELU-Linear projector (Liu et al. 2023, "Improved Baselines with
Visual Instruction Tuning").

The decoder is unchanged: the prefix occupies the first ``image_tokens`` positions, patches in raster order, and
is attended to causally like text; the model returns logits and loss for the text positions only, so image tokens
carry no loss. Images enter as float tensors [B, channels, size, size] with values in [0, 1]
(:func:`gptlab.data.image_files.to_tensor` converts uint8 arrays).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import GPTConfig
from .errors import GptlabError


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), p*p*C]: patches in raster order, each flattened (row, column, channel)."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(patches: torch.Tensor, patch: int, size: int, channels: int) -> torch.Tensor:
    """The inverse of :func:`patchify` for square images of side ``size``."""
    B, g = patches.size(0), size // patch
    x = patches.reshape(B, g, g, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, size, size)


class ImagePrefix(nn.Module):
    """Images [B, C, S, S] -> prefix embeddings [B, (S/p)^2, n_embd] (see the module docstring)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.size, self.channels, self.patch = cfg.image_size, cfg.image_channels, cfg.patch_size
        C, grid = cfg.n_embd, cfg.image_size // cfg.patch_size
        feat = cfg.image_channels
        self.encoder: nn.Module | None = None
        if cfg.image_encoder == "cnn":
            feat = cfg.encoder_width or cfg.image_channels
            self.encoder = nn.Sequential(
                nn.Conv2d(cfg.image_channels, feat, 3, padding=1),
                nn.GELU(),
                nn.Conv2d(feat, feat, 3, padding=1),
            )
        d_in = feat * cfg.patch_size**2
        self.proj = (
            nn.Linear(d_in, C)
            if cfg.projector == "linear"
            else nn.Sequential(nn.Linear(d_in, C), nn.GELU(), nn.Linear(C, C))
        )
        self.row = nn.Parameter(torch.empty(grid, C))  # learned 2-D position: row part ...
        self.col = nn.Parameter(torch.empty(grid, C))  # ... plus column part
        self.reset_parameters(cfg.init_std)

    def reset_parameters(self, std: float = 0.02) -> None:
        """PyTorch's default initialization for the convolutions and the projector (scaled to their fan-in, so
        pixels in [0, 1] give unit-scale features); N(0, std) for the positions, like GPT-2's."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.reset_parameters()
        nn.init.normal_(self.row, 0.0, std)
        nn.init.normal_(self.col, 0.0, std)

    def check(self, images: torch.Tensor) -> None:
        want = (self.channels, self.size, self.size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise GptlabError(
                f"images of shape {list(images.shape)} do not fit this model, which takes [batch, {want[0]}, "
                f"{want[1]}, {want[2]}] ({(self.size // self.patch) ** 2} patches of {self.patch}x{self.patch}); "
                f"resize them (gptlab.data.image_files.load_image does)"
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.check(images)
        x = images.to(self.row.dtype)
        if self.encoder is not None:
            y = self.encoder(x)
            x = x + y if y.shape == x.shape else y  # residual where the widths match
        pos = (self.row[:, None] + self.col[None, :]).flatten(0, 1)  # [grid * grid, C], raster order
        return self.proj(patchify(x, self.patch)) + pos

    @staticmethod
    def prepend(prefix: torch.Tensor, text: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's input [B, P + T, C]: the prefix [B, P, C], then the text embeddings [B, T, C]. Rows that
        are left-padded by ``pad`` [B] slots (a batch of prompts of unequal length) keep their padding first, so
        each row reads (padding, image, text) and decodes as it would alone."""
        x = torch.cat([prefix, text], 1)
        if pad is None or not bool(pad.any()):
            return x
        P, j = prefix.size(1), torch.arange(x.size(1), device=x.device)
        p = pad[:, None]
        source = torch.where(j < p, P + j, torch.where(j < p + P, j - p, j))  # [B, P + T]
        return x.gather(1, source[..., None].expand(-1, -1, x.size(2)))
