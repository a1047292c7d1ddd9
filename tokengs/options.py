"""Options: every field of the TokenGS release (same names, same defaults), ours, and the presets.

`Options` is validated on construction and on every `evolve`; a bad value raises
`OptionsError` naming the field and how to fix it. `config_defaults` maps a preset name to
its `Options`; `config_doc` gives one line of help per preset.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from tokengs.errors import UserError

BG_COLORS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "grey": (0.5, 0.5, 0.5)}
MEAN_OF_GRADS_MODES = ("none", "per-scene", "per-view")
TTT_MODES = {"token-tuning": "token-tuning", "tokens": "token-tuning",
             "scene-latent-tuning": "scene-latent-tuning", "latents": "scene-latent-tuning"}
CAMERA_NORMALIZATION_METHODS = ("first_cam", "mean_cam")
CAMERA_SCALE_METHODS = ("constant", "distance", "bound", "pointmap")
RGB_LOSS_TYPES = ("l1", "l2")
RENDER_BACKENDS = ("auto", "gsplat", "torch")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
EVAL_METRICS = ("psnr", "ssim", "lpips")


class OptionsError(UserError, ValueError):
    """An option has a value the framework cannot run with; the message says which and how to fix it."""


@dataclass(frozen=True)
class Options:
    # ---- run -------------------------------------------------------------------------------
    evaluating: bool = False
    """Options of an evaluation (the eval split, no target-view check); tokengs.evaluate turns it on."""
    workspace: str = "./workspace"
    """Folder of the run: its config.yaml, checkpoint and logs, or an evaluation's metrics and media."""
    resume: Optional[str] = None
    """Weights (.safetensors) that training starts from (loading what fits) or that evaluation scores."""
    model_type: str = "tokengs"
    """The model family; the release has only tokengs."""
    seed: int = 42
    """Seed of the initial weights, the data order, the choice of views and the augmentation."""
    use_wandb: bool = False
    """Log to Weights & Biases as well as TensorBoard (WANDB_MODE=offline works without network)."""
    experiment_name: str = "tokengs"
    """Name of the wandb run."""
    out_dir: str = "outputs"
    """The release's output folder, unused here: every output goes to the workspace."""
    project_name: str = "TokenGS"
    """Name of the wandb project."""

    # ---- model -----------------------------------------------------------------------------
    img_size: Tuple[int, int] = (256, 256)
    """Height and width in pixels that every view is cropped and resized to."""
    patch_size: int = 8
    """Edge in pixels of the encoder's image patches."""
    dec_patch_size: Optional[int] = None
    """Each Gaussian token decodes dec_patch_size² Gaussians (None: patch_size)."""
    enc_depth: int = 3
    """Transformer blocks of the image encoder."""
    dec_depth: int = 12
    """Transformer blocks of the Gaussian-token decoder."""
    enc_embed_dim: int = 1024
    """Width of the encoder's features."""
    enc_num_heads: int = 16
    """Attention heads of every encoder and decoder block."""
    mlp_ratio: int = 4
    """Hidden width of each block's MLP, in multiples of the block's width."""
    clip_head_readout_std: float = 0.002
    """Standard deviation of the output head's initial weights (larger spreads the first Gaussians more)."""
    clip_head_z_init: Optional[float] = None
    """Depth in front of the camera where every Gaussian starts (None: where a zero head bias puts it)."""
    dec_init_values: Optional[float] = None
    """Initial LayerScale of the decoder's branches (None: 5e-3 * gs_token_std)."""
    bg_color: str = "grey"
    """Background the Gaussians are rendered over: white, black or grey."""
    gaussian_scale_cap: float = 0.075
    """Largest scale of a Gaussian."""
    opacity_bias: float = 2.0
    """Subtracted from the raw opacity before its sigmoid, so that Gaussians start mostly transparent."""
    gaussian_z_offset: float = 1.0
    """Added to every Gaussian's depth after the position activation."""
    num_gs_tokens: int = 1024
    """Learnable static Gaussian tokens; times dec_patch_size² gives the number of Gaussians."""
    token_dim: int = 1024
    """Width of the Gaussian tokens and of the decoder."""
    gs_token_std: float = 0.01
    """Standard deviation of the Gaussian tokens' initialization."""
    num_dynamic_gs_tokens: int = 0
    """Learnable dynamic Gaussian tokens, which move with time (0: a static model)."""
    init_dynamic_tokens_from_static: bool = False
    """Start the dynamic tokens from the static ones of a checkpoint that has no dynamic tokens."""
    init_tokens_from_existing: bool = False
    """Resize a checkpoint's Gaussian tokens to this model's count instead of skipping them."""
    init_latents_from_existing: bool = False
    """Resize a checkpoint's scene latents to this model's count instead of skipping them."""

    # ---- data ------------------------------------------------------------------------------
    data_mode: Tuple[Tuple[str, int], ...] = (("dl3dv_scaled_0.15", 6),)
    """Datasets as NAME REPEAT pairs: a name with an optional _scaled_X suffix, and its passes per epoch."""
    num_views: int = 8
    """Views per training sample: the context views and then the target views."""
    num_input_views: int = 4
    """Context views per sample, the model's input; the views after them are the targets."""
    znear: float = 0.025
    """Near clipping plane of the rasterizer."""
    zfar: float = 125.0
    """Far clipping plane of the rasterizer."""
    camera_normalization_method: str = "first_cam"
    """Frame of the cameras: first_cam (the first context camera's) or mean_cam (the context cameras' mean)."""
    camera_scale_method: str = "constant"
    """Scale of the camera translations: constant, distance, bound or pointmap (from the depth maps)."""
    pointmap_trim_lo: float = 0.0
    """Lowest quantile of the point distances that the pointmap scale keeps."""
    pointmap_trim_hi: float = 1.0
    """Highest quantile of the point distances that the pointmap scale keeps."""
    num_workers: int = 16
    """Data-loading worker processes of each training process."""
    dataset_kwargs: Optional[Dict[str, str]] = None
    """Arguments of the datasets as KEY VALUE pairs (root_path DIR, evaluation_json FILE)."""

    # ---- optimisation ----------------------------------------------------------------------
    batch_size: int = 8
    """Scenes per batch of each process, also the scenes of each dataset held out for validation."""
    gradient_accumulation_steps: int = 1
    """Batches whose gradients make one optimizer step."""
    num_epochs: int = 30
    """Epochs of training."""
    max_iters_per_epoch: int = 1000000
    """Most batches of each process in an epoch."""
    lr: float = 0.0004
    """Peak learning rate of AdamW's one-cycle schedule."""
    pct_start_steps: int = 1000
    """Optimizer steps of the schedule's warm-up to the peak learning rate."""
    final_div_factor: float = 1000.0
    """The schedule ends at its starting learning rate (lr / 25) divided by this."""
    gradient_clip: float = 1.0
    """Largest norm of the gradient (0: no clipping)."""
    mixed_precision: str = "bf16"
    """Precision of the model on GPUs: no, fp16 or bf16 (runs on the CPU stay float32)."""
    deferred_bp: bool = False
    """Render without a graph, then backpropagate through one target view at a time (less memory)."""
    use_input_supervision: bool = False
    """Also supervise the context views (training only)."""
    mean_of_grads: str = "none"
    """Backpropagate the render loss in chunks to save memory: none, per-scene or per-view."""
    mean_of_grads_scene_chunk_size: int = 1
    """Scenes in each chunk of mean_of_grads."""
    mean_of_grads_view_chunk_size: Optional[int] = None
    """Views in each chunk of mean_of_grads per-view (None: one)."""

    # ---- losses ----------------------------------------------------------------------------
    rgb_loss_type: str = "l2"
    """Pixel loss: l1 or l2."""
    lambda_rgb: float = 1.0
    """Weight of the pixel loss."""
    lambda_lpips: float = 0.0
    """Weight of the LPIPS loss (needs LPIPS's VGG weights)."""
    lambda_mask: float = 0.0
    """Weight of the loss between the rendered alpha and the masks of the datasets that have them."""
    lambda_ssim: float = 0.2
    """Weight of the SSIM loss."""
    lambda_visibility: float = 1.0
    """Weight of the loss on Gaussians whose centres project outside the target images."""
    visibility_distance_threshold: float = 1.0
    """Distance outside the image (in [-1, 1] image coordinates) where that loss stops growing (0: never)."""
    lambda_opacity: float = 0.0
    """Weight of the loss -log(opacity), which pushes opacities up."""
    lambda_dyn_aux: float = 0.0
    """Weight of the render loss of the dynamic Gaussians alone."""
    lambda_dyn_aux_warmup_steps: int = 0
    """Optimizer steps that hold that weight before it decays."""
    lambda_dyn_aux_decay_steps: int = 0
    """Optimizer steps over which that weight falls linearly to lambda_dyn_aux_min (0: it stays)."""
    lambda_dyn_aux_min: float = 0.0
    """Weight of the dynamic Gaussians' loss after its decay."""

    # ---- logging and evaluation ------------------------------------------------------------
    print_freq: int = 10
    """Log the training loss, PSNR and learning rate every this many optimizer steps."""
    log_image_freq: int = 100
    """Log histograms of the Gaussians every this many optimizer steps."""
    eval_n_media_dumps: int = 0
    """Evaluation writes images, videos, depth maps and a PLY for this many first scenes."""
    strict_checkpoint_loading: bool = True
    """A checkpoint must fit the model exactly; turn off to load what fits (finetuning)."""
    use_ttt_for_eval: bool = False
    """Evaluation tunes each scene on its context views (test-time tuning) before rendering its targets."""
    ttt_mode: str = "token-tuning"
    """What test-time tuning adapts: token-tuning (tokens) or scene-latent-tuning (latents)."""
    ttt_n_steps: int = 50
    """Adam steps of test-time tuning per scene."""
    ttt_lr: float = 0.0001
    """Learning rate of test-time tuning."""

    # ---- dynamic scenes and architecture variants ------------------------------------------
    time_embedding: bool = False
    """Give the model each view's time (dynamic scenes)."""
    time_embedding_dim: int = 2
    """Channels of the time embedding (even: cosine and sine pairs)."""
    use_interp_target: bool = False
    """Dynamic scenes: targets at any frame between the context frames, not only at those frames."""
    use_multiscale_encoder: bool = False
    """Read the encoder's features from the multiscale_encoder_layers instead of its last layer only."""
    multiscale_encoder_layers: Tuple[int, ...] = (5, 7, 9, 11)
    """Encoder layers (from 0) whose features the multiscale readout concatenates."""
    use_latent_bottleneck: bool = False
    """Pass the encoder's features through learnable scene latents, which the decoder then reads."""
    num_latents: int = 4096
    """Scene latents of the latent bottleneck."""
    latent_cross_attn_depth: int = 12
    """Blocks in which the scene latents attend to the encoder's features."""
    random_reflect: bool = True
    """Training mirrors half of the samples left to right, images and cameras."""

    # ---- ours (not in the release) ---------------------------------------------------------
    # Field docs are one line each: tyro breaks a multi-line docstring at every indented line.
    render_backend: str = "auto"
    """Rasterizer: gsplat on CUDA, the pure-PyTorch one on the CPU; auto picks by device."""
    # Speed and memory only: a Gaussian's tile list is its opacity-aware bounding box, outside of which its
    # alpha is below 1/255 and skipped, so any tile size renders the same image.
    render_tile_size: int = 0
    """The rasterizer's tile edge in pixels; 0 picks 16 or 32 per render (32 for Gaussians much larger than a tile)."""
    eval_metrics: Tuple[str, ...] = ("psnr", "ssim", "lpips")
    """Metrics evaluation computes; drop lpips when its VGG weights are not available."""
    eval_render_chunk_size: int = 8
    """Target views rendered per chunk in evaluation (bounds memory for 50-view scenes)."""
    save_every_steps: int = 1000
    """Write a resumable checkpoint every this many optimizer steps (and at each epoch end)."""
    max_consecutive_load_failures: int = 50
    """Training stops with an error after this many scenes in a row fail to load."""
    max_consecutive_nonfinite_steps: int = 20
    """Training stops with an error after this many skipped (NaN/Inf) steps in a row."""
    retrain: bool = False
    """Train again in a workspace that already holds a COMPLETE marker."""
    activation_checkpointing: bool = False
    """Recompute encoder/decoder blocks in backward to save memory."""
    # fuses each block's norms and elementwise ops; the first steps pay the compilation
    compile_blocks: bool = False
    """torch.compile each encoder/decoder block; weights and checkpoints are unchanged."""
    # Token-tuning never captures: its 12-block decode keeps the GPU busy, and capturing it cost more than it
    # saved (2.17 -> 2.29 s).
    ttt_cuda_graph: bool = True
    """Scene-latent tuning on CUDA replays its decode as a CUDA graph (H100, 50 steps: 0.71 -> 0.51-0.59 s)."""

    def __post_init__(self) -> None:
        if self.dec_patch_size is None:
            object.__setattr__(self, "dec_patch_size", self.patch_size)
        # tuples from YAML/JSON/CLI arrive as lists; keep the dataclass hashable and comparable
        object.__setattr__(self, "img_size", tuple(int(v) for v in self.img_size))
        object.__setattr__(self, "data_mode", tuple((str(n), int(r)) for n, r in self.data_mode))
        object.__setattr__(self, "multiscale_encoder_layers", tuple(int(v) for v in self.multiscale_encoder_layers))
        object.__setattr__(self, "eval_metrics", tuple(str(v) for v in self.eval_metrics))
        if self.dataset_kwargs is not None:
            object.__setattr__(self, "dataset_kwargs", dict(self.dataset_kwargs))
        validate(self)

    # Options is frozen, so a changed copy is made with evolve; it is validated again.
    def evolve(self, **changes: Any) -> "Options":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise OptionsError(f"unknown option(s) {', '.join(unknown)}: see tokengs/options.py for the field names")
        return dataclasses.replace(self, **changes)

    @property
    def resolved_ttt_mode(self) -> str:
        return TTT_MODES[self.ttt_mode]

    @property
    def num_patches(self) -> int:
        return (self.img_size[0] // self.patch_size) * (self.img_size[1] // self.patch_size)

    @property
    def num_gaussians(self) -> int:
        return (self.num_gs_tokens + self.num_dynamic_gs_tokens) * self.dec_patch_size**2

    @property
    def bg_rgb(self) -> Tuple[float, float, float]:
        return BG_COLORS[self.bg_color]

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON/YAML types (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = "config") -> "Options":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise OptionsError(f"{source}: unknown option(s) {', '.join(unknown)}; remove them or fix their names")
        try:
            return cls(**values)
        except OptionsError as exc:
            raise OptionsError(f"{source}: {exc}") from None
        except (TypeError, ValueError) as exc:  # a value of the wrong kind (img_size: abc)
            raise OptionsError(f"{source}: {exc}; fix the value") from None

    def save_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load_yaml(cls, path: str | Path) -> "Options":
        import yaml

        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise OptionsError(f"config file {path} does not exist; pass the config.yaml of a training workspace") from None
        except yaml.YAMLError as exc:
            problem = " ".join(str(exc).split())  # YAML's message spans lines: one line here
            raise OptionsError(f"config file {path} is not valid YAML ({problem}); fix or regenerate it") from None
        if not isinstance(values, dict):
            raise OptionsError(f"config file {path} must hold a mapping of option names to values")
        return cls.from_dict(values, source=str(path))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise OptionsError(message)


def _one_of(opt: Options, name: str, allowed) -> None:
    value = getattr(opt, name)
    _require(value in allowed, f"{name}={value!r} is not known; use one of {', '.join(map(repr, allowed))}")


@dataclass(frozen=True)
class Domain:
    """The values a numeric option may take: finite, from `low` (excluded when `open`) to `high`."""

    low: float
    high: float = math.inf
    open: bool = False
    integer: bool = False

    def holds(self, value: Any) -> bool:
        kinds = int if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            return False
        return (value > self.low if self.open else value >= self.low) and value <= self.high

    def __str__(self) -> str:
        bounds = [f"{'>' if self.open else '>='} {self._number(self.low)}"] if self.low > -math.inf else []
        bounds += [f"<= {self._number(self.high)}"] if self.high < math.inf else []
        return " ".join(["an integer" if self.integer else "a finite number", " and ".join(bounds)]).strip()

    def _number(self, value: float) -> str:
        return str(int(value)) if self.integer else f"{value:g}"


_COUNT, _COUNT_OR_ZERO = Domain(1, integer=True), Domain(0, integer=True)
_POSITIVE, _NON_NEGATIVE, _ANY = Domain(0, open=True), Domain(0), Domain(-math.inf)
_FRACTION = Domain(0, 1)
# Every int and float option (None, where allowed, is not checked); test_options.py checks none is missing.
DOMAINS: Dict[str, Domain] = {
    **dict.fromkeys(("patch_size", "dec_patch_size", "enc_depth", "dec_depth", "enc_embed_dim", "enc_num_heads",
                     "mlp_ratio", "num_gs_tokens", "token_dim", "num_views", "num_input_views", "batch_size",
                     "gradient_accumulation_steps", "num_epochs", "max_iters_per_epoch",
                     "mean_of_grads_scene_chunk_size", "mean_of_grads_view_chunk_size", "print_freq", "log_image_freq",
                     "time_embedding_dim", "num_latents", "latent_cross_attn_depth", "eval_render_chunk_size",
                     "max_consecutive_load_failures", "max_consecutive_nonfinite_steps"), _COUNT),
    **dict.fromkeys(("num_dynamic_gs_tokens", "num_workers", "pct_start_steps", "lambda_dyn_aux_warmup_steps",
                     "lambda_dyn_aux_decay_steps", "eval_n_media_dumps", "ttt_n_steps", "save_every_steps"),
                    _COUNT_OR_ZERO),
    "seed": Domain(0, 2**32 - 1, integer=True),  # numpy's seeds
    # gsplat runs one CUDA block of tile_size² threads per tile, at most 1024 threads
    "render_tile_size": Domain(0, 32, integer=True),
    **dict.fromkeys(("gaussian_scale_cap", "znear", "zfar", "lr", "final_div_factor", "ttt_lr"), _POSITIVE),
    **dict.fromkeys(("clip_head_readout_std", "clip_head_z_init", "dec_init_values", "gs_token_std", "gradient_clip",
                     "lambda_rgb", "lambda_lpips", "lambda_mask", "lambda_ssim", "lambda_visibility",
                     "visibility_distance_threshold", "lambda_opacity", "lambda_dyn_aux", "lambda_dyn_aux_min"),
                    _NON_NEGATIVE),
    **dict.fromkeys(("pointmap_trim_lo", "pointmap_trim_hi"), _FRACTION),
    **dict.fromkeys(("opacity_bias", "gaussian_z_offset"), _ANY),
}


def _check_domains(opt: Options) -> None:
    for name, domain in DOMAINS.items():
        value = getattr(opt, name)
        _require(value is None or domain.holds(value), f"{name}={value!r} is out of range: it must be {domain}; "
                                                       f"set --{name}")
    _require(len(opt.img_size) == 2 and all(v >= 1 for v in opt.img_size),
             f"img_size={opt.img_size} must be a height and a width of at least 1 pixel; set --img_size H W")
    _require(bool(opt.data_mode) and all(repeat >= 1 for _, repeat in opt.data_mode),
             f"data_mode={opt.data_mode} must name at least one dataset, each with a repeat of at least 1; "
             "set --data_mode NAME REPEAT ...")
    _require(opt.zfar > opt.znear, f"zfar={opt.zfar} must lie beyond znear={opt.znear}; set --zfar or --znear")
    _require(opt.pointmap_trim_lo < opt.pointmap_trim_hi,
             f"pointmap_trim_lo={opt.pointmap_trim_lo} must be below pointmap_trim_hi={opt.pointmap_trim_hi}")
    _require(opt.num_input_views <= opt.num_views,
             f"num_input_views={opt.num_input_views} exceeds num_views={opt.num_views}; set --num_views or "
             "--num_input_views")
    _require(opt.time_embedding_dim % 2 == 0,
             f"time_embedding_dim={opt.time_embedding_dim} must be even (cosine and sine pairs)")
    for dim in ("enc_embed_dim", "token_dim"):
        _require(getattr(opt, dim) % opt.enc_num_heads == 0,
                 f"{dim}={getattr(opt, dim)} is not divisible by enc_num_heads={opt.enc_num_heads}; "
                 f"set --{dim} or --enc_num_heads")


def validate(opt: Options) -> None:
    """Raise OptionsError for a value or combination the framework cannot run: every numeric option
    outside its domain (DOMAINS), then the foundation issue's list."""
    _check_domains(opt)
    h, w = opt.img_size
    _require(h % opt.patch_size == 0 and w % opt.patch_size == 0,
             f"img_size={opt.img_size} is not divisible by patch_size={opt.patch_size}; "
             f"set --img_size to multiples of {opt.patch_size} or change --patch_size")
    if not opt.evaluating and not opt.use_input_supervision:
        _require(opt.num_views > opt.num_input_views,
                 f"num_views={opt.num_views} leaves no target view after num_input_views={opt.num_input_views}; "
                 "raise --num_views above --num_input_views or turn on --use_input_supervision")
    _one_of(opt, "mean_of_grads", MEAN_OF_GRADS_MODES)
    _require(not (opt.deferred_bp and opt.mean_of_grads != "none"),
             "deferred_bp and mean_of_grads both change backpropagation and cannot be combined; "
             "turn off --deferred_bp or set --mean_of_grads none")
    _one_of(opt, "model_type", ("tokengs",))  # the release's only model
    _one_of(opt, "ttt_mode", tuple(TTT_MODES))
    _one_of(opt, "camera_normalization_method", CAMERA_NORMALIZATION_METHODS)
    _one_of(opt, "camera_scale_method", CAMERA_SCALE_METHODS)
    _one_of(opt, "bg_color", tuple(BG_COLORS))
    _one_of(opt, "rgb_loss_type", RGB_LOSS_TYPES)
    _one_of(opt, "render_backend", RENDER_BACKENDS)
    _one_of(opt, "mixed_precision", MIXED_PRECISIONS)
    for metric in opt.eval_metrics:
        _require(metric in EVAL_METRICS, f"eval_metrics holds {metric!r}; use any of {', '.join(EVAL_METRICS)}")
    if opt.use_multiscale_encoder:
        bad = [i for i in opt.multiscale_encoder_layers if not 0 <= i < opt.enc_depth]
        _require(not bad, f"multiscale_encoder_layers {bad} lie outside the encoder's {opt.enc_depth} layers "
                          f"(0..{opt.enc_depth - 1}); fix --multiscale_encoder_layers or --enc_depth")
    _require(not (TTT_MODES[opt.ttt_mode] == "scene-latent-tuning" and not opt.use_latent_bottleneck),
             f"ttt_mode={opt.ttt_mode!r} tunes scene latents, which exist only with the latent bottleneck; "
             "set --use_latent_bottleneck or --ttt_mode token-tuning")
    if opt.num_dynamic_gs_tokens > 0:
        _require(opt.num_dynamic_gs_tokens <= opt.num_patches,
                 f"num_dynamic_gs_tokens={opt.num_dynamic_gs_tokens} exceeds the {opt.num_patches} time-embedding "
                 f"patches of img_size={opt.img_size} with patch_size={opt.patch_size}; lower --num_dynamic_gs_tokens")
    _require(not (opt.evaluating and opt.use_input_supervision),
             "use_input_supervision is a training option; turn it off when evaluating")


# ---------------------------------------------------------------------------------------------
# Presets. Each release preset holds exactly the release's values; ours follow below.
# ---------------------------------------------------------------------------------------------

_WIDE = dict(img_size=(256, 448), num_gs_tokens=4096)
_FINETUNE = dict(init_tokens_from_existing=True, num_epochs=20, max_iters_per_epoch=500, lr=4e-05, pct_start_steps=400)
_EVAL_DL3DV = dict(evaluating=True, data_mode=(("dl3dv_eval_scaled_0.15", 1),), batch_size=1)
_VIEWS = {2: dict(num_input_views=2), 4: dict(), 6: dict(num_views=10, num_input_views=6)}
_EVAL_VIEWS = {2: dict(num_input_views=2), 4: dict(), 6: dict(num_input_views=6)}  # eval keeps num_views 8
# The latent-bottleneck "SA d12" architecture shared by the latent and Kubric presets.
_LATENT_ARCH = dict(enc_depth=12, dec_depth=1, clip_head_z_init=0.1, dec_init_values=0.01, gaussian_z_offset=0.0,
                    gs_token_std=0.02, camera_normalization_method="mean_cam", use_multiscale_encoder=True,
                    use_latent_bottleneck=True)
_LOSS = {"ssim": dict(rgb_loss_type="l1", lambda_rgb=0.8), "lpips": dict(lambda_lpips=0.5, lambda_ssim=0.0)}
_KUBRIC = dict(project_name="TokenGS-Kubric", **_LATENT_ARCH, init_tokens_from_existing=True,
               data_mode=(("kubric_scaled_1.0", 100),), camera_scale_method="pointmap", dataset_kwargs={},
               num_epochs=100, max_iters_per_epoch=500, lr=4e-05, pct_start_steps=2500, rgb_loss_type="l1",
               lambda_rgb=0.8, use_interp_target=True)
_KUBRIC_DYN = dict(_KUBRIC, num_dynamic_gs_tokens=256, init_dynamic_tokens_from_static=True, time_embedding=True)
_KUBRIC_RELEASE = dict(_KUBRIC_DYN, lambda_dyn_aux=0.3, lambda_dyn_aux_warmup_steps=5000,
                       lambda_dyn_aux_decay_steps=10000)
_EVAL_JSON = "assets/evaluation_idx_dl3dv_depthsplat_{}v.json"

# Small models that train in seconds to minutes on a laptop CPU (tests, the demo).
_TINY = dict(img_size=(32, 48), patch_size=8, enc_depth=2, dec_depth=2, enc_embed_dim=64, enc_num_heads=4,
             token_dim=64, num_gs_tokens=64, dec_patch_size=2, num_views=4, num_input_views=2, batch_size=2,
             num_workers=0, mixed_precision="no", num_epochs=2, max_iters_per_epoch=4, lr=1e-3,
             pct_start_steps=2, print_freq=1, log_image_freq=1000000, save_every_steps=1000000,
             data_mode=(("dl3dv", 1),), dataset_kwargs={"root_path": "data/synthetic/dl3dv"}, gaussian_scale_cap=0.3)
_TINY_LATENT = dict(_TINY, enc_depth=4, dec_depth=1, use_multiscale_encoder=True, multiscale_encoder_layers=(1, 3),
                    use_latent_bottleneck=True, num_latents=16, latent_cross_attn_depth=2, clip_head_z_init=0.1,
                    dec_init_values=0.01, gaussian_z_offset=0.0, camera_normalization_method="mean_cam")
# The demo (`python -m tokengs.demo`): the model of checkpoints/demo.safetensors (trained on a GPU by
# scripts/train_demo_checkpoint.py), fine-tuned briefly at its final learning rate on the demo's
# rooms. The synthetic rooms are metric (walls 3-5 m away); scale 0.25 brings their depths near
# the Gaussians' starting depth (gaussian_z_offset 1). A wider head readout (0.05, the release
# uses 0.002) spreads the first Gaussians over the view instead of one central blob (measured
# from scratch: 16.1 vs 11.3 dB training PSNR after 40 steps). Test-time tuning: 50 steps at 3e-3
# measured +3.9 dB on the held-out rooms (20 steps: +2.0, 100: +4.0; 100 at 1e-3: +3.1).
_DEMO = dict(_TINY, img_size=(48, 80), enc_embed_dim=128, token_dim=128, enc_depth=4, dec_depth=2, num_gs_tokens=512,
             num_input_views=4, num_views=8, batch_size=8, num_workers=1, bg_color="black", lr=1e-4,
             pct_start_steps=2, num_epochs=1, max_iters_per_epoch=20, save_every_steps=10,
             data_mode=(("dl3dv_scaled_0.25", 4),), clip_head_readout_std=0.05, ttt_n_steps=50, ttt_lr=3e-3)
# (4 x the 40 training rooms: one 20-step epoch.) The same model on a GPU: ten times the
# fine-tuning (10 x 32 training rooms at batch 16: 20-step epochs) and twice the test-time tuning.
_DEMO_GPU = dict(_DEMO, batch_size=16, num_workers=4, num_epochs=10, max_iters_per_epoch=20, pct_start_steps=10,
                 save_every_steps=100, data_mode=(("dl3dv_scaled_0.25", 10),), ttt_n_steps=100)
_RE10K = dict(img_size=(256, 256), num_input_views=2, num_views=6, data_mode=(("re10k", 1),),
              camera_scale_method="distance")

_PRESETS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "train_dl3dv_base": ("Train on DL3DV from scratch: 300 epochs of at most 500 iterations, 2000 warm-up steps.",
                         dict(num_epochs=300, max_iters_per_epoch=500, pct_start_steps=2000)),
}
for _v in (2, 4, 6):
    _PRESETS[f"finetune_dl3dv_{_v}view"] = (
        f"Finetune a DL3DV model at 256x448 with 4096 tokens, {_v} context views, short schedule.",
        dict(_WIDE, **_FINETUNE, **_VIEWS[_v]))
for _v in (2, 4, 6):
    _PRESETS[f"eval_dl3dv_{_v}view"] = (
        f"Evaluate on the DL3DV benchmark with {_v} context views (view choice from the {_v}v evaluation JSON).",
        dict(_WIDE, **_EVAL_DL3DV, **_EVAL_VIEWS[_v], dataset_kwargs={"evaluation_json": _EVAL_JSON.format(_v)}))
for _v in (2, 4, 6):
    for _loss in ("ssim", "lpips"):
        _PRESETS[f"finetune_dl3dv_latent_{_v}view_{_loss}"] = (
            f"Finetune the latent-bottleneck d12 DL3DV model ({_loss.upper()} loss) with {_v} context views.",
            dict(_WIDE, **_LATENT_ARCH, **_FINETUNE, init_latents_from_existing=True, **_VIEWS[_v], **_LOSS[_loss]))
for _v in (2, 4, 6):
    for _loss in ("ssim", "lpips"):
        _PRESETS[f"eval_dl3dv_latent_{_v}view_{_loss}"] = (
            f"Evaluate the latent-bottleneck d12 DL3DV {_loss.upper()} model with {_v} context views; "
            "test-time tuning adapts the scene latents.",
            dict(_WIDE, **_LATENT_ARCH, **_EVAL_DL3DV, **_EVAL_VIEWS[_v], **_LOSS[_loss],
                 dataset_kwargs={"evaluation_json": _EVAL_JSON.format(_v)}, ttt_mode="scene-latent-tuning",
                 ttt_lr=0.01))
_PRESETS.update({
    "finetune_dl3dv_kubric_dyn": (
        "Kubric 4D finetune of the DL3DV model: 256 dynamic tokens started from the static ones, time embeddings, "
        "interpolated targets, pointmap camera scale.", _KUBRIC_DYN),
    "finetune_dl3dv_kubric_static": (
        "Kubric finetune without dynamic tokens or time (first stage of the two-stage warm start).", _KUBRIC),
    "finetune_dl3dv_kubric_dyn_v2": (
        "Kubric dynamic finetune plus a render loss of the dynamic Gaussians alone (weight 0.3, constant).",
        dict(_KUBRIC_DYN, lambda_dyn_aux=0.3)),
    "finetune_dl3dv_kubric_dyn_release": (
        "The released Kubric dynamic schedule: dynamic-only loss 0.3 for 5K steps, then linearly to 0 over 10K.",
        _KUBRIC_RELEASE),
    "finetune_dl3dv_kubric_dyn_v3": ("Same as finetune_dl3dv_kubric_dyn_release (older name).", _KUBRIC_RELEASE),
    # ---- ours ----
    "train_re10k": ("Train on RealEstate10K chunks: 2 context views at 256x256 (the pixelSplat benchmark setting).",
                    dict(_RE10K)),
    "eval_re10k": ("Evaluate on RealEstate10K test chunks with 2 context views at 256x256.",
                   dict(_RE10K, evaluating=True, batch_size=1)),
    "tiny": ("A tiny plain model on synthetic DL3DV-layout scenes; trains on a laptop CPU in seconds.", _TINY),
    "tiny_eval": ("Evaluate the tiny model on synthetic DL3DV-benchmark-layout scenes.",
                  dict(_TINY, evaluating=True, batch_size=1, data_mode=(("dl3dv_eval", 1),),
                       dataset_kwargs={"root_path": "data/synthetic/dl3dv_eval"}, eval_metrics=("psnr", "ssim"),
                       ttt_n_steps=10, ttt_lr=1e-2)),
    "tiny_latent": ("A tiny latent-bottleneck model with multiscale readout on synthetic scenes.", _TINY_LATENT),
    "tiny_kubric_dyn": ("A tiny dynamic model on synthetic Kubric-layout scenes, with the auxiliary dynamic loss.",
                        dict(_TINY_LATENT, num_dynamic_gs_tokens=8, time_embedding=True, use_interp_target=True,
                             data_mode=(("kubric", 1),), dataset_kwargs={"root_path": "data/synthetic/kubric"},
                             camera_scale_method="pointmap", lambda_dyn_aux=0.3, lambda_dyn_aux_warmup_steps=2,
                             lambda_dyn_aux_decay_steps=4)),
    "demo": ("The demo's model (checkpoints/demo.safetensors) fine-tuned 20 steps on synthetic rooms, for a CPU.",
             _DEMO),
    "demo_gpu": ("The demo's model fine-tuned 200 steps, with 100 test-time tuning steps, for a GPU.", _DEMO_GPU),
})

config_doc: Dict[str, str] = {name: doc for name, (doc, _) in _PRESETS.items()}
config_defaults: Dict[str, Options] = {name: Options(**changes) for name, (_, changes) in _PRESETS.items()}


def get_preset(name: str) -> Options:
    try:
        return config_defaults[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, config_defaults, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise OptionsError(f"unknown preset {name!r}{hint}; `python -m tokengs.train --help` lists them") from None


def option_type_hints() -> Dict[str, Any]:
    return typing.get_type_hints(Options)
