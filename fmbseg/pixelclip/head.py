"""PixelCLIP's training-only mask decoder: each class's cosine map upsampled by a small conv net."""

from __future__ import annotations

import torch
from torch import nn


def _conv_norm_relu(channels: int, groups: int) -> list[nn.Module]:
    return [
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.GroupNorm(groups, channels),
        nn.ReLU(inplace=True),
    ]


class ConvHead(nn.Module):
    """(N, 1, h, w) cosine maps -> (N, 1, 4h, 4w) logits, shared by every class.

    conv3x3 1->64; ConvTranspose 2/2 to 64; [conv3x3, GN(4), ReLU] x2; ConvTranspose 2/2 to 32;
    [conv3x3, GN(2), ReLU] x2; conv3x3 32->1 (the convolutions before a GroupNorm without bias).
    """

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        half = width // 2
        self.layers = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ConvTranspose2d(width, width, 2, stride=2),
            *_conv_norm_relu(width, 4),
            *_conv_norm_relu(width, 4),
            nn.ConvTranspose2d(width, half, 2, stride=2),
            *_conv_norm_relu(half, 2),
            *_conv_norm_relu(half, 2),
            nn.Conv2d(half, 1, 3, padding=1),
        )

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.layers(maps)
