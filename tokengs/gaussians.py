"""The typed Gaussians container and the release's 14-number packing.

Packed layout (what checkpoints, fixtures and the release's code exchange), per Gaussian:
    means xyz (3) | opacity (1) | scales xyz (3) | quaternion w x y z (4) | rgb (3)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import Tensor

PACKED_DIM = 14
# Field name -> width in the packed layout, in packing order.
PACKED_LAYOUT = (("means", 3), ("opacities", 1), ("scales", 3), ("quats", 4), ("colors", 3))


@dataclass
class Gaussians:
    """A batch of activated 3D Gaussians; leading dimensions [...] are shared (usually [B])."""

    means: Tensor  # [..., N, 3] world positions
    opacities: Tensor  # [..., N] in (0, 1)
    scales: Tensor  # [..., N, 3] standard deviations along the local axes
    quats: Tensor  # [..., N, 4] unit quaternions, w x y z
    colors: Tensor  # [..., N, 3] rgb in [0, 1]

    @classmethod
    def unpack(cls, packed: Tensor) -> "Gaussians":
        """[..., N, 14] -> Gaussians (views into `packed`, no copy)."""
        if packed.shape[-1] != PACKED_DIM:
            raise ValueError(f"packed Gaussians need {PACKED_DIM} values each, got shape {tuple(packed.shape)}")
        parts = torch.split(packed, [width for _, width in PACKED_LAYOUT], dim=-1)
        values = {name: part for (name, _), part in zip(PACKED_LAYOUT, parts)}
        values["opacities"] = values["opacities"].squeeze(-1)
        return cls(**values)

    def pack(self) -> Tensor:
        """Gaussians -> [..., N, 14] in the release's order."""
        return torch.cat([self.means, self.opacities.unsqueeze(-1), self.scales, self.quats, self.colors], dim=-1)

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[-2]

    @property
    def batch_shape(self) -> torch.Size:
        return self.means.shape[:-2]

    def map(self, fn: Callable[[Tensor], Tensor]) -> "Gaussians":
        """Apply `fn` to every field (e.g. `.map(Tensor.detach)`)."""
        return Gaussians(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def select(self, index) -> "Gaussians":
        """Gaussians along the N axis: a slice, an index tensor or a boolean mask over N."""
        return Gaussians(
            means=self.means[..., index, :],
            opacities=self.opacities[..., index],
            scales=self.scales[..., index, :],
            quats=self.quats[..., index, :],
            colors=self.colors[..., index, :],
        )

    def scene(self, b: int) -> "Gaussians":
        """The Gaussians of scene `b` of a batch [B, N, ...] -> [N, ...]."""
        return self.map(lambda t: t[b])

    @staticmethod
    def cat(parts: list["Gaussians"]) -> "Gaussians":
        """Concatenate along the N axis."""
        return Gaussians(
            means=torch.cat([p.means for p in parts], dim=-2),
            opacities=torch.cat([p.opacities for p in parts], dim=-1),
            scales=torch.cat([p.scales for p in parts], dim=-2),
            quats=torch.cat([p.quats for p in parts], dim=-2),
            colors=torch.cat([p.colors for p in parts], dim=-2),
        )


# ---------------------------------------------------------------------------------------------
# PLY I/O in the layout 3DGS viewers read: x y z | f_dc_0..2 | opacity (logit) | scale_0..2 (log)
# | rot_0..3 (w x y z). Colours are stored as degree-0 spherical-harmonic coefficients.
# ---------------------------------------------------------------------------------------------

SH_C0 = 0.28209479177387814  # the degree-0 spherical harmonic, 1 / (2 sqrt(pi))
PLY_MIN_OPACITY = 0.005  # Gaussians fainter than this are left out of exported files
PLY_FIELDS = ("x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
              "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")


def save_ply(gaussians: Gaussians, path) -> int:
    """Write the Gaussians of ONE scene (fields [N, ...]) to `path`; returns how many were written."""
    import numpy as np
    from plyfile import PlyData, PlyElement

    if gaussians.means.dim() != 2:
        raise ValueError(f"save_ply takes one scene's Gaussians [N, ...], got means of shape {tuple(gaussians.means.shape)}; "
                         "pick one with gaussians.scene(b)")
    kept = gaussians.select(gaussians.opacities >= PLY_MIN_OPACITY).map(lambda t: t.detach().cpu().double())
    # float64 for the transforms so that opacities near 1 keep a finite logit
    opacity = kept.opacities.clamp(1e-12, 1 - 1e-12)
    columns = torch.cat([kept.means, (kept.colors - 0.5) / SH_C0, torch.logit(opacity)[:, None],
                         torch.log(kept.scales), kept.quats], dim=1).float().numpy()
    vertices = np.empty(len(columns), dtype=[(name, "f4") for name in PLY_FIELDS])
    for i, name in enumerate(PLY_FIELDS):
        vertices[name] = columns[:, i]
    PlyData([PlyElement.describe(vertices, "vertex")]).write(str(path))
    return len(columns)


def load_ply(path) -> Gaussians:
    """Read a PLY written by `save_ply` (or any 3DGS PLY; higher SH bands are ignored) -> Gaussians [N, ...]."""
    import numpy as np
    from plyfile import PlyData

    vertex = PlyData.read(str(path))["vertex"]
    column = lambda *names: torch.from_numpy(np.stack([np.asarray(vertex[n], dtype=np.float32) for n in names], axis=1))
    return Gaussians(
        means=column("x", "y", "z"),
        opacities=torch.sigmoid(column("opacity")[:, 0]),
        scales=torch.exp(column("scale_0", "scale_1", "scale_2")),
        quats=column("rot_0", "rot_1", "rot_2", "rot_3"),
        colors=column("f_dc_0", "f_dc_1", "f_dc_2") * SH_C0 + 0.5,
    )
