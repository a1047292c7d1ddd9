"""gsplat (CUDA) against the pure-PyTorch rasterizer, and the scenes both render.

    python scripts/render_parity.py --out parity.json [--fixtures DIR]

For every scene (random ones, and the release fixtures' Gaussians when found): mean / max
absolute difference of images, alphas, depths (where both alphas > 0.5) and visible means2d,
how often both cull alike, and the cosine similarity of the gradients w.r.t. every Gaussian
field for a colour loss and a depth loss. Exits non-zero when a bound of THRESHOLDS is violated.
tests/test_gpu_parity.py asserts the same bounds; the CPU tests render the random scenes too.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from tokengs.cli import CommandParser  # noqa: E402
from tokengs.gaussians import Gaussians  # noqa: E402
from tokengs.rendering import render  # noqa: E402


@dataclass
class Scene:
    """Gaussians [B, N] and cameras [B, V] to render them into."""

    name: str
    gaussians: Gaussians
    w2c: Tensor  # [B, V, 4, 4]
    intrinsics: Tensor  # [B, V, 4]
    image_hw: tuple[int, int]
    bg_color: tuple[float, float, float] = (0.5, 0.5, 0.5)
    znear: float = 0.025
    zfar: float = 125.0

    def to(self, device) -> "Scene":
        return Scene(self.name, self.gaussians.map(lambda t: t.to(device)), self.w2c.to(device),
                     self.intrinsics.to(device), self.image_hw, self.bg_color, self.znear, self.zfar)


def look_at_w2c(eyes: Tensor, target: Tensor) -> Tensor:
    """World-to-camera [..., 4, 4] (OpenCV: x right, y down, z forward) of cameras at eyes [..., 3]
    looking at target [3], with world -y as up."""
    forward = F.normalize(target - eyes, dim=-1)
    right = F.normalize(torch.cross(forward, torch.tensor([0.0, -1.0, 0.0]).expand_as(forward), dim=-1), dim=-1)
    down = torch.cross(forward, right, dim=-1)
    rot = torch.stack([right, down, forward], dim=-2)  # rows: camera axes in world coordinates
    w2c = torch.eye(4).repeat(*eyes.shape[:-1], 1, 1)
    w2c[..., :3, :3] = rot
    w2c[..., :3, 3] = -(rot @ eyes[..., None])[..., 0]
    return w2c


def random_scene(name: str, num_scenes: int, num_gaussians: int, num_views: int, image_hw: tuple[int, int],
                 seed: int = 0, scale_range: tuple[float, float] = (0.01, 0.08), principal_offset: float = 0.0,
                 znear: float = 0.025, zfar: float = 125.0) -> Scene:
    """Gaussians in a unit cube around the origin, seen by cameras 3 units away looking at it.

    principal_offset moves (cx, cy) by that fraction of the image size (off-center cameras)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=gen)
    lo, hi = scale_range
    gaussians = Gaussians(
        means=rand(num_scenes, num_gaussians, 3) * 2 - 1,
        opacities=rand(num_scenes, num_gaussians) * 0.98 + 0.01,
        scales=lo + (hi - lo) * rand(num_scenes, num_gaussians, 3),
        quats=torch.randn(num_scenes, num_gaussians, 4, generator=gen),
        colors=rand(num_scenes, num_gaussians, 3),
    )
    angles = rand(num_scenes, num_views) * 2 * torch.pi
    eyes = torch.stack([3 * angles.cos(), rand(num_scenes, num_views) - 0.5, 3 * angles.sin()], dim=-1)
    w2c = look_at_w2c(eyes, torch.zeros(3))
    height, width = image_hw
    focal = 1.2 * max(height, width) * (0.8 + 0.4 * rand(num_scenes, num_views))
    cx = width * (0.5 + principal_offset) + torch.zeros_like(focal)
    cy = height * (0.5 - principal_offset) + torch.zeros_like(focal)
    intrinsics = torch.stack([focal, focal, cx, cy], dim=-1)
    return Scene(name, gaussians, w2c, intrinsics, image_hw, znear=znear, zfar=zfar)


def random_cases() -> list[Scene]:
    """The random scenes of the parity check: sizes, footprints, off-center cameras, near/far planes cutting the scene."""
    return [
        random_scene("small", 2, 500, 3, (64, 64), seed=1),
        random_scene("wide_20k", 1, 20000, 2, (128, 224), seed=2, scale_range=(0.005, 0.03)),
        random_scene("big_gaussians", 2, 300, 2, (48, 80), seed=3, scale_range=(0.1, 0.4)),
        random_scene("off_center", 1, 2000, 3, (96, 64), seed=4, principal_offset=0.2),
        random_scene("near_far_cut", 1, 2000, 2, (64, 64), seed=5, znear=2.6, zfar=3.4),
    ]


def fixture_cases(reference_dir: Path) -> list[Scene]:
    """The release's Gaussians and target cameras from the model fixtures (img_size 32x48, grey background)."""
    from safetensors.torch import load_file

    from tokengs.data.release_batch import from_release_dict

    cases = []
    for name in ("plain", "latent"):
        tensors = load_file(str(Path(reference_dir) / f"model_{name}.io.safetensors"))
        batch = from_release_dict({k.removeprefix("batch."): v for k, v in tensors.items() if k.startswith("batch.")})
        targets = batch.target
        cases.append(Scene(f"fixture_{name}", Gaussians.unpack(tensors["out.gaussians"]), targets.w2c,
                           targets.intrinsics, targets.image_hw))
    return cases


def _cosine(a: Tensor, b: Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    if a.norm() == 0 and b.norm() == 0:
        return 1.0
    return float(F.cosine_similarity(a, b, dim=0))


def compare_backends(scene: Scene, seed: int = 0) -> dict:
    """Render `scene` (on CUDA) with gsplat and with the torch rasterizer and compare.

    Returns, per output (images, alphas, depths where both alphas > 0.5, means2d of Gaussians
    visible in both), the mean and max absolute difference; the fraction of (view, Gaussian)
    pairs culled alike; and, for two scalar losses (random weights on images and alphas; on
    depths), the cosine similarity of the gradients w.r.t. every Gaussian field.
    """
    outputs, grads = {}, {}
    weights: Optional[dict] = None
    for backend in ("gsplat", "torch"):
        gaussians = scene.gaussians.map(lambda t: t.detach().clone().requires_grad_())
        out = render(gaussians, scene.w2c, scene.intrinsics, scene.image_hw, scene.bg_color, scene.znear, scene.zfar,
                     backend=backend)
        if weights is None:
            gen = torch.Generator(device=out.images.device).manual_seed(seed)
            weights = {k: torch.rand(getattr(out, k).shape, generator=gen, device=out.images.device)
                       for k in ("images", "alphas", "depths")}
        field_list = [gaussians.means, gaussians.opacities, gaussians.scales, gaussians.quats, gaussians.colors]
        color_loss = (weights["images"] * out.images).sum() + (weights["alphas"] * out.alphas).sum()
        depth_loss = (weights["depths"] * out.depths).sum()
        names = ("means", "opacities", "scales", "quats", "colors")
        grads[backend] = {
            "color": dict(zip(names, torch.autograd.grad(color_loss, field_list, retain_graph=True, allow_unused=True))),
            "depth": dict(zip(names, torch.autograd.grad(depth_loss, field_list, allow_unused=True))),
        }
        outputs[backend] = out.map(Tensor.detach)
    ours, ref = outputs["torch"], outputs["gsplat"]

    def diff(a: Tensor, b: Tensor) -> dict:
        d = (a.double() - b.double()).abs()
        return {"mean_abs": float(d.mean()) if d.numel() else 0.0, "max_abs": float(d.max()) if d.numel() else 0.0}

    both_visible = (ours.radii > 0).all(-1) & (ref.radii > 0).all(-1)
    solid = (ours.alphas > 0.5) & (ref.alphas > 0.5)
    report = {
        "scene": scene.name,
        "shape": {"scenes": scene.w2c.shape[0], "views": scene.w2c.shape[1], "gaussians": scene.gaussians.num_gaussians,
                  "image_hw": list(scene.image_hw)},
        "images": diff(ours.images, ref.images),
        "alphas": diff(ours.alphas, ref.alphas),
        "depths_where_alpha_gt_0.5": diff(ours.depths[solid], ref.depths[solid]),
        "means2d_visible": diff(ours.means2d[both_visible], ref.means2d[both_visible]),
        "culling_agreement": float(((ours.radii > 0).all(-1) == (ref.radii > 0).all(-1)).double().mean()),
        "grad_cosine": {
            loss: {name: _cosine(grads["torch"][loss][name], grads["gsplat"][loss][name])
                   if grads["gsplat"][loss][name] is not None and grads["torch"][loss][name] is not None else None
                   for name in grads["gsplat"][loss]}
            for loss in ("color", "depth")
        },
    }
    return report


# What the parity test asserts (measured numbers go in the report; these are generous bounds
# for fast-math exp, summation order and the rare pixel where a threshold decision flips).
THRESHOLDS = {
    "images_mean_abs": 1e-4, "images_max_abs": 2e-2,
    "alphas_mean_abs": 1e-4, "alphas_max_abs": 2e-2,
    "depths_mean_abs": 1e-3,
    "means2d_max_abs": 1e-3,
    "culling_agreement": 0.999,
    "grad_cosine": 0.99,
}


def check_report(report: dict) -> list[str]:
    """The THRESHOLDS a comparison report violates, as readable lines (empty: parity holds)."""
    checks = [
        ("images_mean_abs", "images mean_abs", report["images"]["mean_abs"]),
        ("images_max_abs", "images max_abs", report["images"]["max_abs"]),
        ("alphas_mean_abs", "alphas mean_abs", report["alphas"]["mean_abs"]),
        ("alphas_max_abs", "alphas max_abs", report["alphas"]["max_abs"]),
        ("depths_mean_abs", "depths mean_abs", report["depths_where_alpha_gt_0.5"]["mean_abs"]),
        ("means2d_max_abs", "means2d max_abs", report["means2d_visible"]["max_abs"]),
        ("culling_agreement", "culling agreement", report["culling_agreement"]),
    ]
    checks += [("grad_cosine", f"{loss} loss grad cosine of {field}", cos)
               for loss, per_field in report["grad_cosine"].items() for field, cos in per_field.items() if cos is not None]
    problems = []
    for key, label, value in checks:
        bound = THRESHOLDS[key]
        # agreement and cosines are lower bounds, differences upper bounds
        ok = value > bound if key in ("culling_agreement", "grad_cosine") else value < bound
        if not ok:
            problems.append(f"{report['scene']}: {label} = {value:.3g}, bound {bound:g}")
    return problems


def default_fixtures() -> Path:
    return next((p for p in (ROOT.parent / "shared", ROOT / "shared") if p.is_dir()), ROOT / "shared") / "fixtures" / "reference"


def table(reports: list[dict]) -> str:
    fields = ("means", "opacities", "scales", "quats", "colors")
    head = ["scene", "img mean", "img max", "alpha mean", "alpha max", "depth mean", "depth max", "m2d max", "cull ="]
    head += [f"cos {f[:5]}" for f in fields] + [f"dcos {f[:5]}" for f in fields]
    rows = [head]
    for r in reports:
        cos = lambda loss, f: "-" if r["grad_cosine"][loss][f] is None else f"{r['grad_cosine'][loss][f]:.5f}"
        rows.append([r["scene"], f"{r['images']['mean_abs']:.1e}", f"{r['images']['max_abs']:.1e}",
                     f"{r['alphas']['mean_abs']:.1e}", f"{r['alphas']['max_abs']:.1e}",
                     f"{r['depths_where_alpha_gt_0.5']['mean_abs']:.1e}", f"{r['depths_where_alpha_gt_0.5']['max_abs']:.1e}",
                     f"{r['means2d_visible']['max_abs']:.1e}", f"{r['culling_agreement']:.5f}"]
                    + [cos("color", f) for f in fields] + [cos("depth", f) for f in fields])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def main() -> int:
    parser = CommandParser(prog="python scripts/render_parity.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the reports here as JSON")
    parser.add_argument("--fixtures", type=Path, default=default_fixtures(), help="the reference fixtures folder")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("render_parity: CUDA is not available; gsplat needs a GPU", file=sys.stderr)
        return 2
    cases = random_cases()
    if args.fixtures.is_dir():
        cases += fixture_cases(args.fixtures)
    else:
        print(f"render_parity: no fixtures at {args.fixtures}; random scenes only", file=sys.stderr)
    reports = [compare_backends(case.to("cuda")) for case in cases]
    problems = [p for r in reports for p in check_report(r)]
    print(table(reports))
    print("\n(cos: gradient cosine for a random-weight loss on images and alphas; dcos: for a loss on depths)")
    print("\n".join(problems) if problems else f"all within {json.dumps(THRESHOLDS)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "thresholds": THRESHOLDS,
                                        "reports": reports, "problems": problems}, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
