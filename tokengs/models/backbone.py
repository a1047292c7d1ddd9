"""Encoder-decoder backbone: image tokens -> encoder features -> keys/values -> decoded Gaussian tokens.

    features = readout(encoder(patch tokens))                       [B, L, F]
    plain:   keys, values = split(kv_proj(features)), k_proj_norm
    latent:  latents cross-attend to split(latent_feature_kv_proj(features)) through latent_blocks
             keys, values = split(latent_kv_proj(scene latents)), k_proj_norm
    decoder: Gaussian tokens cross-attend to (keys, values) through decoder_blocks

Keys and values are kept split per head, [B, H, L, head_dim], so one projection serves every
decoder block.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tokengs.models.layers import Attention, EncoderBlock, LayerScale, Mlp, head_norm, layer_norm, merge_heads, split_heads
from tokengs.options import Options

# LayerScale of both branches (attention, MLP) of every encoder block: small, so that a block
# trained from scratch starts close to the identity.
ENCODER_LAYERSCALE = 0.01


def decoder_layerscale(opt: Options) -> float:
    """LayerScale of the decoder's (and latent blocks') branches: dec_init_values, else 5e-3 * gs_token_std."""
    return opt.dec_init_values if opt.dec_init_values is not None else 5e-3 * opt.gs_token_std


def block_causal_mask(num_static: int, num_tokens: int, device: torch.device | None = None) -> Tensor:
    """[N, N] bool, True = may attend: static tokens see only static tokens, dynamic tokens see all.

    Keeps the static Gaussians independent of the dynamic tokens, so a static scene decodes the
    same with or without them.
    """
    is_dynamic_query = torch.arange(num_tokens, device=device)[:, None] >= num_static
    is_static_key = torch.arange(num_tokens, device=device)[None, :] < num_static
    return is_dynamic_query | is_static_key


def project_keys_values(kv_proj: nn.Linear, k_norm: nn.LayerNorm, x: Tensor, num_heads: int) -> Tuple[Tensor, Tensor]:
    """x [B, L, F] -> keys, values [B, H, L, d]: one linear to 2D (keys first), LayerNorm per key head."""
    keys, values = kv_proj(x).chunk(2, dim=-1)
    return k_norm(split_heads(keys, num_heads)), split_heads(values, num_heads)


class GaussianCrossAttention(nn.Module):
    """Tokens (queries) attend to precomputed keys/values: normed token -> q_proj -> per-head q LayerNorm."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.gs_token_norm = layer_norm(dim)
        self.q_norm = head_norm(dim // num_heads)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """x [B, N, D], keys/values [B, H, L, d] -> [B, N, D] (the branch, without the residual)."""
        q = self.q_norm(split_heads(self.q_proj(self.gs_token_norm(x)), self.num_heads))
        return self.out_proj(merge_heads(F.scaled_dot_product_attention(q, keys, values)))


class PreNormSelfAttention(nn.Module):
    """norm -> self-attention (named gs_self_attn.{norm, gs_self_attn} in the release)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm = layer_norm(dim)
        self.gs_self_attn = Attention(dim, num_heads)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        return self.gs_self_attn(self.norm(x), attn_mask)


class PreNormMlp(nn.Module):
    """norm -> MLP (named mlp.{norm, mlp} in the release)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = layer_norm(dim)
        self.mlp = Mlp(dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.norm(x))


class DecoderBlock(nn.Module):
    """cross-attention to the scene -> self-attention among tokens -> MLP, each residual and LayerScaled.

    Modules are registered in the release's order (self-attention first) so state dicts list
    keys as the release does; the forward order is cross -> self -> MLP.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, init_values: float) -> None:
        super().__init__()
        self.gs_self_attn = PreNormSelfAttention(dim, num_heads)
        self.gs_self_attn_scale = LayerScale(dim, init_values)
        self.gs_cross_attn = GaussianCrossAttention(dim, num_heads)
        self.gs_cross_attn_scale = LayerScale(dim, init_values)
        self.mlp = PreNormMlp(dim, dim * mlp_ratio)
        self.mlp_scale = LayerScale(dim, init_values)

    def forward(self, x: Tensor, keys: Tensor, values: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        """x [B, N, D], keys/values [B, H, L, d], attn_mask [N, N] bool or None -> [B, N, D]."""
        x = self.gs_cross_attn_scale(x, self.gs_cross_attn(x, keys, values))
        x = self.gs_self_attn_scale(x, self.gs_self_attn(x, attn_mask))
        return self.mlp_scale(x, self.mlp(x))


class EncDecBackbone(nn.Module):
    """The release's `enc_dec_backbone`: encoder, readout, key/value projections, latent and decoder blocks."""

    def __init__(self, opt: Options) -> None:
        super().__init__()
        enc_dim, dim, heads = opt.enc_embed_dim, opt.token_dim, opt.enc_num_heads
        self.num_heads = heads
        self.activation_checkpointing = opt.activation_checkpointing
        dec_init = decoder_layerscale(opt)

        if opt.use_latent_bottleneck:
            self.latents = nn.Parameter(torch.empty(opt.num_latents, dim))
        self.encoder = nn.ModuleList(
            EncoderBlock(enc_dim, heads, opt.mlp_ratio, ENCODER_LAYERSCALE) for _ in range(opt.enc_depth))
        if opt.use_multiscale_encoder:
            self.multiscale_layers = tuple(opt.multiscale_encoder_layers)
            self.multiscale_norms = nn.ModuleList(layer_norm(enc_dim) for _ in self.multiscale_layers)
            feature_dim = enc_dim * len(self.multiscale_layers)
        else:
            self.multiscale_layers = ()
            self.encoder_norm = layer_norm(enc_dim)
            feature_dim = enc_dim
        if not opt.use_latent_bottleneck:
            self.kv_proj = nn.Linear(feature_dim, 2 * dim)
        self.k_proj_norm = head_norm(dim // heads)
        if opt.use_latent_bottleneck:
            self.latent_feature_kv_proj = nn.Linear(feature_dim, 2 * dim)
            self.latent_feature_k_norm = head_norm(dim // heads)
            self.latent_blocks = nn.ModuleList(
                DecoderBlock(dim, heads, opt.mlp_ratio, dec_init) for _ in range(opt.latent_cross_attn_depth))
            self.latent_kv_proj = nn.Linear(dim, 2 * dim)
        self.decoder_blocks = nn.ModuleList(
            DecoderBlock(dim, heads, opt.mlp_ratio, dec_init) for _ in range(opt.dec_depth))
        if opt.compile_blocks:
            # in place (Module.compile): parameter names, hence checkpoints, stay as they are
            for block in self.modules():
                if isinstance(block, (EncoderBlock, DecoderBlock)):
                    block.compile()

    def _run(self, block: Callable[..., Tensor], *args) -> Tensor:
        # Recomputing a block in backward trades compute for activation memory; same numbers.
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def encode_features(self, patch_tokens: Tensor) -> Tensor:
        """patch tokens of all context views [B, L, D_enc] -> features [B, L, F] (F = D_enc, or x layers)."""
        x = patch_tokens
        readouts = []
        for i, block in enumerate(self.encoder):
            x = self._run(block, x)
            if i in self.multiscale_layers:
                readouts.append(self.multiscale_norms[len(readouts)](x))
        return torch.cat(readouts, dim=-1) if self.multiscale_layers else self.encoder_norm(x)

    def feature_keys_values(self, features: Tensor) -> Tuple[Tensor, Tensor]:
        """Plain model: features [B, L, F] -> decoder keys, values [B, H, L, d]."""
        return project_keys_values(self.kv_proj, self.k_proj_norm, features, self.num_heads)

    def scene_latents(self, features: Tensor) -> Tensor:
        """Latent bottleneck: the learned latents cross-attend to the features -> scene latents [B, M, D]."""
        keys, values = project_keys_values(self.latent_feature_kv_proj, self.latent_feature_k_norm, features,
                                           self.num_heads)
        x = self.latents.unsqueeze(0).expand(features.shape[0], -1, -1)
        for block in self.latent_blocks:
            x = self._run(block, x, keys, values)
        return x

    def latent_keys_values(self, scene_latents: Tensor) -> Tuple[Tensor, Tensor]:
        """Scene latents [B, M, D] -> decoder keys, values [B, H, M, d]."""
        return project_keys_values(self.latent_kv_proj, self.k_proj_norm, scene_latents, self.num_heads)

    def decode(self, tokens: Tensor, keys: Tensor, values: Tensor, num_static: Optional[int] = None) -> Tensor:
        """Gaussian tokens [B, N, D] -> decoded tokens [B, N, D].

        num_static: with dynamic tokens (the last N - num_static), the self-attention is block-causal.
        """
        mask = None
        if num_static is not None and num_static < tokens.shape[1]:
            mask = block_causal_mask(num_static, tokens.shape[1], tokens.device)
        x = tokens
        for block in self.decoder_blocks:
            x = self._run(block, x, keys, values, mask)
        return x
