"""Speed and memory of the release's anchor cases, on inputs that can be saved and timed again
elsewhere (the release's own code included).

    python scripts/benchmark.py --out DIR [--cases train_6view_b4 ttt_latent ...]
        [--gaussians fresh|spread|trained ...] [--weights PATH] [--batch PATH] [--save_inputs DIR]
        [--compare EARLIER/results.json]

Per case: median, min and max milliseconds over the timed repeats after warm-up (3 and 10; 1
and 3 for the tuning cases, 50 steps each), peak GiB, model TFLOP/s (the model's forward FLOPs
from torch's FLOP counter, x3 for a training step; rendering is not counted), and what rendering
the case's Gaussians costs (their mean screen radius, the (Gaussian, tile) pairs per view, the
share of the pixels they cover; measured before the timed steps). SSIM
and LPIPS terms are off like the anchors'; bf16 autocast on CUDA, and training's fused AdamW.
The table goes to stdout, every result to DIR/results.json; `--compare` sets each case beside an
earlier run's of the same work (before and now: median ms, peak GiB, speed-up).

What is timed. `--gaussians` (several may be given; each case runs once per value; default:
trained for the tuning cases, fresh for the others):
  fresh    the preset's untrained model (seed 0), on random images seen by cameras on a narrow
           arc (`random_batch`); its Gaussians sit in one clump and each covers much of the image.
  spread   the same, with the Gaussian tokens scaled to unit size and the activation head
           re-drawn so that the Gaussians spread and shrink like a trained model's (`spread_gaussians`).
  trained  a model trained on generated rooms (`train_on_rooms`: the spread model's Gaussian
           tokens and head, trained TRAIN_STEPS steps at lr TRAIN_LR, batch 1, on TRAIN_ROOMS rooms
           of seed 0; the backbone stays fresh; steps with a non-finite gradient skipped and listed
           in the cache's .json), on held-out rooms of seed 1 (`held_out_batch`).
           Trained once per architecture and cached in
           DIR/trained/ (a later run reuses it; --train_steps sets the steps). A case whose trained
           Gaussians cover less than MIN_COVERAGE of the pixels, or none at all, is not timed
           (`check_trained`; the run goes on and exits with status 1).
`--weights PATH` and `--batch PATH` replace the model and the batch: a FILE serves every case, a
DIR (as --save_inputs writes it) gives each case DIR/<case>/weights.safetensors and
DIR/<case>/batch.safetensors.

Files. `--save_inputs DIR` writes, per case, exactly what was timed:
  DIR/<case>/weights.safetensors  the model's state dict under the release's parameter names
      (float32), which the release's model and ours (`--weights`) load strictly for the preset.
      Cases that time the same weights share one file (hard links).
  DIR/<case>/batch.safetensors    one batch as the release's batch dict, float32 [B, ...]:
      input [B, V, 3 + T + 6, H, W] (ImageNet-normalized RGB | T time channels | Plücker rays
      (o x d, d)), the context then the target views; images_all, images_input, images_output
      [B, V | V_in | V_out, 3, H, W] in [0, 1]; intrinsics_all, intrinsics_input, intrinsics
      [B, ., 4] (fx, fy, cx, cy in pixels); cam_view_all, cam_view_input, cam_view [B, ., 4, 4]
      world-to-camera TRANSPOSED; cam_to_world_input [B, V_in, 4, 4]; rays_os, rays_ds
      [B, V, 3, H, W]; masks_all, masks_output [B, V | V_out, 1, H, W]; has_mask [B] bool; and
      ours: timesteps [B, V]; the scene names in the metadata. The model reads input's first
      V_in views; training renders cam_view/intrinsics against images_output; tuning renders
      cam_view_input/intrinsics_input against the context images. A run on a saved batch times
      the same tensors as the run that saved it: every batch is timed as it reads back from
      this format (`release_form`), never from the tensors it was made of.
  DIR/<case>/case.json            the preset, the kind of step, the options the case changes.
`--smoke` runs every case at the tiny presets' size on whatever device there is (a CPU test).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tokengs.cli import CommandParser  # noqa: E402
from tokengs.data import synthetic  # noqa: E402
from tokengs.data.provider import preprocess_views  # noqa: E402
from tokengs.data.release_batch import (from_release_dict, load_release_batch, save_release_batch,  # noqa: E402
                                        to_release_dict)
from tokengs.data.types import Batch, collate  # noqa: E402
from tokengs.losses import LossComputer  # noqa: E402
from tokengs.models import TokenGS  # noqa: E402
from tokengs.models.checkpoint import preset_manifest, save_model  # noqa: E402
from tokengs.options import Options, get_preset  # noqa: E402
from tokengs.rendering import render_chunked  # noqa: E402
from tokengs.rendering.common import AUTO_TILE, resolve_tile_size, tile_pairs  # noqa: E402
from tokengs.startup import build_model  # noqa: E402
from tokengs.train import build_optimizer  # noqa: E402
from tokengs.ttt import test_time_tune  # noqa: E402

# The release's own figures (its fresh model on its near-identity camera batch, one H200, no
# compile; DESIGN.md): a different workload from ours unless it is timed on our saved inputs.
RELEASE_MS = {"train_6view_b1": 173, "train_6view_b4": 590, "train_latent_b1": 253, "train_latent_b4": 954,
              "recon_6view": 57.2, "ttt_6view": 6793, "recon_latent": 92.4, "ttt_latent": 5034}
RELEASE_GIB = {"train_6view_b1": 9.6, "train_6view_b4": 26.8, "train_latent_b1": 17.3, "train_latent_b4": 52.3}


@dataclass(frozen=True)
class Case:
    preset: str
    kind: str  # "train", "recon" or "ttt"
    batch_size: int = 1


CASES = {
    "train_6view_b1": Case("finetune_dl3dv_6view", "train", 1),
    "train_6view_b4": Case("finetune_dl3dv_6view", "train", 4),
    "train_latent_b1": Case("finetune_dl3dv_latent_6view_ssim", "train", 1),
    "train_latent_b4": Case("finetune_dl3dv_latent_6view_ssim", "train", 4),
    "recon_6view": Case("eval_dl3dv_6view", "recon"),
    "ttt_6view": Case("eval_dl3dv_6view", "ttt"),
    "recon_latent": Case("eval_dl3dv_latent_6view_ssim", "recon"),
    "ttt_latent": Case("eval_dl3dv_latent_6view_ssim", "ttt"),
}
SMOKE_PRESETS = {"finetune_dl3dv_6view": "tiny", "eval_dl3dv_6view": "tiny", "finetune_dl3dv_latent_6view_ssim": "tiny_latent",
                 "eval_dl3dv_latent_6view_ssim": "tiny_latent"}
GAUSSIANS = ("fresh", "spread", "trained")
DEFAULT_GAUSSIANS = {"train": "fresh", "recon": "fresh", "ttt": "trained"}
# (warm-up, timed repeats) per kind of step; a tuning repeat is ttt_n_steps (50) steps already
REPEATS = {"train": (3, 10), "recon": (3, 10), "ttt": (1, 3)}
EVAL_TARGETS = 8  # target views of an evaluation batch (tuning renders the context views)

# --gaussians trained: generated rooms, metric (walls 3-5 m from the walk); scale 0.4 puts them
# 1-2 units away, where the fresh (depth 1) and spread (depth 2) models start.
TRAIN_SEED, HELD_OUT_SEED = 0, 1
TRAIN_ROOMS, ROOM_FRAMES, TRAIN_TARGETS = 8, 16, 4
ROOM_SCENE_SCALE = 0.4
TRAIN_STEPS, SMOKE_TRAIN_STEPS, TRAIN_LR = 200, 2, 1e-4
# What trains: the parameters that place the Gaussians, the Gaussian tokens and the activation head
# (the backbone stays at its fresh initialization). A step whose gradient is not finite is skipped,
# as training skips it.
TRAINED_PARAMETERS = ("gs_tokens", "activation_head.")
# Changes with the code of the recipe (2: the spread model's tokens of unit size; 3: only
# TRAINED_PARAMETERS train; 4: non-finite steps skipped), renaming the cached models.
TRAINED_RECIPE = 4
# Trained Gaussians must cover this share of the held-out views' pixels to be timed (`check_trained`).
MIN_COVERAGE = 0.5


def case_options(case: Case, smoke: bool, **switches) -> Options:
    """The case's preset, SSIM and LPIPS off; switches: activation_checkpointing, compile_blocks,
    render_tile_size."""
    opt = get_preset(SMOKE_PRESETS[case.preset] if smoke else case.preset)
    changes = dict(lambda_ssim=0.0, lambda_lpips=0.0, batch_size=case.batch_size, **switches)
    if case.kind != "train":
        changes.update(evaluating=True)
    if smoke:
        changes.update(ttt_n_steps=2)
        if case.kind != "train" and "latent" in case.preset:
            changes.update(ttt_mode="scene-latent-tuning")
    return opt.evolve(**changes)


def batch_views(opt: Options) -> int:
    """Views per scene: num_views for training, the context and EVAL_TARGETS targets for evaluation."""
    return opt.num_input_views + EVAL_TARGETS if opt.evaluating else opt.num_views


def scene_batch(opt: Options, rgbs: torch.Tensor, c2ws: torch.Tensor, intrinsics: torch.Tensor, name: str,
                scene_scale: float) -> Batch:
    """Frames of one scene along its path, [V, 3, H, W] / [V, 4, 4] / [V, 4] -> a Batch of one
    scene through the real input pipeline: num_input_views context frames evenly over the path,
    the frames between them as targets."""
    num_views = rgbs.shape[0]
    context = torch.linspace(0, num_views - 1, opt.num_input_views).round().long()
    targets = torch.tensor([i for i in range(num_views) if i not in set(context.tolist())], dtype=torch.long)
    order = torch.cat([context, targets])
    views = preprocess_views(opt, rgbs[order], None, None, c2ws[order], intrinsics[order],
                             order.float(), scene_scale=scene_scale)
    return Batch.from_views(views, opt.num_input_views, [name])


def random_batch(opt: Options, device: torch.device = torch.device("cpu"), seed: int = 0) -> Batch:
    """B scenes of random images, seen by cameras on a narrow arc around a point 2 units ahead,
    so that every view sees the Gaussians of a fresh model (which start 0.1 to 1 unit ahead of
    the normalized camera)."""
    generator = torch.Generator().manual_seed(seed)
    height, width = opt.img_size
    num_views = batch_views(opt)
    scenes = []
    for index in range(opt.batch_size):
        angles = torch.linspace(-0.02, 0.02, num_views)
        c2ws = torch.eye(4).repeat(num_views, 1, 1)
        c2ws[:, 0, 0], c2ws[:, 0, 2], c2ws[:, 2, 0], c2ws[:, 2, 2] = angles.cos(), angles.sin(), -angles.sin(), angles.cos()
        c2ws[:, 0, 3], c2ws[:, 2, 3] = -2 * angles.sin(), 2 - 2 * angles.cos()  # looking at (0, 0, 2)
        intrinsics = torch.tensor([0.8 * width, 0.8 * width, width / 2, height / 2]).repeat(num_views, 1)
        rgbs = torch.rand(num_views, 3, height, width, generator=generator)
        scenes.append(scene_batch(opt, rgbs, c2ws, intrinsics, f"random_{index}", scene_scale=1.0))
    return collate(scenes).to(device)


@lru_cache(maxsize=None)
def generated_room(seed: int, index: int, frames: int, image_hw: tuple[int, int]):
    """One generated room (tokengs.data.synthetic), ray-cast along a DL3DV-like walk at image_hw
    -> rgbs [F, 3, H, W], c2ws [F, 4, 4] (metric), intrinsics [F, 4]."""
    rng = np.random.default_rng([seed, index])
    textures = synthetic.make_textures(image_hw[1])
    primitives, lo, hi = synthetic.room_scene(rng, len(textures), rng.uniform([6, 5, 2.8], [10, 8, 3.4]))
    c2ws = synthetic.room_walk(rng, frames, lo, hi)
    intrinsics = synthetic.default_intrinsics(rng, image_hw)
    rgbs = [synthetic.render(primitives, textures, c2w, intrinsics, image_hw)[0] for c2w in c2ws]
    return (torch.from_numpy(np.stack(rgbs)).permute(0, 3, 1, 2), torch.from_numpy(c2ws).float(),
            torch.from_numpy(intrinsics).float().repeat(frames, 1))


def held_out_batch(opt: Options) -> Batch:
    """B held-out rooms (seed HELD_OUT_SEED), each walked in batch_views(opt) frames."""
    frames = batch_views(opt)
    return collate([scene_batch(opt, *generated_room(HELD_OUT_SEED, index, frames, tuple(opt.img_size)),
                                f"room_{HELD_OUT_SEED}_{index}", ROOM_SCENE_SCALE) for index in range(opt.batch_size)])


def release_form(batch: Batch, opt: Options) -> Batch:
    """`batch` as a batch file holds it (through the release's dict and back), so that a batch
    timed here and one read from its saved file are the same tensors."""
    return from_release_dict(to_release_dict(batch, opt))


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (training's mixed precision), none on the CPU."""
    return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext


def fresh_model(opt: Options, device: torch.device) -> TokenGS:
    """The preset's untrained model, initialized on `device` from seed 0."""
    torch.manual_seed(0)
    with device:
        return TokenGS(opt)


def train_on_rooms(opt: Options, device: torch.device, steps: int, lr: float = TRAIN_LR) -> tuple[TokenGS, dict]:
    """The preset's architecture trained on generated rooms -> (model, {"loss": [(step, loss)],
    "skipped_steps": [steps whose gradient was not finite, left out as training leaves them out]}).

    Starts from the spread model (so that the Gaussians start apart, as a finetune starts from
    trained weights), then `steps` AdamW steps of batch 1 at a constant `lr` with the case's loss,
    each on num_input_views + TRAIN_TARGETS random frames (in path order) of one of TRAIN_ROOMS rooms
    of ROOM_FRAMES frames (seed TRAIN_SEED). Only TRAINED_PARAMETERS train (see there why).
    """
    train_opt = opt.evolve(evaluating=False, batch_size=1, num_views=opt.num_input_views + TRAIN_TARGETS, lr=lr)
    rooms = [generated_room(TRAIN_SEED, index, ROOM_FRAMES, tuple(opt.img_size)) for index in range(TRAIN_ROOMS)]
    rng = np.random.default_rng(TRAIN_SEED)

    def sample() -> Batch:
        rgbs, c2ws, intrinsics = rooms[rng.integers(len(rooms))]
        frames = torch.from_numpy(np.sort(rng.choice(ROOM_FRAMES, train_opt.num_views, replace=False)))
        return scene_batch(train_opt, rgbs[frames], c2ws[frames], intrinsics[frames], "room",
                           ROOM_SCENE_SCALE).to(device)

    model = fresh_model(train_opt, device)
    spread_gaussians(model, sample())
    frozen = [p for name, p in model.named_parameters() if not name.startswith(TRAINED_PARAMETERS)]
    for parameter in frozen:
        parameter.requires_grad_(False)  # build_optimizer leaves them out
    model.train()
    optimizer = build_optimizer(train_opt, model)
    loss = LossComputer(train_opt, device=device)
    autocast = autocast_for(device)
    curve, skipped = [], []
    for step in range(steps):
        batch = sample()
        with autocast():
            packed = model.forward_gaussians(batch)
        out = loss.backward(packed.float(), batch.target)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train_opt.gradient_clip)
        if torch.isfinite(grad_norm):
            optimizer.step()
        else:  # skipped as training skips it: one NaN step would turn every weight it touches NaN
            skipped.append(step)
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            curve.append((step, float(out.loss)))
    for parameter in frozen:
        parameter.requires_grad_(True)
    return model.eval(), {"loss": curve, "skipped_steps": skipped}


def trained_path(opt: Options, cache: Path, steps: int) -> Path:
    """cache/trained_<digest>_<steps>.safetensors: the digest of opt's architecture and of the recipe
    (so that a changed recipe trains again instead of reusing an older model)."""
    recipe = [sorted(preset_manifest(opt).items()), TRAINED_RECIPE, TRAIN_LR, TRAIN_ROOMS, ROOM_FRAMES,
              TRAIN_TARGETS, ROOM_SCENE_SCALE, SPREAD_RAW]
    return cache / f"trained_{hashlib.sha1(json.dumps(recipe).encode()).hexdigest()[:10]}_{steps}.safetensors"


def trained_weights(opt: Options, device: torch.device, cache: Path, steps: int) -> Path:
    """The file of `train_on_rooms`'s model for opt's architecture (`trained_path`), trained and
    written (with a .json of its training) when missing."""
    path = trained_path(opt, cache, steps)
    if not path.exists():
        start = time.perf_counter()
        model, training = train_on_rooms(opt, device, steps)
        cache.mkdir(parents=True, exist_ok=True)
        save_model(model, path)
        record = {"steps": steps, "lr": TRAIN_LR, "rooms": TRAIN_ROOMS, "seconds": time.perf_counter() - start,
                  **training}
        path.with_suffix(".json").write_text(json.dumps(record, indent=1))
        print(f"trained weights {path.name}: {json.dumps(record)}", file=sys.stderr, flush=True)
        del model
    return path


def case_file(path: Optional[Path], case: str, filename: str) -> Optional[Path]:
    """--weights / --batch: a file as it is; a directory as --save_inputs wrote it (DIR/<case>/filename)."""
    return path / case / filename if path is not None and path.is_dir() else path


def case_inputs(name: str, opt: Options, device: torch.device, gaussians: str, weights: Optional[Path] = None,
                batch_file: Optional[Path] = None, cache: Path = Path("."),
                train_steps: int = TRAIN_STEPS) -> tuple[TokenGS, Batch]:
    """The model and the batch case `name` times: from the files where given (weights loaded
    strictly for the preset), else as `gaussians` says (see the module docstring)."""
    if batch_file is not None:
        batch = load_release_batch(case_file(batch_file, name, "batch.safetensors"))
    else:
        batch = release_form(held_out_batch(opt) if gaussians == "trained" else random_batch(opt), opt)
    batch = batch.to(device)
    if weights is not None:
        model = build_model(opt, case_file(weights, name, "weights.safetensors"), strict=True).to(device)
    elif gaussians == "trained":
        model = build_model(opt, trained_weights(opt, device, cache, train_steps), strict=True).to(device)
    else:
        model = fresh_model(opt, device)
        if gaussians == "spread":
            spread_gaussians(model, batch)
    return model, batch


def weights_fingerprint(model: TokenGS) -> str:
    """A digest of the weights' values (sums per tensor), to share one file among cases that time the same model."""
    sums = [(name, float(t.double().sum()), float(t.double().abs().sum())) for name, t in model.state_dict().items()]
    return hashlib.sha1(json.dumps(sums).encode()).hexdigest()


def save_inputs(directory: Path, name: str, model: TokenGS, batch: Batch, opt: Options, changes: dict,
                written: dict[str, Path]) -> None:
    """DIR/<name>/{weights,batch}.safetensors and case.json (formats: the module docstring).
    `written` maps fingerprints of weights saved before to their file, which is hard-linked."""
    folder = directory / name
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "weights.safetensors"
    weights.unlink(missing_ok=True)
    fingerprint = weights_fingerprint(model)
    try:
        os.link(written[fingerprint], weights)
    except (KeyError, OSError):  # not written yet, or a file system without hard links
        save_model(model, weights)
        written[fingerprint] = weights
    save_release_batch(batch, opt, folder / "batch.safetensors")
    (folder / "case.json").write_text(json.dumps({"case": name, "preset": changes["preset"], "kind": changes["kind"],
                                                  "options": changes["options"]}, indent=1))


# A trained model's Gaussians, roughly: centers spread over the views 0.6 to 6 units ahead, sizes
# of a pixel or two, opacities around one half. Raw head outputs (before the activations):
# x, y ~ N(0, 0.35); z ~ N(the raw value of depth 2, 0.5); scale ~ N(-1.9, 0.5), i.e. cap·e^(raw - 1);
# opacity ~ N(2, 1), i.e. sigmoid(raw - opacity_bias).
SPREAD_RAW = {"xy_std": 0.35, "depth": 2.0, "depth_log_std": 0.5, "scale_mean": -1.9, "scale_std": 0.5,
              "opacity_mean": 2.0, "opacity_std": 1.0}


@torch.no_grad()
def spread_gaussians(model: TokenGS, batch: Batch) -> None:
    """Re-draw the activation head so that the fresh model's Gaussians spread like a trained
    model's (SPREAD_RAW) instead of sitting in one clump in front of the cameras, where each covers
    most of the image and rendering costs many times what it costs for a real scene. The Gaussian
    tokens are first scaled to unit size per channel, then the weights are scaled to the features
    the head actually receives, so every Gaussian gets its own draw."""
    from tokengs.models.head import POSITION_Z, RAW_LAYOUT, inverse_position_activation

    head = model.activation_head

    def head_input() -> torch.Tensor:
        features = {}
        handle = head.register_forward_pre_hook(lambda _, args: features.setdefault("x", args[0]))
        model.forward_gaussians(batch)
        handle.remove()
        return features["x"].float()

    # A fresh decoder passes the Gaussian tokens through almost unchanged (the 6-view model's
    # LayerScale is 5e-5), so the head's features are ~gs_token_std (0.01) per channel; weights
    # drawn onto features that small are ~1 per entry, a raw output then moves by up to ~2800 lr
    # when every feature moves by lr (as an AdamW step moves its weights), and 200 steps at 1e-4
    # sent the depths to thousands of units and culled every Gaussian. Tokens of unit size keep
    # the head's weights at a linear layer's usual ~0.01 (up to ~28 lr per step).
    x = head_input()
    tokens_scale = math.sqrt(x.shape[-1]) / float((x - x.mean(dim=(0, 1))).norm(dim=-1).mean())
    for tokens in (model.gs_tokens, getattr(model, "gs_tokens_dynamic", None)):
        if tokens is not None:
            tokens.mul_(tokens_scale)
    x = head_input()
    centered_norm = float((x - x.mean(dim=(0, 1))).norm(dim=-1).mean())  # |token - mean token|
    mean_token = x.mean(dim=(0, 1))
    weight, bias = head.deconv.weight, head.deconv.bias
    per_gaussian = lambda t: t.view(head.gaussians_per_token, -1, *t.shape[1:])  # [G, 14, ...]
    w, b = per_gaussian(weight), per_gaussian(bias)
    generator = torch.Generator(device=weight.device).manual_seed(0)

    def draw(rows: slice, std: float, mean: float) -> None:
        # output = w·(x - mean_token) + (w·mean_token + b): std over tokens `std`, mean `mean`
        w[:, rows] = torch.randn(w[:, rows].shape, generator=generator, device=w.device) * (std / centered_norm)
        b[:, rows] = mean - torch.einsum("grd,d->gr", w[:, rows].float(), mean_token).to(b.dtype)

    ends = torch.tensor([width for _, width in RAW_LAYOUT]).cumsum(0).tolist()
    rows = {name: slice(end - width, end) for (name, width), end in zip(RAW_LAYOUT, ends)}
    r = SPREAD_RAW
    position = rows["position"]
    draw(slice(position.start, position.start + POSITION_Z), r["xy_std"], 0.0)
    z_raw = inverse_position_activation(r["depth"] - model.opt.gaussian_z_offset)
    draw(slice(position.start + POSITION_Z, position.stop), r["depth_log_std"], z_raw)
    draw(rows["rgb"], 1.0, 0.0)
    draw(rows["scale"], r["scale_std"], r["scale_mean"])
    draw(rows["opacity"], r["opacity_std"], r["opacity_mean"])


def forward_flops(model: TokenGS, batch: Batch, autocast) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # with grad enabled: the counter's module tracker hooks autograd and fails under no_grad;
    # eager, so that compiled blocks are counted op by op
    with torch.compiler.set_stance("force_eager"), autocast(), counter:
        model.forward_gaussians(batch)
    return float(counter.get_total_flops())


def time_it(step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def profile_step(step: Callable[[], None], device: torch.device, rows: int = 15) -> str:
    """The operators that dominate one step, by device time (CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def run_case(name: str, gaussians: str, device: torch.device, smoke: bool = False, warmup: Optional[int] = None,
             repeats: Optional[int] = None, profile: bool = False, weights: Optional[Path] = None,
             batch_file: Optional[Path] = None, out: Path = Path("."), save_to: Optional[Path] = None,
             written: Optional[dict] = None, train_steps: int = TRAIN_STEPS, **switches) -> dict:
    case = CASES[name]
    opt = case_options(case, smoke, **switches)
    if opt.compile_blocks:  # a fresh compile per case, as in a run: the recompile limit counts across cases
        torch._dynamo.reset()
    model, batch = case_inputs(name, opt, device, gaussians, weights, batch_file, out / "trained", train_steps)
    source = {"gaussians": gaussians if weights is None else "file", "weights": str(weights or ""),
              "batch": str(batch_file or "")}
    if save_to is not None:
        save_inputs(save_to, name, model, batch, opt,
                    {"preset": case.preset if not smoke else SMOKE_PRESETS[case.preset], "kind": case.kind,
                     "options": {"batch_size": case.batch_size, "lambda_ssim": 0.0, "lambda_lpips": 0.0,
                                 "evaluating": opt.evaluating, **switches}, **source},
                    written if written is not None else {})
    # before the timed steps, which train (and so move) the Gaussians of the training cases
    rendering = tile_statistics(opt, model, batch)
    if source["gaussians"] == "trained":
        # the tiny presets' 256 Gaussians (0.2 per pixel; the anchors' 2.3) cannot cover their image
        check_trained(name, rendering, trained_path(opt, out / "trained", train_steps), 0.0 if smoke else MIN_COVERAGE)
    step = case_step(case.kind, model, batch, opt, device)
    default_warmup, default_repeats = (1, 2) if smoke else REPEATS[case.kind]
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = time_it(step, device, default_warmup if warmup is None else warmup,
                    default_repeats if repeats is None else repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else float("nan")
    flops = forward_flops(model, batch, autocast_for(device))
    median = statistics.median(times)
    # model FLOPs per timed step: forward x3 for training; one forward-equivalent per tuning step
    # would overstate the decoder-only work of tuning, so tuning reports none
    multiplier = 3 if case.kind == "train" else 1
    result = {"case": name, "preset": opt_name(case, smoke), "batch_size": batch.context.images.shape[0],
              **source, **switches, **rendering, "median_ms": median,
              "min_ms": min(times), "max_ms": max(times), "repeats": len(times), "peak_gib": peak,
              "model_tflops": flops * multiplier / (median / 1e3) / 1e12 if case.kind != "ttt" else None,
              "release_ms": None if smoke else RELEASE_MS.get(name),
              "release_gib": None if smoke else RELEASE_GIB.get(name)}
    if profile:
        result["profile"] = profile_step(step, device)
    del model, batch, step
    if on_cuda:
        torch.cuda.empty_cache()
    return result


def case_step(kind: str, model: TokenGS, batch: Batch, opt: Options, device: torch.device) -> Callable[[], None]:
    """One timed step: a training step (forward, loss backward, clip, AdamW), one reconstruction
    (encode + decode without a graph), or ttt_n_steps of test-time tuning on an encoding made once."""
    loss = LossComputer(opt, device=device)
    autocast = autocast_for(device)
    if kind == "train":
        model.train()
        optimizer = build_optimizer(opt, model)

        def train_step() -> None:
            with autocast():
                packed = model.forward_gaussians(batch)
            loss.backward(packed.float(), batch.target)
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt.gradient_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return train_step

    model.eval()

    def reconstruct() -> None:
        with torch.no_grad(), autocast():
            model.decode(model.encode(batch))
    if kind == "recon":
        return reconstruct
    with torch.no_grad(), autocast():
        encoding = model.encode(batch)

    def tune() -> None:
        with autocast():
            test_time_tune(model, encoding, batch.context, opt, loss)
    return tune


@torch.no_grad()
def tile_statistics(opt, model: TokenGS, batch: Batch) -> dict:
    """What rendering the case's Gaussians costs, in the batch's target views: the mean screen
    radius (px) of the Gaussians in view, the tile edge gsplat renders them with (`tile_px`), the
    (Gaussian, tile) pairs per view it sorts (their bounding boxes clipped to the image), and the
    share of the pixels they cover (accumulated alpha of at least one half)."""
    out = render_chunked(opt, model.gaussians(batch), batch.target, depth=False)
    radii = out.radii.float()  # [B, V, N, 2]
    visible = (radii > 0).all(-1)
    pairs = lambda size: tile_pairs(out.means2d, out.radii, opt.img_size, size)  # [B, V]
    tile = resolve_tile_size(opt.render_tile_size, pairs)  # as the gsplat backend picks it for these cameras
    return {"mean_radius_px": float(radii.amax(-1)[visible].mean()) if visible.any() else 0.0, "tile_px": tile,
            "tile_pairs_per_view": float(pairs(tile).mean()),
            "coverage": float((out.alphas >= 0.5).float().mean())}


class CollapsedGaussians(RuntimeError):
    """The trained model's Gaussians do not render the scene: timing them would time an empty image."""


def check_trained(name: str, statistics: dict, model_file: Path, min_coverage: float = MIN_COVERAGE) -> None:
    """Refuse (CollapsedGaussians) trained Gaussians that a trained model would not produce: none
    in view (mean radius 0) or covering less than min_coverage of the target pixels."""
    radius, coverage = statistics["mean_radius_px"], statistics["coverage"]
    if radius == 0 or coverage < min_coverage:
        raise CollapsedGaussians(
            f"{name}: the trained Gaussians cover {coverage:.0%} of the held-out views' pixels (mean radius "
            f"{radius:.1f} px; a trained model's cover at least {min_coverage:.0%}): timing them would time a "
            f"render of almost nothing, so the case is not timed. Their training (loss curve) is in "
            f"{model_file.with_suffix('.json')}; delete {model_file} to train again.")


def opt_name(case: Case, smoke: bool) -> str:
    return SMOKE_PRESETS[case.preset] if smoke else case.preset


def table(results: list[dict]) -> str:
    head = ["case", "gaussians", "median ms", "min", "max", "peak GiB", "TFLOP/s", "radius px", "tile px",
            "pairs/view", "covered", "release ms (own batch)", "vs release"]
    rows = [head]
    for r in results:
        ratio = f"{r['release_ms'] / r['median_ms']:.2f}x" if r["release_ms"] else "-"
        rows.append([r["case"], r["gaussians"], f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}", f"{r['max_ms']:.1f}",
                     "-" if math.isnan(r["peak_gib"]) else f"{r['peak_gib']:.1f}",
                     "-" if r["model_tflops"] is None else f"{r['model_tflops']:.1f}",
                     f"{r['mean_radius_px']:.0f}", str(r["tile_px"]), f"{r['tile_pairs_per_view']:.3g}",
                     f"{r['coverage']:.0%}", str(r["release_ms"] or "-"), ratio])
    return aligned(rows)


def aligned(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


# What makes two results time the same work: the case and every switch that changes it.
SAME_WORK = ("case", "gaussians", "weights", "batch", "activation_checkpointing", "compile_blocks", "render_tile_size")


def read_earlier(path: Path) -> list[dict]:
    """The results of an earlier run (its results.json), for --compare; ValueError saying why not."""
    try:
        return json.loads(path.read_text())["results"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--compare {path}: not a benchmark results.json ({type(exc).__name__}: {exc}); give the "
                         "results.json an earlier run wrote") from None


def comparison(results: list[dict], earlier: list[dict]) -> str:
    """Each result beside the earlier run's of the same work (`SAME_WORK`): median ms and peak GiB
    before and now, and the speed-up (before / now)."""
    before = {tuple(r.get(k) for k in SAME_WORK): r for r in earlier}
    rows = [["case", "gaussians", "before ms", "now ms", "speed-up", "before GiB", "now GiB"]]
    for r in results:
        old = before.get(tuple(r.get(k) for k in SAME_WORK))
        gib = lambda x: "-" if x is None or math.isnan(x["peak_gib"]) else f"{x['peak_gib']:.1f}"
        rows.append([r["case"], r["gaussians"], "-" if old is None else f"{old['median_ms']:.1f}", f"{r['median_ms']:.1f}",
                     "-" if old is None else f"{old['median_ms'] / r['median_ms']:.2f}x", gib(old), gib(r)])
    return aligned(rows)


def main(argv=None) -> int:
    parser = CommandParser(prog="python scripts/benchmark.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="results.json goes here, and the trained models' cache (DIR/trained/)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--gaussians", nargs="+", choices=GAUSSIANS,
                        help="fresh, spread or trained (several: each case once per value); "
                             "default: trained for the tuning cases, fresh for the others")
    parser.add_argument("--weights", type=Path, help="a model file (release names, loaded strictly), or a "
                                                     "--save_inputs directory (DIR/<case>/weights.safetensors)")
    parser.add_argument("--batch", type=Path, help="a batch file (the release's batch keys), or a --save_inputs "
                                                   "directory (DIR/<case>/batch.safetensors)")
    parser.add_argument("--save_inputs", type=Path, help="write each case's weights and batch under DIR/<case>/")
    parser.add_argument("--train_steps", type=int, help=f"steps of --gaussians trained (default {TRAIN_STEPS})")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny presets, one warm-up step and two timed: checks the script runs")
    parser.add_argument("--warmup", type=int, help="untimed steps per case (default 3; tuning 1)")
    parser.add_argument("--repeats", type=int, help="timed steps per case (default 10; tuning 3)")
    parser.add_argument("--profile", action="store_true", help="also print the top operators of one step per case")
    parser.add_argument("--activation_checkpointing", action="store_true",
                        help="recompute the backbone's blocks in backward (less memory, more time)")
    parser.add_argument("--compile_blocks", action="store_true", help="torch.compile each backbone block")
    parser.add_argument("--render_tile_size", type=int, default=AUTO_TILE,
                        help="gsplat's tile edge: 16 (gsplat's default), 32, or 0 (the options' default: 16 or 32 "
                             "per render, as the Gaussians' size calls for)")
    parser.add_argument("--compare", type=Path, help="an earlier run's results.json: also print each case's time "
                                                     "and memory before and now")
    args = parser.parse_args(argv)
    earlier = None
    if args.compare is not None:
        try:
            earlier = read_earlier(args.compare)
        except ValueError as exc:
            print(f"benchmark: {exc}", file=sys.stderr)
            return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.smoke and device.type != "cuda":
        print("benchmark: the anchor cases need a GPU (gsplat); use --smoke on a CPU", file=sys.stderr)
        return 2
    train_steps = args.train_steps or (SMOKE_TRAIN_STEPS if args.smoke else TRAIN_STEPS)
    results, written, refused = [], {}, []
    for name in args.cases:
        for gaussians in args.gaussians or [DEFAULT_GAUSSIANS[CASES[name].kind]]:
            save_to = args.save_inputs
            if save_to is not None and len(args.gaussians or []) > 1:
                save_to = save_to / gaussians  # each a --weights / --batch directory of its own
            try:
                result = run_case(name, gaussians, device, args.smoke, args.warmup, args.repeats, args.profile,
                                  args.weights, args.batch, args.out, save_to, written, train_steps,
                                  activation_checkpointing=args.activation_checkpointing,
                                  compile_blocks=args.compile_blocks, render_tile_size=args.render_tile_size)
            except torch.OutOfMemoryError as exc:  # one case too big for this GPU must not hide the others
                print(f"{name} ({gaussians}): out of memory ({exc})".splitlines()[0], file=sys.stderr, flush=True)
                torch.cuda.empty_cache()
                continue
            except CollapsedGaussians as exc:  # the other cases still run; the exit status says it
                print(f"benchmark: {exc}", file=sys.stderr, flush=True)
                refused.append(name)
                continue
            print(result.pop("profile", ""), flush=True)
            print(json.dumps(result), flush=True)
            results.append(result)
            write_results(args.out / "results.json", device, results)  # after every case: a cut-off run keeps its cases
    print(table(results))
    if earlier is not None:
        print(f"\nagainst {args.compare}:\n{comparison(results, earlier)}")
    if refused:
        print(f"benchmark: not timed, their trained Gaussians render almost nothing: {', '.join(refused)}",
              file=sys.stderr)
        return 1
    return 0


def write_results(path: Path, device: torch.device, results: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                "torch": torch.__version__, "results": results}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
