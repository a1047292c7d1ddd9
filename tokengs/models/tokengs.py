"""The TokenGS model: posed context views -> a fixed number of 3D Gaussians, in one forward pass.

    Batch (tokengs.data.types): context views (RGB, Plücker rays, times) and the targets' times
      encode(batch)    -> SceneEncoding (decoder keys/values, or scene latents; target-time token offsets)
      decode(encoding) -> packed Gaussians [B, (num_gs_tokens + num_dynamic_gs_tokens)·dec_patch_size², 14]

Encoding and decoding are separate so test-time tuning can encode once and decode many times
with tuned tokens or scene latents. Parameter names are the release's, so that its checkpoints load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from tokengs.data.types import Batch
from tokengs.gaussians import Gaussians
from tokengs.models.backbone import EncDecBackbone
from tokengs.models.encoder_input import (PLUCKER_CHANNELS, RGB_CHANNELS, normalized_rgb, time_channels,
                                          view_time_embeddings)
from tokengs.models.head import ActivationHead
from tokengs.models.layers import LayerScale, PatchEmbed
from tokengs.options import Options

LATENT_INIT_STD = 0.02
# std of the truncated normal that starts every other linear layer (timm's ViT convention)
LINEAR_INIT_STD = 0.02


@dataclass
class SceneEncoding:
    """What `decode` needs from the context views; reusable across many decodes.

    Plain models carry keys/values; latent-bottleneck models carry the scene latents (re-projected
    to keys/values at decode time, so tuned latents can replace them).
    """

    keys: Optional[Tensor] = None  # [B, H, L, head_dim]
    values: Optional[Tensor] = None  # [B, H, L, head_dim]
    scene_latents: Optional[Tensor] = None  # [B, num_latents, D]
    target_time_tokens: Optional[Tensor] = None  # [B, n, D], added to the dynamic (or all) tokens

    @property
    def batch_size(self) -> int:
        return (self.keys if self.keys is not None else self.scene_latents).shape[0]


class TokenGS(nn.Module):
    """Patch embeddings + `enc_dec_backbone` + `activation_head`, with the learned Gaussian tokens.

    Never holds LPIPS (the losses own it), so state dicts carry only the model's weights.
    """

    def __init__(self, opt: Options) -> None:
        super().__init__()
        self.opt = opt
        enc_dim, dim, patch = opt.enc_embed_dim, opt.token_dim, opt.patch_size
        self.num_static_tokens = opt.num_gs_tokens
        self.num_dynamic_tokens = opt.num_dynamic_gs_tokens
        self.time_channels = opt.time_embedding_dim if opt.time_embedding else 0

        self.gs_tokens = nn.Parameter(torch.empty(opt.num_gs_tokens, dim))
        if self.num_dynamic_tokens > 0:
            self.gs_tokens_dynamic = nn.Parameter(torch.empty(self.num_dynamic_tokens, dim))
        self.patch_embed = PatchEmbed(RGB_CHANNELS, enc_dim, patch)
        self.patch_plucker_embed = PatchEmbed(PLUCKER_CHANNELS, enc_dim, patch)
        if opt.time_embedding:
            self.patch_time_embed = PatchEmbed(self.time_channels, enc_dim, patch, norm=False)
            self.patch_time_embed_tgt = PatchEmbed(self.time_channels, dim, patch, norm=False)
        self.enc_dec_backbone = EncDecBackbone(opt)
        self.activation_head = ActivationHead(opt)
        self.reset_parameters()

    # ---- initialization (training from scratch) ---------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=LINEAR_INIT_STD)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                # a patch conv is a linear over the flattened patch
                nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LayerScale):
                module.reset_parameters()
        nn.init.normal_(self.gs_tokens, std=self.opt.gs_token_std)
        if self.num_dynamic_tokens > 0:
            nn.init.normal_(self.gs_tokens_dynamic, std=self.opt.gs_token_std)
        if self.opt.use_latent_bottleneck:
            nn.init.normal_(self.enc_dec_backbone.latents, std=LATENT_INIT_STD)
        if self.opt.time_embedding:
            # zero time embeddings: a static model finetuned into a dynamic one starts unchanged
            for embed in (self.patch_time_embed, self.patch_time_embed_tgt):
                nn.init.zeros_(embed.proj.weight)
                nn.init.zeros_(embed.proj.bias)
        self.activation_head.reset_parameters()

    # ---- the steps -----------------------------------------------------------------------------
    def embed_context(self, batch: Batch) -> Tensor:
        """Context views -> one patch-token sequence per scene [B, V_in·P, D_enc] (no positional embedding)."""
        context = batch.context
        B, V = context.images.shape[:2]
        tokens = (self.patch_embed(normalized_rgb(context.images.flatten(0, 1)))
                  + self.patch_plucker_embed(context.rays.flatten(0, 1)))
        if self.opt.time_embedding:
            times = view_time_embeddings(batch, self.time_channels)[:, :V]
            tokens = tokens + self.patch_time_embed(time_channels(times.flatten(0, 1), context.image_hw))
        return tokens.reshape(B, V * tokens.shape[1], tokens.shape[2])

    def target_time_tokens(self, batch: Batch) -> Optional[Tensor]:
        """The first target view's time -> offsets for the dynamic tokens (or all) [B, n, D]."""
        if not self.opt.time_embedding:
            return None
        if batch.target.num_views == 0:
            raise ValueError("time_embedding decodes the Gaussians at the first target view's time; the batch "
                             "has no target view")
        first_target = view_time_embeddings(batch, self.time_channels)[:, batch.context.num_views]
        patch_tokens = self.patch_time_embed_tgt(time_channels(first_target, batch.target.image_hw))
        count = self.num_dynamic_tokens or self.num_static_tokens
        if patch_tokens.shape[1] < count:
            raise ValueError(f"the target time embedding has {patch_tokens.shape[1]} patches, fewer than the "
                             f"{count} tokens it offsets; use a larger img_size or fewer tokens")
        return patch_tokens[:, :count]

    def encode(self, batch: Batch) -> SceneEncoding:
        features = self.enc_dec_backbone.encode_features(self.embed_context(batch))
        time_tokens = self.target_time_tokens(batch)
        if self.opt.use_latent_bottleneck:
            return SceneEncoding(scene_latents=self.enc_dec_backbone.scene_latents(features),
                                 target_time_tokens=time_tokens)
        keys, values = self.enc_dec_backbone.feature_keys_values(features)
        return SceneEncoding(keys=keys, values=values, target_time_tokens=time_tokens)

    def learned_tokens(self) -> Tensor:
        """The Gaussian tokens, static then dynamic [num_gs_tokens + num_dynamic_gs_tokens, D]."""
        if self.num_dynamic_tokens > 0:
            return torch.cat([self.gs_tokens, self.gs_tokens_dynamic], dim=0)
        return self.gs_tokens

    def decode(self, encoding: SceneEncoding, gs_tokens: Optional[Tensor] = None,
               scene_latents: Optional[Tensor] = None, use_target_time: bool = True) -> Tensor:
        """-> packed Gaussians [B, N, 14].

        gs_tokens [B or 1, num_gs_tokens (+ dynamic), D] replaces the learned tokens; scene_latents
        [B, num_latents, D] replaces the encoding's; use_target_time=False leaves out the target
        time embedding (test-time tuning renders the context views).
        """
        B = encoding.batch_size
        tokens = self.learned_tokens().unsqueeze(0) if gs_tokens is None else gs_tokens
        expected = self.num_static_tokens + self.num_dynamic_tokens
        if tokens.shape[-2] != expected:
            raise ValueError(f"gs_tokens holds {tokens.shape[-2]} tokens; this model decodes {expected} "
                             f"({self.num_static_tokens} static + {self.num_dynamic_tokens} dynamic)")
        tokens = tokens.expand(B, -1, -1)
        time_tokens = encoding.target_time_tokens if use_target_time else None
        if time_tokens is not None:
            if self.num_dynamic_tokens > 0:
                S = self.num_static_tokens
                tokens = torch.cat([tokens[:, :S], tokens[:, S:] + time_tokens], dim=1)
            else:
                tokens = tokens + time_tokens
        if self.opt.use_latent_bottleneck:
            latents = encoding.scene_latents if scene_latents is None else scene_latents
            keys, values = self.enc_dec_backbone.latent_keys_values(latents)
        else:
            keys, values = encoding.keys, encoding.values
        num_static = self.num_static_tokens if self.num_dynamic_tokens > 0 else None
        decoded = self.enc_dec_backbone.decode(tokens, keys, values, num_static)
        return self.activation_head(decoded).pack()

    def forward_gaussians(self, batch: Batch) -> Tensor:
        """-> activated, packed Gaussians [B, N, 14]."""
        return self.decode(self.encode(batch))

    def gaussians(self, batch: Batch) -> Gaussians:
        return Gaussians.unpack(self.forward_gaussians(batch))

    def forward(self, batch: Batch) -> Tensor:
        return self.forward_gaussians(batch)

    @property
    def num_gaussians(self) -> int:
        return self.opt.num_gaussians

    @property
    def num_static_gaussians(self) -> int:
        """The Gaussians decoded from the static tokens: the first ones of the packed set, the dynamic ones follow."""
        return self.num_static_tokens * self.opt.dec_patch_size**2

    def dynamic_gaussian_mask(self) -> Tensor:
        """[N] bool over the packed Gaussians: True for those decoded from dynamic tokens."""
        mask = torch.zeros(self.num_gaussians, dtype=torch.bool)
        mask[self.num_static_gaussians:] = True
        return mask
