"""The TokenGS model: release parity, parameter manifests, checkpoint I/O and init rules, variants."""

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tokengs.data.release_batch import from_release_dict
from tokengs.data.types import Batch, Views
from tokengs.gaussians import Gaussians
from tokengs.models import CheckpointError, TokenGS, load_model_checkpoint, load_weights, save_model
from tokengs.models.checkpoint import dynamic_tokens_from_static, resize_tokens
from tokengs.options import Options, config_defaults

PARITY_TOLERANCE = 1e-4
MANIFEST_PRESETS = ("train_dl3dv_base", "finetune_dl3dv_6view", "eval_dl3dv_latent_6view_lpips",
                    "finetune_dl3dv_kubric_dyn_release")


def _fixture_options(path: Path) -> Options:
    values = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return Options().evolve(**values)


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _random_batch(opt: Options, batch_size: int = 2, seed: int = 0) -> Batch:
    """Random images and rays of opt.num_views views (the first num_input_views the context) at
    times spread over 0..10, first and last views at the ends."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch_size, opt.num_views)
    views = Views(images=torch.rand(*shape, 3, *opt.img_size, generator=g), masks=torch.ones(*shape, 1, *opt.img_size),
                  has_mask=torch.zeros(shape, dtype=torch.bool), w2c=torch.eye(4).expand(*shape, 4, 4),
                  intrinsics=torch.tensor([40.0, 40.0, 24.0, 16.0]).expand(*shape, 4),
                  timesteps=torch.linspace(0, 10, opt.num_views).expand(shape),
                  rays=torch.randn(*shape, 6, *opt.img_size, generator=g))
    return Batch.from_views(views, opt.num_input_views, [f"random_{i}" for i in range(batch_size)])


def _tiny(name: str = "tiny", seed: int = 0, **changes) -> TokenGS:
    torch.manual_seed(seed)
    return TokenGS(config_defaults[name].evolve(**changes))


@torch.no_grad()
def _randomize(model: TokenGS) -> TokenGS:
    """Order-one random weights, as in the release fixtures, so that every path visibly moves the output.

    (The from-scratch init starts every branch near identity: LayerScale 0.01, a zero time embedding.)
    """
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(std=p[0].numel() ** -0.5)
        elif name.endswith("gamma"):
            p.fill_(1.0)
        else:
            p.normal_(mean=1.0 if name.endswith("norm.weight") else 0.0, std=0.1)
    return model


# ---- release parity ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["plain", "latent"])
def test_reference_fixture_parity(name, reference_dir):
    ref_dir = reference_dir
    opt = _fixture_options(ref_dir / f"model_{name}.options.json")
    model = TokenGS(opt).eval()
    load_model_checkpoint(model, ref_dir / f"model_{name}.weights.safetensors", opt, strict=True)
    from safetensors.torch import load_file

    io = load_file(str(ref_dir / f"model_{name}.io.safetensors"))
    batch = from_release_dict({k.removeprefix("batch."): v for k, v in io.items() if k.startswith("batch.")})
    with torch.no_grad():
        gaussians = model.forward_gaussians(batch)
    ref = io["out.gaussians"]
    assert gaussians.shape == ref.shape == (2, opt.num_gaussians, 14)
    ref_fields, our_fields = Gaussians.unpack(ref), Gaussians.unpack(gaussians)
    errors = {f: _relative_error(getattr(our_fields, f), getattr(ref_fields, f))
              for f in ("means", "opacities", "scales", "quats", "colors")}
    worst = _relative_error(gaussians, ref)
    print(f"\n{name}: worst relative error {worst:.2e} over all Gaussians; per field " +
          ", ".join(f"{f} {e:.1e}" for f, e in errors.items()))
    assert worst <= PARITY_TOLERANCE
    assert max(errors.values()) <= PARITY_TOLERANCE


@pytest.mark.parametrize("preset", MANIFEST_PRESETS)
def test_meta_model_matches_release_manifest(preset, reference_dir):
    path = reference_dir / f"state_dict_{preset}.json"
    with torch.device("meta"):
        model = TokenGS(config_defaults[preset])
    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    release = json.loads(path.read_text())
    assert sorted(set(ours) ^ set(release)) == []
    assert {k: v for k, v in ours.items() if release[k] != v} == {}
    assert list(ours) == list(release)  # the release's key order too


# ---- model behaviour -----------------------------------------------------------------------------

def test_init_from_scratch():
    model = _tiny("tiny_kubric_dyn")
    opt = model.opt
    assert model.gs_tokens.std().item() == pytest.approx(opt.gs_token_std, rel=0.2)
    assert model.enc_dec_backbone.latents.std().item() == pytest.approx(0.02, rel=0.3)
    head = model.activation_head.deconv
    assert head.weight.std().item() == pytest.approx(opt.clip_head_readout_std, rel=0.2)
    z_bias = head.bias.view(opt.dec_patch_size**2, 14)[:, 2]
    assert torch.allclose(z_bias, torch.full_like(z_bias, math.log(1 + opt.clip_head_z_init)))
    assert head.bias.view(-1, 14)[:, [0, 1, *range(3, 14)]].abs().max() == 0
    for embed in (model.patch_time_embed, model.patch_time_embed_tgt):
        assert embed.proj.weight.abs().max() == 0 and embed.proj.bias.abs().max() == 0
    assert torch.all(model.enc_dec_backbone.encoder[0].ls1.gamma == 0.01)
    assert torch.all(model.enc_dec_backbone.decoder_blocks[0].mlp_scale.gamma == opt.dec_init_values)
    plain = _tiny("tiny")
    assert torch.allclose(plain.enc_dec_backbone.decoder_blocks[0].gs_cross_attn_scale.gamma,
                          torch.tensor(5e-3 * plain.opt.gs_token_std))
    assert not any("lpips" in name for name in model.state_dict())


@pytest.mark.parametrize("preset", ["tiny", "tiny_latent", "tiny_kubric_dyn"])
def test_encode_decode_steps(preset):
    model = _tiny(preset).eval()
    batch = _random_batch(model.opt)
    with torch.no_grad():
        packed = model.forward_gaussians(batch)
        encoding = model.encode(batch)
        again = model.decode(encoding, gs_tokens=model.learned_tokens().unsqueeze(0).repeat(2, 1, 1),
                             scene_latents=encoding.scene_latents)
    assert packed.shape == (2, model.opt.num_gaussians, 14)
    assert torch.equal(packed, again)
    gaussians = model.gaussians(batch)
    assert torch.allclose(gaussians.quats.norm(dim=-1), torch.ones(2, model.opt.num_gaussians))
    assert gaussians.scales.max() <= model.opt.gaussian_scale_cap
    assert 0 <= gaussians.opacities.min() and gaussians.opacities.max() <= 1


def test_block_causal_mask_isolates_static_gaussians():
    model = _randomize(_tiny("tiny_kubric_dyn")).eval()
    opt = model.opt
    static = opt.num_gs_tokens * opt.dec_patch_size**2
    assert model.dynamic_gaussian_mask().tolist() == [False] * static + [True] * (opt.num_gaussians - static)
    batch = _random_batch(opt)
    tokens = model.learned_tokens().detach().unsqueeze(0).repeat(2, 1, 1)
    with torch.no_grad():
        encoding = model.encode(batch)
        base = model.decode(encoding, gs_tokens=tokens)
        perturbed_dynamic = tokens.clone()
        perturbed_dynamic[:, opt.num_gs_tokens:] += torch.randn_like(perturbed_dynamic[:, opt.num_gs_tokens:])
        out = model.decode(encoding, gs_tokens=perturbed_dynamic)
        assert torch.equal(out[:, :static], base[:, :static])
        assert (out[:, static:] - base[:, static:]).abs().max() > 1e-3
        perturbed_static = tokens.clone()
        perturbed_static[:, 0] += torch.randn_like(perturbed_static[:, 0])  # not a constant: LayerNorm would remove it
        out = model.decode(encoding, gs_tokens=perturbed_static)
        assert (out[:, static:] - base[:, static:]).abs().max() > 1e-3  # dynamic tokens see static ones


def _shift_target_time(batch: Batch) -> Batch:
    """The first target view at another time inside the scene's span: the span, which every view's
    time embedding is rescaled by, stays, and so do the other views' embeddings."""
    times = batch.target.timesteps.clone()
    times[:, 0] = (times[:, 0] + batch.context.timesteps.amin(1)) / 2
    return replace(batch, target=replace(batch.target, timesteps=times))


def test_target_time_offsets_only_dynamic_tokens():
    model = _randomize(_tiny("tiny_kubric_dyn")).eval()
    opt = model.opt
    static = model.num_static_gaussians
    batch = _random_batch(opt)
    shifted = _shift_target_time(batch)
    with torch.no_grad():
        base, moved = model.forward_gaussians(batch), model.forward_gaussians(shifted)
        no_time = model.decode(model.encode(batch), use_target_time=False)
        no_time_shifted = model.decode(model.encode(shifted), use_target_time=False)
    assert torch.equal(base[:, :static], moved[:, :static])
    assert (base[:, static:] - moved[:, static:]).abs().max() > 1e-3
    assert torch.equal(no_time, no_time_shifted)


def test_target_time_offsets_all_tokens_without_dynamic_ones():
    model = _randomize(_tiny("tiny", time_embedding=True, img_size=(64, 64))).eval()  # 64 patches for 64 tokens
    batch = _random_batch(model.opt)
    with torch.no_grad():
        base, moved = model.forward_gaussians(batch), model.forward_gaussians(_shift_target_time(batch))
    per_token_change = (base - moved).abs().amax(dim=(0, 2)).view(model.opt.num_gs_tokens, -1).amax(dim=1)
    assert per_token_change.min() > 1e-4


def test_activation_checkpointing_same_outputs_and_gradients():
    outputs, grads = [], []
    for checkpointing in (False, True):
        model = _randomize(_tiny("tiny_kubric_dyn", activation_checkpointing=checkpointing))
        out = model.forward_gaussians(_random_batch(model.opt))
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch.equal(outputs[0], outputs[1])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0, msg=name)


# ---- checkpoints ---------------------------------------------------------------------------------

def test_save_and_strict_load_round_trip(tmp_path):
    model = _tiny("tiny_latent", seed=1).eval()
    path = tmp_path / "model.safetensors"
    save_model(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    other_file = tmp_path / "other"
    other_file.write_text("")  # the mode Python's files get under this process's umask
    assert path.stat().st_mode == other_file.stat().st_mode  # not safetensors' 0600
    other_file.unlink()
    other = _tiny("tiny_latent", seed=2).eval()
    load_model_checkpoint(other, path, strict=True)
    batch = _random_batch(model.opt)
    with torch.no_grad():
        assert torch.equal(model.forward_gaussians(batch), other.forward_gaussians(batch))


def test_torch_files_with_wrappers_and_ddp_prefix(tmp_path):
    model = _tiny("tiny")
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    for wrapper in ("model", "state_dict"):
        path = tmp_path / f"{wrapper}.pth"
        torch.save({wrapper: state, "epoch": 3}, path)
        loaded = load_weights(path)
        assert loaded.keys() == model.state_dict().keys()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    load_model_checkpoint(_tiny("tiny", seed=5), tmp_path / "plain.pt", strict=True)


@pytest.mark.parametrize("damage", ["truncated", "empty", "missing"])
def test_broken_checkpoint_file_names_the_path(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    save_model(_tiny("tiny"), path)
    if damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    with pytest.raises(CheckpointError, match=str(path).replace(".", r"\.")):
        load_weights(path)
    with pytest.raises(RuntimeError):  # CheckpointError is a RuntimeError
        load_model_checkpoint(_tiny("tiny"), path, strict=False)


def test_wrong_preset_strict_error_names_keys_and_preset():
    model = _tiny("tiny")
    with pytest.raises(CheckpointError) as info:
        load_model_checkpoint(model, _tiny("tiny_latent").state_dict(), strict=True)
    message = str(info.value)
    assert "'tiny_latent'" in message
    assert "missing keys" in message and "enc_dec_backbone.kv_proj.weight" in message
    assert "unexpected keys" in message and "enc_dec_backbone.latents" in message
    assert "... and" in message  # long lists are cut at 20 entries with a count
    misshaped = r"1 mis-shaped keys:\n    gs_tokens: checkpoint \[32, 64\], model \[64, 64\]"
    with pytest.raises(CheckpointError, match=misshaped):
        load_model_checkpoint(model, _tiny("tiny", num_gs_tokens=32).state_dict(), strict=True)


def test_resize_tokens_evenly_spaced_subset():
    tokens = torch.arange(10.0)[:, None].repeat(1, 3)
    subset = resize_tokens(tokens, 4)
    assert subset[:, 0].tolist() == [0.0, 3.0, 6.0, 9.0]  # linspace(0, 9, 4) = 0, 3, 6, 9
    assert resize_tokens(torch.arange(8.0)[:, None], 3)[:, 0].tolist() == [0.0, 3.0, 7.0]  # 0, 3.5, 7 floored


def test_resize_tokens_repeats_with_noise():
    torch.manual_seed(0)
    tokens = torch.randn(5, 512)
    grown = resize_tokens(tokens, 13)
    assert grown.shape == (13, 512)
    assert torch.equal(grown[:5], tokens)
    noise = grown[5:] - tokens[torch.arange(8) % 5]  # copies cycle through the existing tokens in order
    assert noise.std().item() == pytest.approx(0.01, rel=0.05)
    assert noise.mean().abs().item() < 1e-3


def test_dynamic_tokens_from_static_rules():
    static = torch.arange(6.0)[:, None].repeat(1, 4)
    same = dynamic_tokens_from_static(static, 6)
    assert torch.equal(same, static) and same.data_ptr() != static.data_ptr()
    assert dynamic_tokens_from_static(static, 14)[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1]
    subset = dynamic_tokens_from_static(static, 4, generator=torch.Generator().manual_seed(0))[:, 0]
    assert len(set(subset.tolist())) == 4 and set(subset.tolist()) <= set(range(6))


def test_tolerant_loading_applies_init_rules(caplog):
    source = _tiny("tiny_latent", seed=3, num_gs_tokens=16, num_latents=8)
    state = source.state_dict()
    state["stale.extra"] = torch.zeros(1)
    model = _tiny("tiny_kubric_dyn", seed=4, init_tokens_from_existing=True, init_latents_from_existing=True,
                  init_dynamic_tokens_from_static=True)
    with caplog.at_level(logging.WARNING, logger="tokengs.models.checkpoint"):
        report = load_model_checkpoint(model, state, strict=False)
    # 16 -> 64 static tokens: the checkpoint's first, then noisy copies
    assert torch.equal(model.gs_tokens[:16], state["gs_tokens"])
    assert (model.gs_tokens[16:32] - state["gs_tokens"]).abs().max() < 0.1
    # 8 -> 16 latents by the same rule
    assert torch.equal(model.enc_dec_backbone.latents[:8], state["enc_dec_backbone.latents"])
    # 8 dynamic tokens: a random subset of the (resized) static tokens
    static_rows = {tuple(r) for r in model.gs_tokens.tolist()}
    assert all(tuple(r) in static_rows for r in model.gs_tokens_dynamic.tolist())
    assert torch.equal(model.enc_dec_backbone.encoder[1].attn.qkv.weight,
                       state["enc_dec_backbone.encoder.1.attn.qkv.weight"])
    assert any("stale.extra" in s for s in report.skipped)
    assert any("patch_time_embed.proj.weight" in s for s in report.skipped)
    assert "stale.extra" in caplog.text and "patch_time_embed_tgt.proj.bias" in caplog.text


def test_tolerant_loading_without_rules_keeps_fresh_tokens():
    model = _tiny("tiny", seed=6)
    fresh = model.gs_tokens.detach().clone()
    report = load_model_checkpoint(model, _tiny("tiny", seed=7, num_gs_tokens=32).state_dict(), strict=False)
    assert torch.equal(model.gs_tokens, fresh)
    assert any(s.startswith("gs_tokens: checkpoint [32, 64]") for s in report.skipped)


def test_head_norm_keeps_half_precision_under_autocast_and_equals_layer_norm_otherwise():
    from tokengs.models.layers import HeadNorm

    torch.manual_seed(0)
    norm, reference = HeadNorm(16, eps=1e-5), torch.nn.LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1), norm.bias.normal_(0.0, 0.1)
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(2, 4, 8, 16)
    assert torch.equal(norm(x), reference(x))  # float32: nn.LayerNorm itself
    half = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(half)
    assert out.dtype == torch.bfloat16
    plain = reference(half.detach().float())  # what CUDA autocast's float32 LayerNorm computes
    assert (out.float() - plain).abs().max() <= 0.05  # bf16 rounding of values of order 1
    out.float().square().sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.dtype == torch.float32 and half.grad is not None


def test_read_shapes_maps_a_torch_file_and_still_reads_the_pre_zip_format(tmp_path):
    from tokengs.models.checkpoint import read_shapes

    state = {"module.gs_tokens": torch.randn(3, 4), "_orig_mod.head.bias": torch.zeros(2)}
    expected = {"gs_tokens": (3, 4), "head.bias": (2,)}
    torch.save({"model": state}, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    assert read_shapes(tmp_path / "zip.pt") == expected
    assert read_shapes(tmp_path / "legacy.pt") == expected
    (tmp_path / "cut.pt").write_bytes((tmp_path / "zip.pt").read_bytes()[:300])
    with pytest.raises(CheckpointError, match="cut.pt cannot be read by torch.load"):
        read_shapes(tmp_path / "cut.pt")
