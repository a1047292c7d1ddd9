"""Loss terms, SSIM, metrics and LPIPS, and the deferred / mean-of-grads backward paths."""

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from skimage.metrics import structural_similarity

from conftest import target_views
from tokengs import metrics
from tokengs.data.release_batch import from_release_dict
from tokengs.data.types import Views
from tokengs.gaussians import Gaussians
from tokengs.losses import LossComputer, backward_loss, compute_loss, fused_ssim_like, visibility_loss
from tokengs.metrics import ssim_skimage_batched
from tokengs.options import Options
from tokengs.rendering import render_chunked

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from render_parity import random_scene  # noqa: E402

FIELDS = ("means", "opacities", "scales", "quats", "colors")


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours - ref| / max|ref|, the fixtures' measure."""
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.fixture(scope="module")
def lpips_random():
    """LPIPS with lpips's randomly initialised VGG backbone (its linear layers ship with the package)."""
    return metrics.build_lpips("cpu", pretrained=False)


# ---- visibility -------------------------------------------------------------------------------

def release_targets(tensors: dict) -> Views:
    """The target views of a model fixture's release batch."""
    return from_release_dict({key.removeprefix("batch."): value for key, value in tensors.items()
                              if key.startswith("batch.")}).target


@pytest.mark.parametrize("name", ["plain", "latent"])
def test_visibility_loss_reproduces_the_release(reference_dir, name):
    tensors = load_file(str(reference_dir / f"model_{name}.io.safetensors"))
    gaussians = Gaussians.unpack(tensors["out.gaussians"])
    targets = release_targets(tensors)
    ours = visibility_loss(gaussians.means, targets.w2c, targets.intrinsics, targets.image_hw, threshold=1.0)
    error = relative_error(ours, tensors["out.visibility_loss"])
    print(f"visibility {name}: relative error {error:.2e}")
    assert error <= 1e-4


def test_visibility_loss_through_compute_loss_with_the_release_batch(reference_dir):
    tensors = load_file(str(reference_dir / "model_plain.io.safetensors"))
    opt = Options(img_size=(32, 48), lambda_ssim=0.0, num_views=4, num_input_views=2)
    out = compute_loss(opt, Gaussians.unpack(tensors["out.gaussians"]), release_targets(tensors))
    assert relative_error(out.per_scene["visibility"], tensors["out.visibility_loss"]) <= 1e-4


def test_visibility_loss_edge_cases():
    w2c = torch.eye(4)[None, None]
    intrinsics = torch.tensor([10.0, 10.0, 10.0, 10.0])[None, None]  # a 20 x 20 image
    # inside; 0/0 -> u = 0 (the image edge, distance 0); x/0 = +inf -> 1e6 px; 1 image-width right of the edge
    means = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [3.0, 0.0, 1.0]]])
    per_point = lambda threshold: torch.stack([visibility_loss(means[:, i:i + 1], w2c, intrinsics, (20, 20), threshold)
                                               for i in range(4)], dim=-1)[0]
    assert per_point(0.0).tolist() == pytest.approx([0.0, 0.0, 2 * 1e6 / 20 - 2, 2.0])
    assert per_point(1.0).tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0])
    # the nearest view counts: a second camera that sees the far point brings it to 0
    second = torch.eye(4)
    second[0, 3] = -3.0
    w2c2 = torch.stack([torch.eye(4), second])[None]
    two_views = visibility_loss(means[:, 3:], w2c2, intrinsics.expand(1, 2, 4), (20, 20), 0.0)
    assert two_views.item() == 0.0


def test_visibility_loss_gradient_is_finite_for_a_center_in_a_camera_plane():
    """A center at z exactly 0 in one view (seen about once in 17 bf16 training steps on a GPU)
    made the division's backward 0·x/0² = NaN, and so does a z so small that x/z² overflows; every
    other gradient and every value is unchanged."""
    w2c = torch.eye(4).repeat(1, 2, 1, 1)
    w2c[0, 1, 2, 3] = -1.0  # the second camera's plane is z = 1
    intrinsics = torch.tensor([10.0, 10.0, 10.0, 10.0]).expand(1, 2, 4)
    # in the second camera's plane; 1e-200 in front of the first (x/z finite, x/z² not); two ordinary ones
    means = torch.tensor([[[0.5, -0.2, 1.0], [0.3, 0.2, 1e-200], [30.0, 0.0, 2.0], [0.1, 0.2, 3.0]]],
                         dtype=torch.float64, requires_grad=True)
    for threshold in (0.0, 1.0):
        loss = visibility_loss(means, w2c.double(), intrinsics.double(), (20, 20), threshold)
        (grad,) = torch.autograd.grad(loss.sum(), means)
        assert torch.isfinite(grad).all(), grad
        # the naive formula: same value; same gradient for the centers that no camera plane holds
        cam = means[0, :, None, :] + w2c[0, :, :3, 3].double()  # [N, V, 3]: the cameras do not rotate
        u, v = 10 * cam[..., 0] / cam[..., 2] + 10, 10 * cam[..., 1] / cam[..., 2] + 10
        u, v = (torch.nan_to_num(t, nan=0.0, posinf=1e6, neginf=-1e6) for t in (u, v))
        excess = (torch.relu((2 * u / 20 - 1).abs() - 1) + torch.relu((2 * v / 20 - 1).abs() - 1)).min(-1).values
        naive = (excess.clamp(max=threshold) if threshold > 0 else excess).mean()
        (naive_grad,) = torch.autograd.grad(naive, means)
        assert loss.item() == naive.item()  # the same operations in the same order: the same bits
        assert not torch.isfinite(naive_grad[0, :2]).all(-1).any()  # what the plain division gave
        torch.testing.assert_close(grad[0, 2:], naive_grad[0, 2:])


# ---- SSIM -------------------------------------------------------------------------------------

def structured_images(height: int, width: int) -> torch.Tensor:
    """[4, 3, H, W]: ramps, a checkerboard, a flat image with a square, smooth waves."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    checker = ((torch.arange(height)[:, None] // 4 + torch.arange(width)[None] // 4) % 2).float()
    square = torch.full((height, width), 0.3)
    square[height // 4:3 * height // 4, width // 4:3 * width // 4] = 0.9
    waves = 0.5 + 0.5 * torch.sin(12 * x) * torch.cos(9 * y)
    return torch.stack([torch.stack([x, y, x * y]), torch.stack([checker, 1 - checker, checker * 0.5]),
                        torch.stack([square, square.T[:height, :width] if height == width else square, 1 - square]),
                        torch.stack([waves, waves.flip(0), waves.flip(1)])])


@pytest.mark.parametrize("height,width", [(32, 48), (64, 64), (11, 17)])
def test_ssim_matches_scikit_image(height, width):
    torch.manual_seed(0)
    random_gt = torch.rand(3, 2, 3, height, width)
    structured_gt = structured_images(height, width)[None].expand(3, -1, -1, -1, -1)
    worst = 0.0
    for gt in (random_gt, structured_gt):
        preds = [gt, (gt + 0.1 * torch.randn_like(gt)).clamp(0, 1), torch.rand_like(gt), gt.flip(-1), 1 - gt]
        for pred in preds:
            ours = ssim_skimage_batched(pred, gt)
            assert ours.shape == gt.shape[:2]
            ref = torch.tensor([[structural_similarity(g.double().numpy(), p.double().numpy(), win_size=11,
                                                       gaussian_weights=True, channel_axis=0, data_range=1.0)
                                 for p, g in zip(pred_row, gt_row)] for pred_row, gt_row in zip(pred, gt)])
            worst = max(worst, (ours.double() - ref).abs().max().item())
    print(f"SSIM vs scikit-image {height}x{width}: max abs error {worst:.2e}")
    assert worst <= 1e-4


def test_training_ssim_is_fused_ssims_definition():
    """Against a direct 2D-window implementation: zero padding 'same', population statistics, mean of the map."""
    torch.manual_seed(1)
    pred, gt = torch.rand(2, 3, 3, 20, 24, dtype=torch.float64), torch.rand(2, 3, 3, 20, 24, dtype=torch.float64)
    taps = torch.tensor([math.exp(-((i - 5) ** 2) / (2 * 1.5**2)) for i in range(11)], dtype=torch.float64)
    window = (taps[:, None] * taps[None, :] / taps.sum() ** 2).expand(3, 1, 11, 11)
    blur = lambda t: F.conv2d(t, window, padding=5, groups=3)
    x, y = pred.flatten(0, 1), gt.flatten(0, 1)
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    expected = ((2 * mx * my + c1) * (2 * sxy + c2) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))).mean((1, 2, 3))
    assert torch.allclose(fused_ssim_like(pred, gt), expected.view(2, 3), atol=1e-10)
    assert torch.allclose(fused_ssim_like(gt, gt), torch.ones(2, 3, dtype=torch.float64))


# ---- metrics ----------------------------------------------------------------------------------

def test_psnr_per_scene_and_masked():
    gt = torch.zeros(2, 3, 3, 8, 8)
    pred = gt.clone()
    pred[0] += 0.1  # MSE 0.01 -> 20 dB
    pred[1, 0] += 0.1  # one view of three: MSE 0.01 / 3
    assert metrics.psnr(pred, gt).tolist() == pytest.approx([20.0, 20.0 + 10 * math.log10(3)], abs=1e-4)
    mask = torch.zeros(2, 3, 1, 8, 8)
    mask[..., :4, :] = 1  # half the pixels: masked images differ on half of them
    assert metrics.psnr(pred, gt, mask).tolist() == pytest.approx([20.0 + 10 * math.log10(2), 20.0 + 10 * math.log10(6)],
                                                                  abs=1e-4)


def test_ssim_and_lpips_metrics_average_views(lpips_random):
    torch.manual_seed(2)
    gt = torch.rand(2, 3, 3, 32, 32)
    pred = (gt + 0.05 * torch.randn_like(gt)).clamp(0, 1)
    assert torch.allclose(metrics.ssim(pred, gt), ssim_skimage_batched(pred, gt).mean(1))
    mask = (torch.rand(2, 3, 1, 32, 32) > 0.3).float()
    assert torch.allclose(metrics.ssim(pred, gt, mask), ssim_skimage_batched(pred * mask, gt * mask).mean(1))
    direct = lpips_random(pred.flatten(0, 1), gt.flatten(0, 1), normalize=True).view(2, 3).mean(1)
    assert torch.allclose(metrics.lpips(lpips_random, pred, gt), direct)
    assert (metrics.lpips(lpips_random, gt, gt).abs() < 1e-6).all()


def test_missing_vgg_weights_fail_at_start_up_with_directions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(metrics.LPIPSWeightsMissing) as error:
        metrics.build_lpips("cpu")
    message = str(error.value)
    assert "vgg16-397923af.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert metrics.lpips_weights_problem() == message  # what start-up checks report before building anything
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth").touch()
    assert metrics.lpips_weights_problem() is None


# ---- the loss ---------------------------------------------------------------------------------

def make_batch(num_scenes=2, num_views=2, num_gaussians=150, image_hw=(24, 32), seed=0):
    """Gaussians [B, N] and target views whose first scene has a (partial) mask."""
    scene = random_scene("loss", num_scenes, num_gaussians, num_views, image_hw, seed=seed, scale_range=(0.05, 0.2))
    gen = torch.Generator().manual_seed(seed + 100)
    images = torch.rand(num_scenes, num_views, 3, *image_hw, generator=gen)
    masks = (torch.rand(num_scenes, num_views, 1, *image_hw, generator=gen) > 0.3).float()
    has_mask = torch.tensor([True] + [False] * (num_scenes - 1))
    return scene.gaussians, target_views(images, scene.w2c, scene.intrinsics, masks, has_mask)


def small_options(**changes) -> Options:
    base = dict(img_size=(24, 32), num_views=4, num_input_views=2, bg_color="grey", rgb_loss_type="l1", lambda_rgb=0.8,
                lambda_mask=0.3, lambda_ssim=0.2, lambda_visibility=0.5, visibility_distance_threshold=1.0,
                lambda_opacity=0.01)
    return Options(**dict(base, **changes))


@pytest.mark.parametrize("rgb_loss_type", ["l1", "l2"])
def test_loss_terms_recomputed_independently(rgb_loss_type):
    opt = small_options(rgb_loss_type=rgb_loss_type)
    gaussians, targets = make_batch()
    out = compute_loss(opt, gaussians, targets)
    pred, alphas = out.render.images, out.render.alphas
    gt = targets.images * targets.masks + (1 - targets.masks)  # composited on white
    diff = pred - gt
    rgb = (diff.abs() if rgb_loss_type == "l1" else diff.square()).mean((1, 2, 3, 4))
    mask = (alphas - targets.masks).square().mean((1, 2, 3, 4)) * targets.has_mask[:, 0]
    ssim = torch.stack([(1 - fused_ssim_like(pred[b], gt[b]).mean()) / 2 for b in range(2)])
    visibility = visibility_loss(gaussians.means, targets.w2c, targets.intrinsics, (24, 32), 1.0)
    opacity = -torch.log(gaussians.opacities + 1e-6).mean()
    for name, expected in (("rgb", rgb), ("mask", mask), ("ssim", ssim), ("visibility", visibility)):
        assert torch.allclose(out.per_scene[name], expected, rtol=1e-5, atol=1e-7), name
    assert out.per_scene["mask"][1] == 0  # scene 2 has no mask
    total = 0.8 * rgb + 0.3 * mask + 0.2 * ssim + 0.5 * visibility
    assert torch.allclose(out.per_scene["total"], total, rtol=1e-5)
    assert out.loss.item() == pytest.approx((total.mean() + 0.01 * opacity).item(), rel=1e-5)
    assert torch.allclose(out.psnr, -10 * torch.log10(diff.square().mean((1, 2, 3, 4))), rtol=1e-5)
    assert "lpips" not in out.per_scene  # lambda 0: not computed


def test_dynamic_aux_loss_adds_the_dynamic_render():
    opt = small_options()
    gaussians, targets = make_batch()
    dyn = gaussians.select(slice(100, None))
    out = compute_loss(opt, gaussians, targets, dyn_gaussians=dyn, dyn_aux_weight=0.3)
    main, alone = compute_loss(opt, gaussians, targets), compute_loss(opt, dyn, targets)
    assert out.loss.item() == pytest.approx(main.loss.item() + 0.3 * alone.loss.item(), rel=1e-6)
    assert torch.allclose(out.per_scene["dyn_aux"], alone.per_scene["total"])
    assert compute_loss(opt, gaussians, targets, dyn_gaussians=dyn, dyn_aux_weight=0.0).loss == main.loss


def test_lpips_term_sees_the_uncomposited_target(lpips_random):
    opt = small_options(img_size=(32, 32), lambda_lpips=0.5)
    gaussians, targets = make_batch(image_hw=(32, 32))
    out = compute_loss(opt, gaussians, targets, lpips_model=lpips_random)
    pred = out.render.images
    direct = lpips_random(pred.flatten(0, 1), targets.images.flatten(0, 1), normalize=True).view(2, 2).mean(1)
    assert torch.allclose(out.per_scene["lpips"], direct, rtol=1e-5)
    with pytest.raises(ValueError, match="build_lpips"):
        compute_loss(opt, gaussians, targets)


# ---- deferred_bp and mean_of_grads equal the plain path ----------------------------------------

class TinyModel(torch.nn.Module):
    """Raw parameters -> activated Gaussians [B, N] (static) and the last 40 of them (dynamic), as the
    real model hands them over: fields are views of one tensor, dynamic ones a slice of the static."""

    def __init__(self, gaussians: Gaussians):
        super().__init__()
        self.raw = torch.nn.Parameter(torch.cat([
            gaussians.means, torch.logit(gaussians.opacities)[..., None], torch.log(gaussians.scales),
            gaussians.quats, torch.logit(gaussians.colors.clamp(0.02, 0.98))], dim=-1))

    def forward(self) -> tuple[Gaussians, Gaussians]:
        raw = self.raw
        packed = torch.cat([raw[..., :3], torch.sigmoid(raw[..., 3:4]), torch.exp(raw[..., 4:7]), raw[..., 7:11],
                            torch.sigmoid(raw[..., 11:14])], dim=-1)
        gaussians = Gaussians.unpack(packed)
        return gaussians, gaussians.select(slice(-40, None))


BACKWARD_MODES = {
    "deferred": dict(deferred_bp=True),
    "per-scene": dict(mean_of_grads="per-scene"),
    "per-scene-chunk2": dict(mean_of_grads="per-scene", mean_of_grads_scene_chunk_size=2),
    "per-view": dict(mean_of_grads="per-view"),
    "per-view-chunk2x2": dict(mean_of_grads="per-view", mean_of_grads_scene_chunk_size=2, mean_of_grads_view_chunk_size=2),
}


def _gradients(opt, model, targets, lpips_model):
    model.zero_grad()
    static, dynamic = model()
    out = backward_loss(opt, static, targets, lpips_model, dyn_gaussians=dynamic, dyn_aux_weight=0.3)
    return out, model.raw.grad.clone()


@pytest.fixture(scope="module")
def plain_reference():
    """3 scenes x 3 views (chunks of 2 leave a remainder), every image term but LPIPS on."""
    gaussians, targets = make_batch(num_scenes=3, num_views=3, num_gaussians=120, image_hw=(20, 28), seed=4)
    model = TinyModel(gaussians)
    opt = small_options(img_size=(24, 32))
    out, grad = _gradients(opt, model, targets, None)
    return opt, model, targets, out, grad


@pytest.mark.parametrize("mode", list(BACKWARD_MODES))
def test_backward_modes_equal_the_plain_path(plain_reference, mode):
    opt, model, targets, plain, plain_grad = plain_reference
    out, grad = _gradients(opt.evolve(**BACKWARD_MODES[mode]), model, targets, None)
    assert out.loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)
    for name, value in plain.per_scene.items():
        assert torch.allclose(out.per_scene[name], value, rtol=1e-5, atol=1e-8), name
    assert torch.allclose(out.psnr, plain.psnr, rtol=1e-5)
    assert torch.allclose(out.render.images, plain.render.images, atol=1e-6)
    # every field: means | opacity | scales | quats | colors of the packed raw parameters
    errors = {name: relative_error(g_mode, g_plain) for name, g_mode, g_plain in
              zip(FIELDS, grad.split([3, 1, 3, 4, 3], dim=-1), plain_grad.split([3, 1, 3, 4, 3], dim=-1))}
    print(f"{mode}: gradient relative errors {errors}")
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("mode", ["deferred", "per-view"])
def test_backward_modes_with_lpips(lpips_random, mode):
    """In float64: a random VGG can turn the ~1e-7 float32 differences between a chunk's render and
    the full render (and oneDNN's batch-size-dependent convolutions) into ~1e-3 gradient changes,
    which would hide what is measured here, the chunking itself."""
    gaussians, targets = make_batch(num_scenes=2, num_views=3, num_gaussians=100, image_hw=(32, 32), seed=6)
    model = TinyModel(gaussians.map(torch.Tensor.double))
    targets = targets.map(lambda t: t.double() if t.is_floating_point() else t)
    lpips64 = copy.deepcopy(lpips_random).double()
    opt = small_options(img_size=(32, 32), lambda_lpips=0.5)
    plain, plain_grad = _gradients(opt, model, targets, lpips64)
    out, grad = _gradients(opt.evolve(**BACKWARD_MODES[mode]), model, targets, lpips64)
    assert out.loss.item() == pytest.approx(plain.loss.item(), rel=1e-9)
    assert relative_error(grad, plain_grad) <= 1e-8


def test_backward_loss_calls_the_given_backward_once():
    gaussians, targets = make_batch(num_scenes=2, num_views=2, num_gaussians=60, seed=8)
    model = TinyModel(gaussians)
    calls = []

    def counting_backward(loss):
        calls.append(loss)
        loss.backward()

    for mode in ({}, BACKWARD_MODES["deferred"], BACKWARD_MODES["per-view"]):
        calls.clear()
        static, dynamic = model()
        backward_loss(small_options(**mode), static, targets, dyn_gaussians=dynamic, dyn_aux_weight=0.3,
                      backward=counting_backward)
        assert len(calls) == 1, mode


def test_loss_computer_takes_packed_gaussians(lpips_random):
    gaussians, targets = make_batch(image_hw=(32, 32), seed=9)
    opt = small_options(img_size=(32, 32), lambda_lpips=0.5)
    computer = LossComputer(opt, lpips_model=lpips_random)
    packed = gaussians.pack().requires_grad_()
    direct = compute_loss(opt, gaussians, targets, lpips_random, gaussians.select(slice(100, None)), 0.3)
    result = computer.backward(packed, targets, dyn_aux_weight=0.3, num_static=100)
    assert result.loss.item() == pytest.approx(direct.loss.item(), rel=1e-6)
    assert packed.grad is not None and packed.grad.abs().sum() > 0
    assert computer.evaluate(packed, targets).loss.item() == pytest.approx(compute_loss(opt, gaussians, targets,
                                                                                      lpips_random).loss.item(), rel=1e-6)
    rendered = render_chunked(opt, packed.detach(), targets, chunk_size=1)
    assert torch.allclose(rendered.images, direct.render.images, atol=1e-6)
