"""Model checkpoints: read (.safetensors, .pt/.pth), load strictly or tolerantly, write atomically.

Strict loading (evaluation) raises one `CheckpointError` listing every missing, unexpected and
mis-shaped key and naming the preset the checkpoint most likely belongs to. Tolerant loading
(finetuning) loads what fits, logs each key it skips, and starts tokens/latents of another count
from the checkpoint's (init_tokens_from_existing, init_latents_from_existing,
init_dynamic_tokens_from_static).

Start-up checks (`checkpoint_file_problems`) read only names and shapes (a safetensors header)
and apply the stricter finetune rule (`finetune_mismatch`): a run starts from another preset's
checkpoint only when every weight it holds has a place in the model.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from tokengs.errors import UserError
from tokengs.models.tokengs import TokenGS
from tokengs.options import Options, config_defaults

log = logging.getLogger(__name__)

StateDict = Dict[str, Tensor]
# Prefixes wrappers add to every key: DDP/accelerate ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Torch files may wrap the weights in a training checkpoint dict.
STATE_DICT_WRAPPER_KEYS = ("model", "state_dict")
TOKEN_NOISE_STD = 0.01
MAX_LISTED_KEYS = 20
# Options that decide the parameters' names and shapes (the rest never reach a state dict).
ARCHITECTURE_FIELDS = ("patch_size", "dec_patch_size", "enc_depth", "dec_depth", "enc_embed_dim", "enc_num_heads",
                       "mlp_ratio", "num_gs_tokens", "token_dim", "num_dynamic_gs_tokens", "time_embedding",
                       "time_embedding_dim", "use_multiscale_encoder", "multiscale_encoder_layers",
                       "use_latent_bottleneck", "num_latents", "latent_cross_attn_depth")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be read or does not fit the model; the message names the file and what to do."""


def is_lpips_key(name: str) -> bool:
    # LPIPS's VGG belongs to the losses; older saves that carried it must not leak into the model.
    return name.startswith("lpips")


def normalize_state_dict(state: Mapping[str, Any]) -> Dict[str, Any]:
    """Strip wrapper prefixes, drop LPIPS keys (of tensors, or of anything else keyed by weight name)."""
    out = {}
    for name, value in state.items():
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        if not is_lpips_key(name):
            out[name] = value
    return out


# ---- reading and writing -----------------------------------------------------------------------

def checkpoint_file_problems(path: Union[str, Path], named: str, opt: Optional[Options] = None,
                             strict: Optional[bool] = None) -> List[str]:
    """A start-up check that loads no weights: the checkpoint at `path` is missing, empty or
    unreadable (a safetensors header that does not cover the file), or, given `opt`, its names and
    shapes do not fit opt's model: exactly when strict (default opt.strict_checkpoint_loading),
    else by the finetune rule (`finetune_mismatch`). `named` is the flag that set the path."""
    try:
        shapes = read_shapes(path)
    except CheckpointError as exc:
        return [f"{named}: {exc}"]
    if opt is None:
        return []
    strict = opt.strict_checkpoint_loading if strict is None else strict
    model = preset_manifest(opt)
    problem = strict_mismatch(shapes, model, str(path)) if strict else finetune_mismatch(shapes, model, opt, str(path))
    return [f"{named}: {problem}"] if problem else []


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; point it at a weights file (.safetensors, .pt, .pth)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (released weights go in checkpoints/)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); the download or copy failed, fetch it again")


def _unreadable_safetensors(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is not a readable safetensors file ({exc}); "
                           "it is probably truncated or corrupt: fetch it again")


def read_shapes(path: Union[str, Path]) -> Dict[str, Tuple[int, ...]]:
    """The names (as `normalize_state_dict` leaves them) and shapes of a checkpoint's weights: from
    a safetensors header, which safetensors checks against the file's length, so that a truncated
    file is found without reading its weights; a torch file is memory-mapped (its weights stay on
    disk until used; a file of torch's pre-1.6 format, which cannot be mapped, is read whole)."""
    path = Path(path)
    _check_file(path)
    if path.suffix != ".safetensors":
        return {name: tuple(t.shape) for name, t in load_weights(path, mmap=True).items()}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as opened:
            shapes = {name: tuple(opened.get_slice(name).get_shape()) for name in opened.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable_safetensors(path, exc) from exc
    return normalize_state_dict(shapes)


def load_weights(path: Union[str, Path], mmap: bool = False) -> StateDict:
    """Read a state dict (on the CPU) from .safetensors or a torch file (.pt/.pth/.bin).

    Torch files may hold the state dict itself or wrap it as {'model': ...} / {'state_dict': ...};
    mmap maps a torch file's weights instead of reading them (where its format allows).
    """
    path = Path(path)
    _check_file(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise _unreadable_safetensors(path, exc) from exc
    elif path.suffix in (".pt", ".pth", ".bin"):
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as exc:
                if not (mmap and "mmap" in str(exc)):  # only the zip format (torch >= 1.6) can be mapped
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
            raise CheckpointError(f"checkpoint {path} cannot be read by torch.load ({exc}); it is probably truncated "
                                  "or corrupt, or holds objects other than tensors: fetch or re-save it") from exc
        for key in STATE_DICT_WRAPPER_KEYS:
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    else:
        raise CheckpointError(f"checkpoint {path} has an unknown suffix {path.suffix!r}; use .safetensors, .pt or .pth")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return normalize_state_dict(state)


def _umasked_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_UMASKED_MODE = _umasked_mode()  # read once, at import: os.umask can only be read by setting it


def save_model(model: nn.Module, path: Union[str, Path]) -> None:
    """Write the model's weights as safetensors, atomically: a reader sees the old file or the new one."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {name: tensor.detach().cpu().contiguous()
             for name, tensor in normalize_state_dict(model.state_dict()).items()}
    # ends in .tmp so that a training workspace's recovery removes it after a kill mid-write
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, _UMASKED_MODE)  # safetensors creates 0600; as the workspace's other files: 0666 less umask
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---- token and latent initialization from a checkpoint -----------------------------------------

def resize_tokens(tokens: Tensor, count: int, noise_std: float = TOKEN_NOISE_STD,
                  generator: Optional[torch.Generator] = None) -> Tensor:
    """Tokens [M, D] -> [count, D] (init_tokens_from_existing, init_latents_from_existing).

    More than needed: an evenly spaced subset (indices linspace(0, M-1, count), floored), so the
    kept tokens cover the whole trained set. Fewer: all of them, then copies of them in order
    (cycling) with N(0, noise_std²) added so the copies can drift apart.
    """
    have = tokens.shape[0]
    if have >= count:
        return tokens[torch.linspace(0, have - 1, count).long()].clone()
    repeat = torch.arange(count - have) % have
    noise = torch.randn(count - have, tokens.shape[1], generator=generator, dtype=tokens.dtype) * noise_std
    return torch.cat([tokens, tokens[repeat] + noise.to(tokens.device)], dim=0)


def dynamic_tokens_from_static(static: Tensor, count: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Static tokens [S, D] -> dynamic tokens [count, D] (init_dynamic_tokens_from_static).

    Equal counts: a copy. More: the static tokens repeated in order. Fewer: a random subset.
    """
    have = static.shape[0]
    if count < have:
        return static[torch.randperm(have, generator=generator)[:count].to(static.device)].clone()
    return static[torch.arange(count, device=static.device) % have].clone()


# ---- which preset a checkpoint belongs to ------------------------------------------------------

_MANIFESTS: Dict[Tuple, Dict[str, Tuple[int, ...]]] = {}


def preset_manifest(opt: Options) -> Dict[str, Tuple[int, ...]]:
    """Parameter name -> shape of the model these options build (from a meta-device model, no memory)."""
    architecture = tuple(getattr(opt, name) for name in ARCHITECTURE_FIELDS)
    if architecture not in _MANIFESTS:
        with torch.device("meta"):
            model = TokenGS(opt)
        _MANIFESTS[architecture] = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    return _MANIFESTS[architecture]


def guess_presets(shapes: Mapping[str, Tuple[int, ...]]) -> Tuple[List[str], float]:
    """The presets whose models fit `shapes` (name -> shape) best, and the fraction of (name, shape)
    pairs they share."""
    have = set(shapes.items())
    scores = {}
    for preset, opt in config_defaults.items():
        want = set(preset_manifest(opt).items())
        scores[preset] = len(have & want) / len(have | want)
    best = max(scores.values())
    return [p for p, s in scores.items() if s == best], best


def describe_preset_guess(shapes: Mapping[str, Tuple[int, ...]]) -> str:
    """'it probably belongs to preset X (...)': the best-fitting presets of a checkpoint's names and shapes."""
    presets, score = guess_presets(shapes)
    if score == 1.0:
        head = f"it probably belongs to preset {presets[0]!r} (every name and shape fits)"
    else:
        head = f"it probably belongs to preset {presets[0]!r} ({score:.0%} of the names and shapes fit)"
    same = f"; presets of the same architecture: {', '.join(presets[1:])}" if len(presets) > 1 else ""
    return head + same


# ---- loading into a model ----------------------------------------------------------------------

@dataclass
class LoadReport:
    loaded: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)  # "name: why"
    initialized: List[str] = field(default_factory=list)  # "name: rule"


def _listing(title: str, items: List[str]) -> str:
    shown = "\n".join(f"    {item}" for item in items[:MAX_LISTED_KEYS])
    more = f"\n    ... and {len(items) - MAX_LISTED_KEYS} more" if len(items) > MAX_LISTED_KEYS else ""
    return f"  {len(items)} {title}:\n{shown}{more}"


def _mismatch(source: str, mode: str, shapes: Mapping[str, Tuple[int, ...]], listings: List[Tuple[str, List[str]]],
              fix: str) -> Optional[str]:
    """The message of a checkpoint that does not fit (None when every listing is empty)."""
    if not any(items for _, items in listings):
        return None
    parts = [f"checkpoint {source} does not fit this model ({mode}); {describe_preset_guess(shapes)}."]
    parts += [_listing(title, items) for title, items in listings if items]
    return "\n".join(parts + [fix])


def strict_mismatch(shapes: Mapping[str, Tuple[int, ...]], model: Mapping[str, Tuple[int, ...]],
                    source: str) -> Optional[str]:
    """Why a checkpoint of these names and shapes does not load strictly into a model of `model`'s, or None."""
    listings = [("missing keys (in the model, not in the checkpoint)", [n for n in model if n not in shapes]),
                ("unexpected keys (in the checkpoint, not in the model)", [n for n in shapes if n not in model]),
                ("mis-shaped keys", [f"{n}: checkpoint {list(shapes[n])}, model {list(model[n])}"
                                     for n in model if n in shapes and tuple(shapes[n]) != tuple(model[n])])]
    return _mismatch(source, "strict loading", shapes, listings,
                     "Use the options of the preset the checkpoint belongs to, or turn strict_checkpoint_loading "
                     "off to finetune from it.")


# What a finetune adds to a model that its checkpoint lacks: dynamic tokens and time embeddings.
FINETUNE_ADDED_PREFIXES = ("gs_tokens_dynamic", "patch_time_embed.", "patch_time_embed_tgt.")


def finetune_mismatch(shapes: Mapping[str, Tuple[int, ...]], model: Mapping[str, Tuple[int, ...]], opt: Options,
                      source: str) -> Optional[str]:
    """Why a run may not start from a checkpoint of these names and shapes, or None. It may when
    every weight it holds has a place in the model (the same name and shape, or tokens / latents of
    another count that init_tokens_from_existing / init_latents_from_existing resize) and the
    model's weights it lacks are only those a dynamic finetune adds (FINETUNE_ADDED_PREFIXES)."""
    resizable = _resizable(opt)

    def fits(name: str) -> bool:
        have, want = tuple(shapes[name]), tuple(model[name])
        return have == want or _resizes(resizable, name, have, want)

    listings = [("missing keys (in the model, not in the checkpoint, and not added by a finetune)",
                 [n for n in model if n not in shapes and not n.startswith(FINETUNE_ADDED_PREFIXES)]),
                ("unexpected keys (in the checkpoint, not in the model)", [n for n in shapes if n not in model]),
                ("mis-shaped keys", [f"{n}: checkpoint {list(shapes[n])}, model {list(model[n])}"
                                     for n in model if n in shapes and not fits(n)])]
    return _mismatch(source, "finetuning", shapes, listings,
                     "Start from a checkpoint of this preset's architecture, or use the options of the preset it "
                     "belongs to (tokens or latents of another count load with --init_tokens_from_existing / "
                     "--init_latents_from_existing).")


def _resizable(opt: Options) -> Dict[str, bool]:
    """The weights whose count an init rule adapts, and whether the options turn that rule on."""
    return {"gs_tokens": opt.init_tokens_from_existing, "gs_tokens_dynamic": opt.init_tokens_from_existing,
            "enc_dec_backbone.latents": opt.init_latents_from_existing}


def _resizes(resizable: Dict[str, bool], name: str, have: Sequence[int], want: Sequence[int]) -> bool:
    """Whether the checkpoint's `name` of shape `have` is resized into the model's `want`: tokens or
    latents of another count, where `resizable` (from `_resizable`) allows it."""
    return bool(resizable.get(name)) and tuple(have[1:]) == tuple(want[1:])


def load_model_checkpoint(model: nn.Module, path_or_state: Union[str, Path, Mapping[str, Tensor]],
                          opt: Optional[Options] = None, strict: Optional[bool] = None) -> LoadReport:
    """Load a checkpoint into `model`.

    strict (default: opt.strict_checkpoint_loading) requires exactly the model's names and shapes
    and otherwise raises one CheckpointError. Tolerant loading takes every key that fits, applies
    the token/latent init rules of `opt` (default: model.opt) and logs each key it skips.
    """
    opt = opt if opt is not None else model.opt
    strict = opt.strict_checkpoint_loading if strict is None else strict
    if isinstance(path_or_state, (str, Path)):
        source, state = str(path_or_state), load_weights(path_or_state)
    else:
        source, state = "state dict", normalize_state_dict(path_or_state)
    own = model.state_dict()
    report = LoadReport()

    if strict:
        problem = strict_mismatch({n: tuple(t.shape) for n, t in state.items()},
                                  {n: tuple(t.shape) for n, t in own.items()}, source)
        if problem:
            raise CheckpointError(problem)
        model.load_state_dict(state, strict=True)
        report.loaded = list(state)
        return report

    resizable = _resizable(opt)
    to_load: StateDict = {}
    for name, value in state.items():
        if name not in own:
            report.skipped.append(f"{name}: not in the model")
        elif value.shape == own[name].shape:
            to_load[name] = value
        elif _resizes(resizable, name, value.shape, own[name].shape):
            to_load[name] = resize_tokens(value, own[name].shape[0])
            report.initialized.append(f"{name}: {value.shape[0]} -> {own[name].shape[0]} from the checkpoint's")
        else:
            report.skipped.append(f"{name}: checkpoint {list(value.shape)}, model {list(own[name].shape)}")
    if ("gs_tokens_dynamic" in own and "gs_tokens_dynamic" not in state and opt.init_dynamic_tokens_from_static
            and "gs_tokens" in to_load):
        count = own["gs_tokens_dynamic"].shape[0]
        to_load["gs_tokens_dynamic"] = dynamic_tokens_from_static(to_load["gs_tokens"], count)
        report.initialized.append("gs_tokens_dynamic: from the static tokens")
    report.skipped += [f"{name}: not in the checkpoint, keeps its fresh initialization"
                       for name in own if name not in to_load]
    for item in report.initialized:
        log.info("checkpoint %s: initialized %s", source, item)
    for item in report.skipped:
        log.warning("checkpoint %s: skipped %s", source, item)
    model.load_state_dict(to_load, strict=False)
    report.loaded = list(to_load)
    return report
