"""Building blocks shared by the encoder and decoder: attention, MLP, LayerScale, patch embeddings.

Attribute names (qkv, q_norm, k_norm, proj, fc1, fc2, gamma, norm) are the release's parameter
names: checkpoints load into these modules as they are.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokengs.models import head_norm_kernel

# torch's default eps. The parity fixtures pin it: timm's 1e-6 is off by ~1e-5 relative,
# 1e-5 reproduces them to ~5e-7.
LN_EPS = 1e-5


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LN_EPS)


class HeadNorm(nn.LayerNorm):
    """The LayerNorm over each attention head's queries or keys, kept in the activations' half
    precision under autocast.

    Autocast runs LayerNorm in float32, so every per-head norm would turn the bf16 queries and
    keys of the linear before it into float32 and attention would convert them back: two copies
    of q and k per attention. Here a bf16/fp16 input is normalized in its own dtype (the kernel
    accumulates its statistics in float32) and goes to attention as it is. Float32 inputs (no
    autocast, the parity fixtures) take nn.LayerNorm's path unchanged. Same parameters and names.
    On a GPU the half-precision case runs head_norm_kernel's Triton kernel (torch's own is slow
    on rows this short).
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type):
            if head_norm_kernel.supports(x):
                out = head_norm_kernel.head_layer_norm(x, self.weight, self.bias, self.eps)
                if out is not None:
                    return out
            with torch.autocast(x.device.type, enabled=False):
                return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        return super().forward(x)


def head_norm(head_dim: int) -> HeadNorm:
    return HeadNorm(head_dim, eps=LN_EPS)


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, L, H*d] -> [B, H, L, d]."""
    B, L, _ = x.shape
    return x.view(B, L, num_heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[B, H, L, d] -> [B, L, H*d]."""
    B, H, L, d = x.shape
    return x.transpose(1, 2).reshape(B, L, H * d)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and a LayerNorm over each head's q and k."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = head_norm(head_dim)
        self.k_norm = head_norm(head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        """x [B, L, D], attn_mask [L, L] bool (True = may attend) or None -> [B, L, D]."""
        B, L, D = x.shape
        # qkv channels are laid out (q|k|v, head, head_dim)
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(merge_heads(out))


class Mlp(nn.Module):
    """D -> hidden -> D with GELU."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch, started small so each block begins near identity.

    Called as (residual, branch) -> residual + gamma * branch. Without autograd that is one
    addcmul kernel instead of a float32 product written out and read back (2% of a latent
    reconstruction on an H200); with it, addcmul's backward raised a training step's peak memory
    (+1.6 GiB at 6-view batch 4) for no measurable time, so training keeps the product.
    """

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, residual: Tensor, branch: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return residual + branch * self.gamma
        return torch.addcmul(residual, branch, self.gamma)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: conv (kernel = stride = patch_size), then an optional LayerNorm.

    [B, C, H, W] -> [B, (H/p)*(W/p), D], patches in row-major order.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int, norm: bool = True) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = layer_norm(dim) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class EncoderBlock(nn.Module):
    """Pre-norm ViT block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, init_values: float) -> None:
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, L, D] -> [B, L, D]."""
        x = self.ls1(x, self.attn(self.norm1(x)))
        return self.ls2(x, self.mlp(self.norm2(x)))
