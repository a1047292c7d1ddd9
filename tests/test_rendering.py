"""The pure-PyTorch rasterizer against closed forms, its gradients, its memory, and PLY I/O."""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tokengs.gaussians import PLY_MIN_OPACITY, Gaussians, load_ply, save_ply
from tokengs.rendering import background_tensor, render, resolve_backend
from tokengs.rendering.torch_backend import project_gaussians

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from render_parity import random_cases, random_scene  # noqa: E402
GREY = (0.5, 0.5, 0.5)
ZNEAR, ZFAR = 0.025, 125.0


def make_gaussians(means, opacities, scales, colors, quats=None, dtype=torch.float32) -> Gaussians:
    """One scene [1, N] from per-Gaussian lists; identity rotations unless given."""
    means = torch.tensor(means, dtype=dtype)
    quats = torch.tensor([[1.0, 0, 0, 0]] * len(means), dtype=dtype) if quats is None else torch.tensor(quats, dtype=dtype)
    return Gaussians(means=means[None], opacities=torch.tensor(opacities, dtype=dtype)[None],
                     scales=torch.tensor(scales, dtype=dtype)[None], quats=quats[None],
                     colors=torch.tensor(colors, dtype=dtype)[None])


def identity_camera(focal: float, image_hw: tuple[int, int], dtype=torch.float32):
    """w2c [1, 1, 4, 4] = identity and centered intrinsics [1, 1, 4]."""
    height, width = image_hw
    intrinsics = torch.tensor([focal, focal, width / 2, height / 2], dtype=dtype)
    return torch.eye(4, dtype=dtype)[None, None], intrinsics[None, None]


def render_one(gaussians, focal=40.0, image_hw=(21, 21), bg=GREY, znear=ZNEAR, zfar=ZFAR):
    w2c, intrinsics = identity_camera(focal, image_hw, gaussians.means.dtype)
    return render(gaussians, w2c, intrinsics, image_hw, bg, znear, zfar, backend="torch")


def test_single_isotropic_gaussian_matches_closed_form():
    # f s / z = 40 * 0.05 / 2 = 1 px standard deviation; with eps2d the 2D variance is 1.3 px^2
    opacity, color = 0.6, [0.9, 0.2, 0.1]
    out = render_one(make_gaussians([[0, 0, 2]], [opacity], [[0.05] * 3], [color]))
    var2d = 1.0 + 0.3
    center = 10  # pixel 10's center 10.5 is the principal point
    for dx in range(0, 6):
        alpha = opacity * math.exp(-0.5 * dx * dx / var2d)
        alpha = alpha if alpha >= 1 / 255 else 0.0  # skipped below 1/255, not just small
        expected = [alpha * c + (1 - alpha) * 0.5 for c in color]
        assert out.alphas[0, 0, 0, center, center + dx].item() == pytest.approx(alpha, abs=1e-6)
        assert out.images[0, 0, :, center, center + dx].tolist() == pytest.approx(expected, abs=1e-6)
        assert out.depths[0, 0, 0, center, center + dx].item() == pytest.approx(2.0 if alpha > 0 else 0.0, abs=1e-5)
    assert out.alphas[0, 0, 0, center, center + 4].item() == 0.0  # 0.6 exp(-8 / 2.6) < 1/255
    assert out.means2d[0, 0, 0].tolist() == pytest.approx([10.5, 10.5])
    # opacity-aware footprint: ceil(min(3.33, sqrt(2 ln(255 o))) sigma)
    radius = math.ceil(min(3.33, math.sqrt(2 * math.log(255 * opacity))) * math.sqrt(var2d))
    assert out.radii[0, 0, 0].tolist() == [radius, radius]


def test_background_where_nothing_is_drawn():
    out = render_one(make_gaussians([[0, 0, -2]], [0.9], [[0.1] * 3], [[1, 0, 0]]), bg=(0.1, 0.7, 0.3))
    assert torch.allclose(out.images[0, 0], torch.tensor([0.1, 0.7, 0.3])[:, None, None].expand(3, 21, 21))
    assert out.alphas.abs().max() == 0 and out.depths.abs().max() == 0


def test_front_to_back_by_depth():
    # the far blue Gaussian comes first in the list; the near red one must still be in front
    out = render_one(make_gaussians([[0, 0, 4], [0, 0, 2]], [0.8, 0.7], [[0.1] * 3, [0.05] * 3], [[0, 0, 1], [1, 0, 0]]))
    w_red, w_blue = 0.7, 0.3 * 0.8
    t_final = 1 - w_red - w_blue
    pixel = out.images[0, 0, :, 10, 10].tolist()
    assert pixel == pytest.approx([w_red + 0.5 * t_final, 0.5 * t_final, w_blue + 0.5 * t_final], abs=1e-6)
    assert out.alphas[0, 0, 0, 10, 10].item() == pytest.approx(w_red + w_blue, abs=1e-6)
    assert out.depths[0, 0, 0, 10, 10].item() == pytest.approx((2 * w_red + 4 * w_blue) / (w_red + w_blue), abs=1e-5)


def test_stops_before_transmittance_falls_to_threshold():
    # after the first, T = 0.005; the second would take it to 2.5e-5 <= 1e-4, so gsplat leaves it out
    out = render_one(make_gaussians([[0, 0, 2], [0, 0, 3]], [0.995, 0.995], [[0.05] * 3] * 2, [[1, 0, 0], [0, 1, 0]]))
    assert out.alphas[0, 0, 0, 10, 10].item() == pytest.approx(0.995, abs=1e-6)
    assert out.images[0, 0, :, 10, 10].tolist() == pytest.approx([0.995 + 0.0025, 0.0025, 0.0025], abs=1e-6)
    assert out.depths[0, 0, 0, 10, 10].item() == pytest.approx(2.0, abs=1e-5)


def test_alpha_is_capped_at_0_999():
    out = render_one(make_gaussians([[0, 0, 2]], [1.0], [[0.05] * 3], [[1, 1, 1]]))
    assert out.alphas[0, 0, 0, 10, 10].item() == pytest.approx(0.999, abs=1e-7)


def test_near_far_and_faint_gaussians_are_culled():
    gaussians = make_gaussians([[0, 0, 0.02], [0, 0, 200.0], [0, 0, 1.0], [0, 0, 1.0]],
                               [0.9, 0.9, 0.9, 0.9 / 255], [[0.01] * 3] * 4, [[1, 0, 0]] * 4)
    out = render_one(gaussians)
    visible = (out.radii[0, 0] > 0).all(-1).tolist()
    assert visible == [False, False, True, False]  # too near, too far, drawn, opacity < 1/255
    assert out.means2d[0, 0, [0, 1, 3]].abs().max() == 0
    # moving the planes flips the decisions
    out = render_one(gaussians, znear=0.01, zfar=300.0)
    assert (out.radii[0, 0] > 0).all(-1).tolist() == [True, True, True, False]


def test_projection_jacobian_is_clamped_to_the_widened_frustum():
    # W = 20, fx = 20, cx = 10: x/z may reach (W - cx)/fx + 0.3 * 0.5 W/fx = 0.65 in the Jacobian
    focal, z, s = 20.0, 2.0, 0.3
    gaussians = make_gaussians([[2 * z, 0.5 * z, z]], [0.9], [[s] * 3], [[1, 1, 1]])
    w2c, intrinsics = identity_camera(focal, (20, 20))
    proj = project_gaussians(gaussians, w2c, intrinsics, (20, 20), ZNEAR, ZFAR)
    tx, ty = z * 0.65, z * 0.5  # x clamped; y/z = 0.5 is inside its limit
    jac = torch.tensor([[focal / z, 0, -focal * tx / z**2], [0, focal / z, -focal * ty / z**2]])
    cov2d = s * s * jac @ jac.T + 0.3 * torch.eye(2)
    a, b, c = cov2d[0, 0], cov2d[0, 1], cov2d[1, 1]
    det = a * c - b * b
    assert proj.conics[0, 0, 0].tolist() == pytest.approx([(c / det).item(), (-b / det).item(), (a / det).item()], rel=1e-5)
    assert proj.means2d[0, 0, 0].abs().max() == 0  # off the image: culled
    assert not proj.visible[0, 0, 0]


def test_batched_render_equals_separate_renders_and_view_chunks():
    scene = random_scene("batch", 2, 300, 3, (24, 40), seed=3, scale_range=(0.03, 0.15))
    args = (scene.image_hw, scene.bg_color, scene.znear, scene.zfar)
    out = render(scene.gaussians, scene.w2c, scene.intrinsics, *args)
    chunked = render(scene.gaussians, scene.w2c, scene.intrinsics, *args, view_chunk_size=2)
    for name in ("images", "alphas", "depths", "means2d"):
        assert torch.allclose(getattr(out, name), getattr(chunked, name), atol=1e-5), name
    assert torch.equal(out.radii, chunked.radii)
    for b in range(2):
        for v in range(3):
            one = render(scene.gaussians.map(lambda t: t[b:b + 1]), scene.w2c[b:b + 1, v:v + 1],
                         scene.intrinsics[b:b + 1, v:v + 1], *args)
            assert torch.allclose(one.images[0, 0], out.images[b, v], atol=1e-6)
            assert torch.allclose(one.depths[0, 0], out.depths[b, v], atol=1e-5)
    assert out.alphas.mean() > 0.2  # the scene covers a good part of the images


def test_tile_pairs_count_the_tiles_each_box_touches_clipped_to_the_image():
    """A 40 x 24 image of 16-px tiles (3 x 2): boxes inside one tile, across two, over the corner,
    partly before the image, wholly past it, and culled (its center left as gsplat leaves it)."""
    from tokengs.rendering.common import tile_pairs

    means2d = torch.tensor([[8.0, 8.0], [16.0, 8.0], [38.0, 20.0], [-5.0, -5.0], [100.0, 100.0], [math.nan, 8.0]])
    radii = torch.tensor([[4, 4], [1, 1], [20, 20], [10, 10], [3, 3], [0, 0]], dtype=torch.int32)
    expected = 1 + 2 + 4 + 1 + 0 + 0
    pairs = tile_pairs(torch.stack([means2d, means2d + 16]), torch.stack([radii, radii]), (24, 40), tile_size=16)
    assert pairs.tolist() == [expected, 1 + 2 + 1 + 4 + 0 + 0]  # shifted one tile: the corner box clips, the early one fits
    assert tile_pairs(means2d, radii, (24, 40), tile_size=32).item() == 1 + 1 + 2 + 1


def test_gsplat_calls_are_planned_within_the_pair_limit_and_cover_every_camera_once():
    from tokengs.rendering.gsplat_backend import call_limits, plan_calls

    pairs = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 1.0]])  # scenes of 3, 7 and 11 pairs
    whole = slice(0, 2)
    assert plan_calls(pairs, 100) == [(slice(0, 3), whole)]
    assert plan_calls(pairs, 10) == [(slice(0, 2), whole), (slice(2, 3), slice(0, 1)), (slice(2, 3), slice(1, 2))]
    assert plan_calls(pairs, 5) == [(slice(0, 1), whole), (slice(1, 2), slice(0, 1)), (slice(1, 2), slice(1, 2)),
                                    (slice(2, 3), slice(0, 1)), (slice(2, 3), slice(1, 2))]
    # scenes share a call only within merge_pairs; a scene is split only above max_pairs
    assert plan_calls(pairs, 10, merge_pairs=4) == [(slice(0, 1), whole), (slice(1, 2), whole),
                                                   (slice(2, 3), slice(0, 1)), (slice(2, 3), slice(1, 2))]
    assert plan_calls(pairs, 11, merge_pairs=4) == [(slice(0, 1), whole), (slice(1, 2), whole), (slice(2, 3), whole)]
    # gsplat's 32-bit index: at most max_cameras cameras a call, whatever the pairs
    assert call_limits(262144, torch.device("cpu")) == (2**29, (2**31 - 1) // 262144)
    assert plan_calls(pairs, 100, max_cameras=4) == [(slice(0, 2), whole), (slice(2, 3), whole)]
    assert plan_calls(pairs, 100, max_cameras=1) == [(slice(b, b + 1), slice(v, v + 1)) for b in range(3) for v in range(2)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        pairs = torch.randint(0, 20, (4, 5), generator=generator).double()
        limit = int(torch.randint(1, 120, (1,), generator=generator))
        max_cameras = int(torch.randint(1, 25, (1,), generator=generator))
        merge = int(torch.randint(0, limit + 1, (1,), generator=generator))
        calls = plan_calls(pairs, limit, max_cameras, merge_pairs=merge)
        cameras = [(b, v) for scenes, views in calls for b in range(4)[scenes] for v in range(5)[views]]
        assert cameras == [(b, v) for b in range(4) for v in range(5)]  # each once, scene-major
        for scenes, views in calls:
            count = (scenes.stop - scenes.start) * (views.stop - views.start)
            assert count <= max_cameras and (pairs[scenes, views].sum() <= limit or count == 1)
            assert scenes.stop - scenes.start == 1 or pairs[scenes, views].sum() <= merge


def test_gsplat_calls_stitch_back_into_the_batch(monkeypatch):
    """The gsplat backend's calls, rendered here by the PyTorch rasterizer (gsplat needs CUDA), come
    back as one render of the whole batch: scenes split, views chunked, scenes grouped."""
    from tokengs.rendering import gsplat_backend, torch_backend

    scene = random_scene("calls", 3, 200, 4, (24, 40), seed=5, scale_range=(0.03, 0.15))
    background = background_tensor(scene.bg_color, scene.gaussians.means)
    args = (scene.gaussians, scene.w2c, scene.intrinsics, scene.image_hw, background, scene.znear, scene.zfar)
    pairs = torch.tensor([[5.0, 1, 1, 1], [1, 1, 1, 1], [2, 2, 2, 2]])
    calls = []
    monkeypatch.setattr(gsplat_backend, "count_tile_pairs", lambda *a, sizes, max_cameras: pairs[None])  # [tile sizes, B, V]
    monkeypatch.setattr(gsplat_backend, "_rasterize", lambda g, w2c, *a: calls.append(tuple(w2c.shape[:2])) or
                        torch_backend.render_torch(g, w2c, *a))
    for limit, shapes in ((100, [(3, 4)]), (6, [(1, 2), (1, 2), (1, 4), (1, 3), (1, 1)]), (4, [(1, 1), (1, 3), (1, 4),
                                                                                              (1, 2), (1, 2)])):
        calls.clear()
        monkeypatch.setattr(gsplat_backend, "MAX_PAIRS_PER_CALL", limit)
        out = gsplat_backend.render_gsplat(*args)
        assert calls == shapes
        whole = torch_backend.render_torch(*args)
        assert torch.equal(out.radii, whole.radii), limit
        for name in ("images", "alphas", "depths", "means2d"):  # batched sums may round differently
            torch.testing.assert_close(getattr(out, name), getattr(whole, name), rtol=1e-5, atol=1e-5, msg=(limit, name))
        without_depth = gsplat_backend.render_gsplat(*args, depth=False)
        assert without_depth.depths is None and torch.equal(without_depth.images, out.images), limit


def test_automatic_tile_size_is_32_only_for_gaussians_much_larger_than_a_tile(monkeypatch):
    """render_tile_size 0: the pairs at 16 and 32 px decide (at least LARGE_TILE_PAIR_RATIO times
    as many at 16), and the calls are planned with the chosen size's pairs."""
    from tokengs.rendering import gsplat_backend, torch_backend
    from tokengs.rendering.common import AUTO_TILE, LARGE_TILE_PAIR_RATIO

    scene = random_scene("auto", 2, 50, 2, (24, 40), seed=6, scale_range=(0.03, 0.15))
    background = background_tensor(scene.bg_color, scene.gaussians.means)
    args = (scene.gaussians, scene.w2c, scene.intrinsics, scene.image_hw, background, scene.znear, scene.zfar)
    seen = []
    monkeypatch.setattr(gsplat_backend, "_rasterize", lambda g, w2c, i, hw, bg, zn, zf, tile, depth: seen.append(
        (tile, tuple(w2c.shape[:2]))) or torch_backend.render_torch(g, w2c, i, hw, bg, zn, zf, tile, depth))
    monkeypatch.setattr(gsplat_backend, "MAX_PAIRS_PER_CALL", 10)
    large = torch.full((2, 2), 3.0)  # 12 pairs at 32 px: two calls; at 16 px, 5 a camera: one call a scene
    for small, expected in ((large * LARGE_TILE_PAIR_RATIO, [(32, (1, 2)), (32, (1, 2))]),
                            (torch.full((2, 2), 5.0), [(16, (1, 2)), (16, (1, 2))]),
                            (torch.full((2, 2), 2.0), [(16, (2, 2))])):
        counted, seen[:] = [], []
        monkeypatch.setattr(gsplat_backend, "count_tile_pairs",
                            lambda *a, sizes, max_cameras: counted.append(sizes) or torch.stack([small, large])[:len(sizes)])
        gsplat_backend.render_gsplat(*args, AUTO_TILE)
        assert counted == [(16, 32)] and seen == expected, (small, seen)
    gsplat_backend.render_gsplat(*args, 16)
    assert counted[-1] == (16,) and seen[-1][0] == 16


def test_gradients_match_finite_differences_for_every_field():
    torch.manual_seed(0)
    means = torch.tensor([[0.0, 0.0, 2.0], [0.1, -0.05, 2.5], [-0.1, 0.1, 3.0], [0.05, 0.05, 1.5]], dtype=torch.float64)
    fields = [means[None], torch.tensor([[0.6, 0.5, 0.8, 0.3]], dtype=torch.float64),
              torch.rand(1, 4, 3, dtype=torch.float64) * 0.2 + 0.1, torch.randn(1, 4, 4, dtype=torch.float64),
              torch.rand(1, 4, 3, dtype=torch.float64)]
    w2c, intrinsics = identity_camera(12.0, (12, 12), torch.float64)
    weights = [torch.rand(1, 1, k, 12, 12, dtype=torch.float64) for k in (3, 1, 1)]

    def rendered(*values):
        out = render(Gaussians(*values), w2c, intrinsics, (12, 12), GREY, ZNEAR, ZFAR, backend="torch")
        return torch.stack([(weights[0] * out.images).sum(), (weights[1] * out.alphas).sum(), (weights[2] * out.depths).sum()])

    inputs = [t.clone().requires_grad_() for t in fields]
    assert torch.autograd.gradcheck(rendered, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradients_reach_every_field_of_a_batch():
    scene = random_scene("grads", 2, 200, 2, (24, 32), seed=5, scale_range=(0.05, 0.2))
    gaussians = scene.gaussians.map(lambda t: t.clone().requires_grad_())
    out = render(gaussians, scene.w2c, scene.intrinsics, scene.image_hw, scene.bg_color, scene.znear, scene.zfar)
    (out.images.square().sum() + out.depths.mean()).backward()
    for name in ("means", "opacities", "scales", "quats", "colors"):
        grad = getattr(gaussians, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        assert grad[1].abs().sum() > 0, f"{name}: the second scene gets gradients too"


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, time, torch
    from tokengs.rendering import render
    sys.path.insert(0, "scripts")
    from render_parity import random_scene

    def status_mb(key):  # from /proc/self/status: VmHWM is this process's own peak (getrusage's
        # ru_maxrss survives exec and can report the forking parent's size instead)
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) / 1024

    torch.set_num_threads(2)
    scene = random_scene("mem", 1, 20000, 1, (64, 64), seed=0, scale_range=(0.02, 0.12))
    gaussians = scene.gaussians.map(lambda t: t.requires_grad_())
    # a small forward and backward first: what the first backward sets up (CUDA's context in a
    # CUDA build on a GPU host, 2+ GB) is not rendering's memory
    warm = scene.gaussians.map(lambda t: t[:, :100].clone().requires_grad_())
    render(warm, scene.w2c, scene.intrinsics, (64, 64), (1, 1, 1), 0.025, 125.0).images.sum().backward()
    open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from the resident size now
    base = status_mb("VmRSS:")
    start = time.time()
    out = render(gaussians, scene.w2c, scene.intrinsics, (64, 64), (1, 1, 1), 0.025, 125.0)
    (out.images.sum() + out.alphas.sum()).backward()
    print(json.dumps({"base_mb": base, "peak_mb": status_mb("VmHWM:"), "seconds": time.time() - start,
                      "coverage": out.alphas.mean().item()}))
""")



def test_memory_of_64x64_with_20k_gaussians_is_bounded():
    """Forward and backward of a 64x64 render of 20k Gaussians, measured in a fresh process."""
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, cwd=ROOT,
                            timeout=300, check=True)
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    print(numbers)
    assert numbers["coverage"] > 0.5  # a dense scene, not an empty one
    assert numbers["peak_mb"] - numbers["base_mb"] < 1024, numbers  # rendering's own peak


def test_backend_choice():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_backend("gsplat", torch.device("cpu"))
    with pytest.raises(ValueError, match="not known"):
        resolve_backend("vulkan", torch.device("cpu"))


def test_half_precision_gaussians_render_in_float32():
    scene = random_scene("bf16", 1, 50, 1, (16, 16), seed=7)
    out = render(scene.gaussians.map(lambda t: t.bfloat16()), scene.w2c, scene.intrinsics, scene.image_hw,
                 scene.bg_color, scene.znear, scene.zfar)
    assert out.images.dtype == torch.float32


def test_ply_round_trip_drops_faint_gaussians(tmp_path):
    scene = random_scene("ply", 1, 64, 1, (16, 16), seed=11)
    gaussians = scene.gaussians.scene(0)
    gaussians.opacities[:4] = torch.tensor([0.001, 0.0049, 0.005, 0.9999999])
    gaussians = Gaussians(gaussians.means, gaussians.opacities, gaussians.scales,
                          torch.nn.functional.normalize(gaussians.quats, dim=-1), gaussians.colors)
    path = tmp_path / "scene.ply"
    written = save_ply(gaussians, path)
    kept = gaussians.opacities >= PLY_MIN_OPACITY
    assert written == int(kept.sum()) == 62
    loaded = load_ply(path)
    expected = gaussians.select(kept)
    for name in ("means", "scales", "quats", "colors"):
        assert torch.allclose(getattr(loaded, name), getattr(expected, name), rtol=1e-5, atol=1e-6), name
    assert torch.allclose(loaded.opacities, expected.opacities, rtol=1e-5, atol=1e-6)
    from plyfile import PlyData

    names = [p.name for p in PlyData.read(str(path))["vertex"].properties]
    assert names == ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
                     "rot_0", "rot_1", "rot_2", "rot_3"]
    with pytest.raises(ValueError, match="one scene"):
        save_ply(scene.gaussians, path)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="gsplat needs CUDA: measured on a GPU machine"))])
@pytest.mark.parametrize("case", random_cases(), ids=lambda scene: scene.name)
def test_tile_size_changes_nothing_but_speed(case, device, monkeypatch):
    """Either rasterizer (the torch one on the CPU, gsplat on CUDA) with 32-pixel tiles against 16:
    the same images, alphas and depths (a Gaussian outside its opacity-aware box has alpha below
    1/255 and is skipped, whatever tiles it is listed in), and the same gradients up to the order
    of floating-point sums."""
    from tokengs.rendering import torch_backend

    tiles = []  # the torch rasterizer's tiles, to see that the size reached it
    monkeypatch.setattr(torch_backend, "_tile_pixels", lambda *a, _f=torch_backend._tile_pixels: tiles.append(1) or _f(*a))
    case = case.to(device)
    outputs, grads, counts = [], [], []
    for tile_size in (16, 32):
        tiles.clear()
        gaussians = case.gaussians.map(lambda t: t.detach().clone().requires_grad_(True))
        out = render(gaussians, case.w2c, case.intrinsics, case.image_hw, case.bg_color, case.znear, case.zfar,
                     tile_size=tile_size)
        weights = torch.linspace(0.5, 1.5, out.images.numel(), device=device).view_as(out.images)
        ((out.images * weights).sum() + out.depths.sum() + out.alphas.sum()).backward()
        outputs.append(out)
        grads.append({name: getattr(gaussians, name).grad for name in ("means", "scales", "quats", "opacities", "colors")})
        counts.append(len(tiles))
    if device == "cpu":
        assert counts[1] < counts[0], counts
    for name in ("images", "alphas", "depths"):
        a, b = getattr(outputs[0], name), getattr(outputs[1], name)
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (name, float((a - b).abs().max()))
    for name, grad in grads[0].items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert float((grad - grads[1][name]).abs().max() / scale) < 1e-4, name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="gsplat needs CUDA: measured on a GPU machine"))])
@pytest.mark.parametrize("case", random_cases()[:2], ids=lambda scene: scene.name)
def test_rendering_without_depth_gives_the_same_images_alphas_and_gradients(case, device):
    """depth=False (what the losses ask for) drops the fourth channel: images and alphas as with
    depth, and so the gradients of anything computed from them, up to the order of float sums."""
    case = case.to(device)
    outputs, grads = [], []
    for depth in (True, False):
        gaussians = case.gaussians.map(lambda t: t.detach().clone().requires_grad_(True))
        out = render(gaussians, case.w2c, case.intrinsics, case.image_hw, case.bg_color, case.znear, case.zfar,
                     depth=depth)
        weights = torch.linspace(0.5, 1.5, out.images.numel(), device=device).view_as(out.images)
        ((out.images * weights).sum() + out.alphas.square().sum()).backward()
        outputs.append(out)
        grads.append({name: getattr(gaussians, name).grad for name in ("means", "scales", "quats", "opacities", "colors")})
    assert outputs[0].depths is not None and outputs[1].depths is None
    assert outputs[0].depths.shape == outputs[0].alphas.shape
    for name in ("images", "alphas", "means2d", "radii"):
        a, b = getattr(outputs[0], name), getattr(outputs[1], name)
        assert torch.allclose(a.float(), b.float(), rtol=1e-6, atol=1e-6), (name, float((a.float() - b.float()).abs().max()))
    for name, grad in grads[0].items():
        assert grad.abs().max() > 0, name
        assert float((grad - grads[1][name]).abs().max() / grad.abs().max()) < 1e-5, name


def test_background_from_values_is_checked_and_placed():
    like = torch.zeros(2, dtype=torch.float64)
    assert torch.equal(background_tensor((0.25, 0.5, 1.0), like), torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="bg_color must be 3 values"):
        background_tensor((0.5, 0.5), like)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only on CUDA: checked on a GPU machine")
def test_background_reaches_the_gpu_without_waiting_for_it():
    """A copy from pageable memory waits for every queued kernel: once per render in every
    training and tuning step. The background goes through pinned memory instead."""
    like = torch.zeros(3, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        bg = background_tensor((0.25, 0.5, 1.0), like)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bg.device == like.device and bg.tolist() == [0.25, 0.5, 1.0]
