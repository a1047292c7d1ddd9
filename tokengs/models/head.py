"""Activation head: decoded tokens -> activated Gaussians (dec_patch_size² per token).

Raw values per Gaussian, as the release's linear lays them out:
    position (3) | rgb (3) | scale (3) | rotation (4) | opacity (1)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokengs.gaussians import PACKED_DIM, Gaussians
from tokengs.options import Options

RAW_LAYOUT = (("position", 3), ("rgb", 3), ("scale", 3), ("rotation", 4), ("opacity", 1))
POSITION_Z = 2  # index of z inside a Gaussian's raw values


def position_activation(x: Tensor) -> Tensor:
    """sign(x)·(e^|x| − 1): near-linear around 0, exponential reach for far geometry."""
    return torch.sign(x) * torch.expm1(torch.abs(x))


def inverse_position_activation(p: float) -> float:
    return math.copysign(math.log1p(abs(p)), p)


class ActivationHead(nn.Module):
    """One linear from each token to dec_patch_size² Gaussians of 14 raw values, then the activations."""

    def __init__(self, opt: Options) -> None:
        super().__init__()
        self.gaussians_per_token = opt.dec_patch_size**2
        self.opacity_bias = opt.opacity_bias
        self.scale_cap = opt.gaussian_scale_cap
        self.z_offset = opt.gaussian_z_offset
        self.readout_std = opt.clip_head_readout_std
        self.z_init = opt.clip_head_z_init
        self.deconv = nn.Linear(opt.token_dim, self.gaussians_per_token * PACKED_DIM)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.deconv.weight, std=self.readout_std)
        nn.init.zeros_(self.deconv.bias)
        if self.z_init is not None:
            # start every Gaussian at depth z_init in front of the camera: the position activation's inverse
            self.deconv.bias.view(self.gaussians_per_token, PACKED_DIM)[:, POSITION_Z] = \
                inverse_position_activation(self.z_init)

    def forward(self, tokens: Tensor) -> Gaussians:
        """tokens [B, N, D] -> Gaussians with N·dec_patch_size² entries (token-major order)."""
        B, N, _ = tokens.shape
        raw = self.deconv(tokens).view(B, N * self.gaussians_per_token, PACKED_DIM)
        position, rgb, scale, rotation, opacity = raw.split([width for _, width in RAW_LAYOUT], dim=-1)
        means = position_activation(position)
        means = torch.cat([means[..., :POSITION_Z], means[..., POSITION_Z:] + self.z_offset], dim=-1)
        # min(exp(x - 1 + ln cap), cap): a raw value of 1 reaches the cap, larger ones stay there
        scales = torch.clamp(torch.exp(scale - 1.0 + math.log(self.scale_cap)), max=self.scale_cap)
        return Gaussians(
            means=means,
            opacities=torch.sigmoid(opacity.squeeze(-1) - self.opacity_bias),
            scales=scales,
            quats=F.normalize(rotation, dim=-1),
            colors=0.5 * torch.tanh(rgb) + 0.5,
        )
