"""Models that keep a conv's bias somewhere other than the conv (issue 9), and distractors that
must not be taken for one.  Module level, so that ``torch.save(model)`` can pickle them."""

from __future__ import annotations

import torch
from torch import nn


class SpatialBias(nn.Module):
    """A separate bias module: ``x + self.bias``, the way modern code writes a per-location bias."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(*shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class ChannelBias(nn.Module):
    """A separate tied bias of shape [C], viewed as [1, C, 1, 1] before the add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias.view(1, -1, 1, 1)


class Block(nn.Module):
    """Not a Sequential: a bias-free conv, then a bias module registered and applied after it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 5, bias=False)
        self.shift = SpatialBias(32, 28, 28)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.shift(self.conv(x))
        return out


class InPlaceAdd(nn.Module):
    """An in-place add of a parameter whose name says nothing (``b``): only code and graphs tell."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 5, bias=False)
        self.b = nn.Parameter(torch.zeros(32, 28, 28))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.conv(x)
        y.add_(self.b)
        return y


class PositionalEmbedding(nn.Module):
    """Distractor: a parameter of the conv's output shape added to its INPUT (C_in = C_out)."""

    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(8, 16, 16))
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x + self.pos_embed)
        return out


class PositionalBias(nn.Module):
    """Distractor with a misleading name: ``pos_bias`` [8, 16, 16] added to the conv's input, a
    state dict indistinguishable from ``conv(x) + self.pos_bias`` (an untied bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.pos_bias = nn.Parameter(torch.zeros(8, 16, 16))
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x + self.pos_bias)
        return out


class Residual(nn.Module):
    """Distractor: a residual add of activations, no parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.conv(x)
        return out


class ParentBiasBeforeNorm(nn.Module):
    """``bias_c`` [8, 6, 6] is c's untied bias; ``d`` [4, 8, 3, 3] is a Conv (its BatchNorm has width
    4), but read alone its weight fits a ConvTranspose of width 8 too (issue 9, item 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, bias=False)
        self.bias_c = nn.Parameter(torch.zeros(8, 6, 6))
        self.d = nn.Conv2d(8, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn(self.d(self.c(x) + self.bias_c))
        return out


def seed_separate_bias() -> nn.Module:
    """The seed's untied layer as modern code writes it: a bias-free Conv2d(3, 32, 5) and a
    separate [32, 28, 28] bias module (27,488 parameters for a 3x32x32 input)."""
    return nn.Sequential(nn.Conv2d(3, 32, 5, bias=False), SpatialBias(32, 28, 28))


def make_patterns() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Pattern name -> (model, input shape).  Weights seeded; the models are tiny."""
    torch.manual_seed(0)
    seed_input = (1, 3, 32, 32)
    small_input = (1, 8, 16, 16)
    return {
        "seed": (seed_separate_bias(), seed_input),
        "issue": (
            nn.Sequential(
                nn.Conv2d(3, 32, 5, bias=False), SpatialBias(32, 28, 28), nn.ReLU(), nn.Conv2d(32, 8, 3)
            ),
            seed_input,
        ),
        "tied_view": (nn.Sequential(nn.Conv2d(3, 32, 5, bias=False), ChannelBias(32)), seed_input),
        "tied_c11": (nn.Sequential(nn.Conv2d(3, 32, 5, bias=False), SpatialBias(32, 1, 1)), seed_input),
        "tied_1c11": (nn.Sequential(nn.Conv2d(3, 32, 5, bias=False), SpatialBias(1, 32, 1, 1)), seed_input),
        "block": (Block(), seed_input),
        "own_plus_add": (nn.Sequential(nn.Conv2d(3, 32, 5), SpatialBias(32, 28, 28)), seed_input),
        "in_place": (InPlaceAdd(), seed_input),
        "pos_module": (
            nn.Sequential(SpatialBias(8, 16, 16), nn.Conv2d(8, 8, 3, padding=1, bias=False)),
            small_input,
        ),
        "pos_param": (PositionalEmbedding(), small_input),
        "pos_bias_named": (PositionalBias(), small_input),
        "residual": (Residual(), small_input),
        "layer_norm": (
            nn.Sequential(nn.Conv2d(3, 32, 5, bias=False), nn.LayerNorm([32, 28, 28])),
            seed_input,
        ),
        "group_norm": (nn.Sequential(nn.Conv2d(3, 32, 5, bias=False), nn.GroupNorm(4, 32)), seed_input),
    }
