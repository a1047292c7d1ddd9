"""scripts/benchmark.py at its --smoke size: every case runs and reports what it measured, and the
inputs it saves time the same work when read back."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import benchmark  # noqa: E402

CPU = torch.device("cpu")


def test_smoke_runs_every_case_and_writes_json(tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--smoke", "--out", str(out),
                           "--save_inputs", str(tmp_path / "inputs")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "results.json").read_text())
    cases = [r["case"] for r in report["results"]]
    assert cases == list(benchmark.CASES)
    for r in report["results"]:
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"], r
        assert r["repeats"] == 2
        assert 0 <= r["coverage"] <= 1 and r["mean_radius_px"] > 0
        assert r["gaussians"] == ("trained" if r["case"].startswith("ttt") else "fresh")
        if r["case"].startswith(("train", "recon")):
            assert r["model_tflops"] > 0  # the FLOP counter saw the model's matmuls
        for name in ("weights.safetensors", "batch.safetensors", "case.json"):
            assert (tmp_path / "inputs" / r["case"] / name).is_file()
    assert list((out / "trained").glob("trained_*.safetensors"))  # the tuning cases' trained models, cached
    # recon_6view and train_6view_b1 time the same fresh model: one file, hard-linked
    inputs = tmp_path / "inputs"
    assert (inputs / "recon_6view" / "weights.safetensors").samefile(inputs / "train_6view_b1" / "weights.safetensors")
    assert "median ms" in done.stdout  # the table


def test_compare_sets_each_case_beside_the_earlier_run_of_the_same_work(tmp_path, capsys):
    earlier = tmp_path / "earlier.json"
    assert benchmark.main(["--smoke", "--out", str(tmp_path / "now"), "--cases", "recon_6view", "ttt_6view",
                           "--gaussians", "fresh", "--compare", str(earlier)]) == 2
    assert f"--compare {earlier}: not a benchmark results.json" in capsys.readouterr().err  # before any case ran
    assert not (tmp_path / "now").exists()

    previous = {"case": "recon_6view", "gaussians": "fresh", "weights": "", "batch": "",
                "activation_checkpointing": False, "compile_blocks": False, "render_tile_size": 0,
                "median_ms": 1000.0, "peak_gib": float("nan")}
    other_switch = dict(previous, case="ttt_6view", compile_blocks=True)  # not the same work: no pair
    earlier.write_text(json.dumps({"results": [previous, other_switch]}))
    assert benchmark.main(["--smoke", "--out", str(tmp_path / "now"), "--cases", "recon_6view", "ttt_6view",
                           "--gaussians", "fresh", "--compare", str(earlier)]) == 0
    now = {r["case"]: r for r in json.loads((tmp_path / "now" / "results.json").read_text())["results"]}
    lines = capsys.readouterr().out.split(f"against {earlier}:")[1].strip().splitlines()
    assert lines[0].split() == ["case", "gaussians", "before", "ms", "now", "ms", "speed-up", "before", "GiB", "now",
                                "GiB"]
    assert lines[1].split()[:5] == ["recon_6view", "fresh", "1000.0", f"{now['recon_6view']['median_ms']:.1f}",
                                    f"{1000.0 / now['recon_6view']['median_ms']:.2f}x"]
    assert lines[2].split()[:5] == ["ttt_6view", "fresh", "-", f"{now['ttt_6view']['median_ms']:.1f}", "-"]


def gaussians_and_loss(model, batch, opt):
    with torch.no_grad():
        packed = model.forward_gaussians(batch)
        return packed, benchmark.LossComputer(opt)(packed, batch.target).loss


def test_saved_inputs_reload_to_the_same_outputs_bit_for_bit(tmp_path):
    """--save_inputs, then --weights/--batch of what it wrote: the same Gaussians and loss, bit for bit."""
    for name, gaussians in (("train_latent_b4", "spread"), ("recon_6view", "fresh")):
        opt = benchmark.case_options(benchmark.CASES[name], smoke=True)
        model, batch = benchmark.case_inputs(name, opt, CPU, gaussians)
        benchmark.save_inputs(tmp_path, name, model, batch, opt, {"preset": "tiny", "kind": "train", "options": {}}, {})
        reloaded_model, reloaded_batch = benchmark.case_inputs(name, opt, CPU, "fresh", weights=tmp_path,
                                                               batch_file=tmp_path)
        before, after = gaussians_and_loss(model, batch, opt), gaussians_and_loss(reloaded_model, reloaded_batch, opt)
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1]), name
        assert reloaded_batch.context.images.shape[0] == opt.batch_size
        # a single file serves as well as the directory
        single = benchmark.case_inputs(name, opt, CPU, "fresh", weights=tmp_path / name / "weights.safetensors",
                                       batch_file=tmp_path / name / "batch.safetensors")
        assert torch.equal(gaussians_and_loss(*single, opt)[0], before[0])


def test_spread_gaussians_reach_the_intended_distribution():
    """--gaussians spread: the head is re-drawn so that each Gaussian of the fresh model gets its
    own place, size and opacity with the documented statistics, and they cost fewer tiles."""
    import math

    for preset_case in ("train_6view_b1", "ttt_latent"):  # gaussian_z_offset 1 and 0
        opt = benchmark.case_options(benchmark.CASES[preset_case], smoke=True)
        model = benchmark.fresh_model(opt, CPU)
        batch = benchmark.random_batch(opt)
        before = benchmark.tile_statistics(opt, model, batch)
        benchmark.spread_gaussians(model, batch)
        after = benchmark.tile_statistics(opt, model, batch)
        with torch.no_grad():
            g = model.gaussians(batch)
        raw = benchmark.SPREAD_RAW
        depth = g.means[..., 2]
        assert abs(float(depth.median()) - raw["depth"]) < 0.2
        p = depth - opt.gaussian_z_offset
        spread = float((torch.sign(p) * torch.log1p(p.abs())).std())  # of the raw z, through the activation's inverse
        assert 0.7 * raw["depth_log_std"] < spread < 1.3 * raw["depth_log_std"]
        scale_raw = torch.log(g.scales) + 1 - math.log(opt.gaussian_scale_cap)
        assert abs(float(scale_raw.mean()) - raw["scale_mean"]) < 0.1
        assert abs(float(torch.logit(g.opacities).mean()) + opt.opacity_bias - raw["opacity_mean"]) < 0.15
        assert after["mean_radius_px"] < before["mean_radius_px"] / 3
        assert after["tile_pairs_per_view"] < before["tile_pairs_per_view"]


def test_spread_head_keeps_the_gain_of_a_linear_layer():
    """The 6-view model's decoder passes its 0.01-sized tokens through almost unchanged; a head
    drawn onto features that small had weights of ~1 and 200 AdamW steps at 1e-4 culled every
    Gaussian. With the tokens scaled to unit size, one step of lr 1e-4 on every feature moves no
    raw output by more than 0.01."""
    opt = benchmark.case_options(benchmark.CASES["train_6view_b1"], smoke=False).evolve(
        img_size=(32, 48), enc_embed_dim=64, enc_depth=1, dec_depth=2, num_gs_tokens=32)  # token_dim 1024 kept
    model = benchmark.fresh_model(opt, CPU)
    benchmark.spread_gaussians(model, benchmark.random_batch(opt))
    assert float(model.activation_head.deconv.weight.detach().abs().sum(1).max()) * benchmark.TRAIN_LR < 0.01
    assert float(model.gs_tokens.detach().std()) > 0.5


def test_trained_recipe_trains_only_the_gaussian_tokens_and_the_head():
    """The recipe trains the Gaussian tokens and the head alone; the backbone stays fresh."""
    opt = benchmark.case_options(benchmark.CASES["ttt_6view"], smoke=True)
    model, training = benchmark.train_on_rooms(opt, CPU, steps=2)
    train_opt = opt.evolve(evaluating=False, batch_size=1, num_views=opt.num_input_views + benchmark.TRAIN_TARGETS)
    fresh = dict(benchmark.fresh_model(train_opt, CPU).named_parameters())
    moved = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), fresh[name].detach())}
    assert moved and all(name.startswith(benchmark.TRAINED_PARAMETERS) for name in moved), moved
    assert "activation_head.deconv.weight" in moved and "gs_tokens" in moved
    assert all(p.requires_grad for p in model.parameters())  # tuning the loaded model is unaffected
    assert [step for step, _ in training["loss"]] == [0, 1] and training["skipped_steps"] == []


def test_trained_recipe_skips_a_step_whose_gradient_is_not_finite(monkeypatch):
    """One NaN gradient (a Gaussian center in a camera plane did this about once in 20 steps on an
    H200) used to turn every trained weight NaN; the step is skipped and listed, as training does."""
    opt = benchmark.case_options(benchmark.CASES["ttt_6view"], smoke=True)
    spread, backward_calls = benchmark.spread_gaussians, []

    def spread_then_poison_step_1(model, batch):
        spread(model, batch)

        def poison(grad):
            backward_calls.append(None)
            return grad * float("nan") if len(backward_calls) == 2 else grad
        model.gs_tokens.register_hook(poison)
    monkeypatch.setattr(benchmark, "spread_gaussians", spread_then_poison_step_1)
    model, training = benchmark.train_on_rooms(opt, CPU, steps=3)
    assert len(backward_calls) == 3 and training["skipped_steps"] == [1]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def collapsed(model):
    """`model` with every opacity far below gsplat's 1/255 culling threshold: nothing renders."""
    head = model.activation_head
    with torch.no_grad():  # the raw opacity is each Gaussian's last raw value (head.RAW_LAYOUT)
        head.deconv.bias.view(head.gaussians_per_token, -1)[:, -1] = -30.0
    return model


def test_trained_gaussians_that_render_nothing_are_not_timed(tmp_path, capsys):
    """A trained model whose Gaussians are all culled (the 6-view collapse) or cover too little
    of the image is refused, with the reason; the other cases run and the exit status is 1."""
    name = "ttt_6view"
    opt = benchmark.case_options(benchmark.CASES[name], smoke=True)
    path = benchmark.trained_path(opt, tmp_path / "trained", benchmark.SMOKE_TRAIN_STEPS)
    path.parent.mkdir()
    benchmark.save_model(collapsed(benchmark.fresh_model(opt, CPU)), path)
    model, batch = benchmark.case_inputs(name, opt, CPU, "trained", cache=tmp_path / "trained",
                                         train_steps=benchmark.SMOKE_TRAIN_STEPS)
    statistics = benchmark.tile_statistics(opt, model, batch)
    assert statistics["mean_radius_px"] == 0 and statistics["coverage"] == 0

    code = benchmark.main(["--smoke", "--out", str(tmp_path), "--cases", name, "recon_latent",
                           "--gaussians", "trained"])
    assert code == 1
    err = capsys.readouterr().err
    assert f"{name}: the trained Gaussians cover 0%" in err and str(path) in err
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["case"] for r in results] == ["recon_latent"]  # another architecture, trained for itself
    # a covering share below the threshold is refused as well, above it passes
    with pytest.raises(benchmark.CollapsedGaussians, match="cover 40%"):
        benchmark.check_trained(name, {"mean_radius_px": 3.0, "coverage": 0.4}, path)
    benchmark.check_trained(name, {"mean_radius_px": 3.0, "coverage": 0.6}, path)
