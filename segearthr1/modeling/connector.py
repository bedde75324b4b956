"""Connectors: turn the encoder's res5 map [B, C, h, w] into LLM visual tokens [B, n, out_channels].

The default ``sparse_conv`` (reference name ``SparseConv_1``) compresses a 32x32 map to 64 tokens
(DESIGN.md §2.3). The others are ablation options that keep one token per res5 position.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..configuration import SegEarthR1Config

logger = logging.getLogger(__name__)


def _conv_out_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel_size) // stride + 1


def _flatten_map(features: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h*w, C] (row-major over h, w)."""
    if features.dim() != 4:
        raise ValueError(f"connector expects a feature map [B, C, h, w]; got shape {tuple(features.shape)}")
    return features.flatten(2).transpose(1, 2)


class _FromConfig:
    """``from_config`` shared by the connectors: res5 width -> LLM width at the config's res5 size."""

    @staticmethod
    def _config_kwargs(config: SegEarthR1Config) -> dict:
        return dict(in_channels=config.encoder_channels[-1], out_channels=config.llm_hidden_size,
                    feature_size=config.feature_sizes[-1])

    @classmethod
    def from_config(cls, config: SegEarthR1Config) -> nn.Module:
        return cls(**cls._config_kwargs(config))


class SparseConvConnector(_FromConfig, nn.Module):
    """conv(k, s) -> LN[C, s1, s1] -> conv(k, s) -> LN[C, s2, s2] -> 1x1 conv -> s2*s2 tokens.

    The LayerNorms normalise over the whole map with a per-position affine, so their shapes are part
    of the checkpoint and the input map must be exactly ``feature_size`` x ``feature_size``.
    """

    def __init__(self, *, in_channels: int, out_channels: int, feature_size: int, kernel_size: int, stride: int):
        super().__init__()
        padding = kernel_size // 2  # keeps every side >= 1, whatever the kernel and stride
        s1 = _conv_out_size(feature_size, kernel_size, stride, padding)
        s2 = _conv_out_size(s1, kernel_size, stride, padding)
        self.feature_size = feature_size
        self.proj1 = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)
        self.norm1 = nn.LayerNorm([out_channels, s1, s1])
        self.proj2 = nn.Conv2d(out_channels, out_channels, kernel_size, stride, padding)
        self.norm2 = nn.LayerNorm([out_channels, s2, s2])
        self.fc = nn.Conv2d(out_channels, out_channels, 1, 1)
        self._num_tokens = s2 * s2

    @staticmethod
    def _config_kwargs(config: SegEarthR1Config) -> dict:
        return dict(_FromConfig._config_kwargs(config), kernel_size=config.connector.kernel_size,
                    stride=config.connector.stride)

    def num_tokens(self, feature_size: int | None = None) -> int:
        """Visual tokens produced; only ``self.feature_size`` is a valid input size."""
        if feature_size is not None and feature_size != self.feature_size:
            raise ValueError(f"SparseConvConnector was built for feature_size={self.feature_size}, "
                             f"asked about {feature_size}; rebuild it with feature_size={feature_size}")
        return self._num_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 4 or tuple(features.shape[-2:]) != (self.feature_size, self.feature_size):
            raise ValueError(f"SparseConvConnector expects res5 [B, C, {self.feature_size}, {self.feature_size}] "
                             f"(its LayerNorm shapes are fixed); got {tuple(features.shape)}. Use the image size "
                             f"the connector was built for, or set feature_size to the res5 size of your images")
        x = self.norm1(self.proj1(features))
        x = self.norm2(self.proj2(x))
        return _flatten_map(self.fc(x))


class _PerPositionTokens(_FromConfig):
    """Mixin for connectors that emit one token per res5 position (no compression)."""

    feature_size: int

    def num_tokens(self, feature_size: int | None = None) -> int:
        """One token per res5 position (defaults to the size given at construction)."""
        size = self.feature_size if feature_size is None else feature_size
        return size * size

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(_flatten_map(features))


class LinearConnector(_PerPositionTokens, nn.Linear):
    """One Linear per res5 position; parameter names ``weight``/``bias`` like the reference's bare nn.Linear."""

    def __init__(self, *, in_channels: int, out_channels: int, feature_size: int):
        super().__init__(in_channels, out_channels)
        self.feature_size = feature_size


class MLPGeluConnector(_PerPositionTokens, nn.Sequential):
    """``mlp2x_gelu``: Linear -> GELU -> Linear per res5 position (names ``0.*``, ``2.*``)."""

    def __init__(self, *, in_channels: int, out_channels: int, feature_size: int):
        super().__init__(nn.Linear(in_channels, out_channels), nn.GELU(), nn.Linear(out_channels, out_channels))
        self.feature_size = feature_size


class IdentityConnector(_PerPositionTokens, nn.Module):
    """Flattened res5 map as tokens; only valid when the encoder width equals the LLM width (the
    config checks it)."""

    def __init__(self, *, in_channels: int, out_channels: int, feature_size: int):
        super().__init__()
        self.feature_size = feature_size

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return _flatten_map(features)


# Keyed by configuration.CONNECTOR_KINDS, which the config validates `connector.kind` against.
CONNECTORS: dict[str, type[nn.Module]] = {
    "sparse_conv": SparseConvConnector,
    "linear": LinearConnector,
    "mlp2x_gelu": MLPGeluConnector,
    "identity": IdentityConnector,
}


def build_connector(config: SegEarthR1Config) -> nn.Module:
    """The connector `config.connector.kind` names (the config has already mapped reference names)."""
    return CONNECTORS[config.connector.kind].from_config(config)
