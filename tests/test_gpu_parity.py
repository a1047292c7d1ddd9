"""gsplat (CUDA) against the pure-PyTorch rasterizer: images, alphas, depths, culling, gradients.

Runs only where CUDA is available; scripts/render_parity.py prints the same numbers as a table.
"""

import sys
from pathlib import Path

import pytest
import torch

from conftest import target_views

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from render_parity import check_report, compare_backends, fixture_cases, random_cases  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="gsplat needs CUDA: the parity of the two backends is measured on a GPU machine")]


@pytest.mark.parametrize("case", random_cases(), ids=lambda scene: scene.name)
def test_random_scenes(case):
    report = compare_backends(case.to("cuda"))
    print(report)
    assert not check_report(report), check_report(report)


def test_fixture_gaussians(reference_dir):
    for case in fixture_cases(reference_dir):
        report = compare_backends(case.to("cuda"))
        print(report)
        assert not check_report(report), check_report(report)


def test_gsplat_matches_torch_loss_and_ssim_on_cuda():
    """The whole loss on CUDA (gsplat, fused-ssim when installed) against the CPU path."""
    from tokengs.losses import compute_loss
    from tokengs.options import Options

    case = random_cases()[0]
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(*case.w2c.shape[:2], 3, *case.image_hw, generator=gen)
    targets = target_views(images, case.w2c, case.intrinsics)
    opt = Options(img_size=case.image_hw, rgb_loss_type="l1", lambda_ssim=0.2, lambda_opacity=0.01)
    cpu = compute_loss(opt, case.gaussians, targets)
    gpu = compute_loss(opt, case.gaussians.map(lambda t: t.cuda()), targets.to("cuda"))
    assert gpu.loss.item() == pytest.approx(cpu.loss.item(), rel=1e-3)
    for name, value in cpu.per_scene.items():
        assert torch.allclose(gpu.per_scene[name].cpu(), value, rtol=1e-3, atol=1e-5), name


def test_compiled_blocks_give_the_same_outputs_and_gradients():
    """compile_blocks (torch.compile per block) against eager, float32 on CUDA. The key LayerNorms'
    biases are left out of the gradient check: adding one vector to every key shifts all logits
    of a query equally, so their true gradient is zero and both sides hold rounding noise."""
    from test_model import _random_batch, _randomize, _tiny

    results = []
    for compiled in (False, True):
        model = _randomize(_tiny("tiny_kubric_dyn", compile_blocks=compiled)).cuda()
        batch = _random_batch(model.opt).to("cuda")
        out = model.forward_gaussians(batch)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for name, grad in eager_grads.items():
        if "k_norm.bias" in name or "k_proj_norm.bias" in name:
            continue
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), compiled_grads[name].flatten(), dim=0)
        assert cosine > 0.9999, (name, float(cosine))


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
def test_scene_latent_tuning_replays_a_cuda_graph_with_the_same_steps(bf16, monkeypatch):
    """ttt_cuda_graph: scene-latent tuning captures its decode once and replays it. The loss of
    every step and the tuned Gaussians match the plain loop's; token-tuning never captures."""
    from contextlib import nullcontext

    import benchmark
    from tokengs import ttt
    from tokengs.losses import LossComputer
    from tokengs.models import TokenGS

    device = torch.device("cuda")
    captures = []
    capture = torch.cuda.make_graphed_callables
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", lambda *a, **k: captures.append(1) or capture(*a, **k))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext
    for case, graphs in (("ttt_latent", 1), ("ttt_6view", 0)):
        opt = benchmark.case_options(benchmark.CASES[case], smoke=True).evolve(ttt_n_steps=6, ttt_lr=1e-2)
        torch.manual_seed(0)
        model = TokenGS(opt).to(device).eval()
        batch = benchmark.random_batch(opt, device)
        loss = LossComputer(opt, device=device)
        weights = {name: p.detach().clone() for name, p in model.named_parameters()}
        runs = []
        for use_graph in (False, True):
            captures.clear()
            losses = []
            record = lambda packed, targets: losses.append(loss(packed, targets)) or losses[-1]
            with autocast():
                with torch.no_grad():
                    encoding = model.encode(batch)
                tuned = ttt.test_time_tune(model, encoding, batch.context, opt.evolve(ttt_cuda_graph=use_graph), record)
            runs.append((torch.stack([out.loss.detach() for out in losses]), tuned.float()))
            assert len(captures) == (graphs if use_graph else 0), case
        (plain_losses, plain), (graph_losses, graphed) = runs
        tolerance = 2e-2 if bf16 else 1e-4
        assert torch.allclose(graph_losses, plain_losses, rtol=tolerance), (case, plain_losses, graph_losses)
        assert float((graphed - plain).abs().max() / plain.abs().max()) < tolerance, case
        assert all(torch.equal(p, weights[name]) and p.requires_grad for name, p in model.named_parameters())
