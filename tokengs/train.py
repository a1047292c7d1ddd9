"""Training: `python -m tokengs.train PRESET [--flag value ...]`, or under `accelerate launch`.

Reads top to bottom: options -> start-up checks -> workspace (resume or fresh) -> data ->
model, optimizer, schedule -> the loop (step, NaN guard, checkpoint, SIGTERM) -> validation.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import pickle
import random
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from tokengs import workspace as ws
from tokengs.cli import entry_point, parse_options, signal_handlers, work_started
from tokengs.errors import UserError
from tokengs.options import Domain, Options, OptionsError
from tokengs.startup import raise_problems

if TYPE_CHECKING:
    from tokengs.data.provider import SceneDataset
    from tokengs.data.types import Batch, Views

log = logging.getLogger("tokengs.train")

# Fields that may differ between a workspace's config.yaml and the flags of a resumed run (the
# workspace path too: a moved workspace, or one named by a relative path from elsewhere, resumes).
RESUMABLE_CHANGES = {"workspace", "num_workers", "print_freq", "log_image_freq", "use_wandb", "resume", "retrain",
                     "save_every_steps", "eval_n_media_dumps", "max_consecutive_load_failures",
                     "max_consecutive_nonfinite_steps", "render_backend", "render_tile_size", "activation_checkpointing",
                     "compile_blocks"}


class NonFiniteError(UserError, RuntimeError):
    """Too many training steps in a row had a NaN/Inf loss or gradient."""


# ---------------------------------------------------------------------------------------------
# Pure pieces (tested on their own)
# ---------------------------------------------------------------------------------------------

def dyn_aux_weight(opt: Options, step: int) -> float:
    """Weight of the dynamic-only render loss at optimizer step `step`: hold, then linear decay."""
    if opt.lambda_dyn_aux <= 0:
        return 0.0
    if step < opt.lambda_dyn_aux_warmup_steps or opt.lambda_dyn_aux_decay_steps <= 0:
        return opt.lambda_dyn_aux
    progress = min(1.0, (step - opt.lambda_dyn_aux_warmup_steps) / opt.lambda_dyn_aux_decay_steps)
    return opt.lambda_dyn_aux + (opt.lambda_dyn_aux_min - opt.lambda_dyn_aux) * progress


def param_groups(model: torch.nn.Module, weight_decay: float = 0.05) -> list[dict]:
    """Weight decay on parameters of 2+ dimensions except the scene latents and the activation head.
    The Gaussian tokens are decayed: the released checkpoints were trained so, and finetuning
    from them keeps that regime."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or name.endswith("enc_dec_backbone.latents") or name.startswith("activation_head.")
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(opt: Options, model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model), lr=opt.lr, betas=(0.9, 0.95), fused=torch.cuda.is_available())


def steps_per_epoch(opt: Options, batches_per_process: int) -> int:
    """Optimizer steps per epoch: iterations per epoch per process // gradient_accumulation_steps."""
    return min(batches_per_process, opt.max_iters_per_epoch) // opt.gradient_accumulation_steps


def build_scheduler(opt: Options, optimizer: torch.optim.Optimizer, total_steps: int):
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=opt.lr, total_steps=max(total_steps, 1),
        pct_start=min(opt.pct_start_steps / max(total_steps, 1), 0.99), final_div_factor=opt.final_div_factor)


class EpochSampler(Sampler[int]):
    """A permutation of the dataset seeded by (seed, epoch), sharded by rank, able to skip a
    prefix (a resumed run continues mid-epoch with the same data order)."""

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def per_process(self) -> int:
        return math.ceil(self.size / self.world_size)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        order += order[: self.per_process() * self.world_size - self.size]  # equal share for every rank
        return iter(order[self.rank::self.world_size][self.skip:])

    def __len__(self) -> int:
        return max(self.per_process() - self.skip, 0)


# ---------------------------------------------------------------------------------------------
# RNG state (saved in metadata.json so a resumed run continues every random stream)
# ---------------------------------------------------------------------------------------------

def rng_state() -> str:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    return base64.b64encode(pickle.dumps(state)).decode()


def set_rng_state(encoded: str) -> None:
    state = pickle.loads(base64.b64decode(encoded))
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Start-up checks: every problem at once, before any data is read
# ---------------------------------------------------------------------------------------------

def startup_problems(opt: Options) -> list[str]:
    """Every problem that would stop the run, found before any data is read: the dataset roots, and
    the checkpoint a new run starts from (--resume, by the finetune rule) or a resumed run continues
    (the workspace's own, exactly), its missing files and its config.yaml's disagreements with the flags."""
    from tokengs.data import dataset_root_problems
    from tokengs.models.checkpoint import checkpoint_file_problems
    from tokengs.startup import model_and_data_problems

    workspace = Path(opt.workspace)
    if not (workspace / ws.METADATA_FILE).exists():
        return model_and_data_problems(opt, opt.resume or None, "--resume", strict=False)
    problems = dataset_root_problems(opt)
    missing = ws.missing_checkpoint_files(workspace)
    if missing:
        problems.append(f"workspace {workspace} holds metadata.json but not {', '.join(missing)}: the checkpoint "
                        "cannot be resumed; restore the files, or start a new --workspace "
                        f"with --resume {workspace / ws.MODEL_FILE} to keep the weights")
    disagreements = config_problems(opt)
    if ws.MODEL_FILE not in missing:
        # against flags that disagree with the workspace's options the weights would only fail too: the file alone then
        problems += checkpoint_file_problems(workspace / ws.MODEL_FILE, "the workspace's checkpoint",
                                             None if disagreements else opt, strict=True)
    return problems + disagreements


def _recorded(workspace: Path, field: str):
    """The value of `field` in the workspace's config.yaml (None where there is none to read)."""
    try:
        return getattr(Options.load_yaml(workspace / ws.CONFIG_FILE), field)
    except (OSError, OptionsError):
        return None


def config_problems(opt: Options) -> list[str]:
    """How the workspace's config.yaml disagrees with opt, besides the RESUMABLE_CHANGES (every difference)."""
    config = Path(opt.workspace) / ws.CONFIG_FILE
    if not config.exists():
        return []
    try:
        saved = Options.load_yaml(config)
    except OptionsError as exc:
        return [str(exc)]
    diff = [f"{k} (workspace {v!r}, flags {getattr(opt, k)!r})" for k, v in saved.to_dict().items()
            if k not in RESUMABLE_CHANGES and v != opt.to_dict()[k]]
    if not diff:
        return []
    return [f"{config} disagrees with the flags given: {'; '.join(diff)}. Run with `--config {config}` or "
            "choose another --workspace"]


# ---------------------------------------------------------------------------------------------
# The training run
# ---------------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, opt: Options):
        from accelerate import Accelerator

        self.opt = opt
        mixed = opt.mixed_precision if torch.cuda.is_available() else "no"  # CPU runs stay float32
        self.accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=opt.gradient_accumulation_steps,
                                       cpu=not torch.cuda.is_available())
        self.workspace = Path(opt.workspace)
        self.is_main = self.accelerator.is_main_process
        if not self.is_main:  # every process would log the same warnings; the main one speaks for all
            logging.getLogger("tokengs").setLevel(logging.ERROR)
        self.stop_requested = False
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.window_losses: list[torch.Tensor] = []  # losses of the micro-batches of the current optimizer step
        self.history: list[dict] = []
        self.wandb_run_id: str | None = None

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        from tokengs.data import build_dataset, collate
        from tokengs.losses import LossComputer
        from tokengs.startup import build_model

        opt, acc = self.opt, self.accelerator
        torch.manual_seed(opt.seed)
        random.seed(opt.seed)
        np.random.seed(opt.seed)
        metadata = ws.read_metadata(self.workspace)
        if self.is_main and metadata is not None and opt.resume and opt.resume != _recorded(self.workspace, "resume"):
            log.warning("--resume %s is not used: %s holds its own checkpoint (step %s), which this run continues; "
                        "--retrain starts the workspace again from --resume", opt.resume, self.workspace,
                        metadata.get("step"))

        self.train_set = build_dataset(opt, "train")
        self.val_set = validation_scenes(build_dataset(opt, "val"))
        self.sampler = EpochSampler(len(self.train_set), opt.seed, acc.process_index, acc.num_processes)
        self.loader = DataLoader(self.train_set, batch_size=opt.batch_size, sampler=self.sampler, collate_fn=collate,
                                 num_workers=opt.num_workers, drop_last=True, pin_memory=torch.cuda.is_available(),
                                 worker_init_fn=_ignore_stop_signals)
        batches = self.sampler.per_process() // opt.batch_size
        self.steps_per_epoch = steps_per_epoch(opt, batches)
        if self.steps_per_epoch == 0:
            raise OptionsError(f"an epoch holds {batches} batches of {opt.batch_size} per process, fewer than "
                               f"gradient_accumulation_steps={opt.gradient_accumulation_steps}; add scenes or "
                               "lower --batch_size")

        # a resumed run continues its own weights exactly; a new one starts from --resume, loading what fits
        if metadata is not None:
            model = build_model(opt, self.workspace / ws.MODEL_FILE, strict=True)
        else:
            model = build_model(opt, opt.resume or None, strict=False)
        optimizer = build_optimizer(opt, model)
        total = opt.num_epochs * self.steps_per_epoch
        self.scheduler = build_scheduler(opt, optimizer, total)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.loss = LossComputer(opt, device=acc.device)
        if metadata is not None:
            self._resume(metadata)
        if self.is_main:  # only now: a run refused at start-up leaves no trace in the workspace
            self.workspace.mkdir(parents=True, exist_ok=True)
            ws.atomic_write(self.workspace / ws.CONFIG_FILE, opt.save_yaml)
            self._init_loggers()
        acc.wait_for_everyone()

    def _resume(self, metadata: dict) -> None:
        """The optimizer, schedule, counters and random streams of the checkpoint (its weights are in the
        model); a file of them that does not load is named in one WorkspaceError."""
        keep = (f"restore it, or start a new --workspace with --resume {self.workspace / ws.MODEL_FILE} to keep "
                "the weights")
        for name, stateful in ((ws.OPTIMIZER_FILE, self.optimizer), (ws.SCHEDULER_FILE, self.scheduler)):
            path = self.workspace / name
            with ws.reading(path, keep):
                # loaded to the CPU, and load_state_dict moves each state to its parameter's device (a map_location
                # of the process's device fails for CPU processes, which accelerate names cpu:1, cpu:2, ...)
                stateful.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
        with ws.reading(self.workspace / ws.METADATA_FILE, keep):
            self.global_step, self.epoch, self.batch_in_epoch = (_count(metadata, key)
                                                                 for key in ("step", "epoch", "batch_in_epoch"))
            self.nonfinite_total = _count(metadata, "nonfinite_steps") if "nonfinite_steps" in metadata else 0
            self.wandb_run_id = metadata.get("wandb_run_id")
            self.history = list(metadata.get("history", []))
            if "rng_state" in metadata:
                set_rng_state(metadata["rng_state"])
        log.info("resuming %s at step %d (epoch %d, batch %d)", self.workspace, self.global_step, self.epoch,
                 self.batch_in_epoch)

    def _init_loggers(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.workspace / "tensorboard"))
        self.wandb = None
        if self.opt.use_wandb:
            import wandb

            self.wandb = wandb.init(project=self.opt.project_name, name=self.opt.experiment_name,
                                    dir=str(self.workspace), id=self.wandb_run_id, resume="allow",
                                    config=self.opt.to_dict())
            self.wandb_run_id = self.wandb.id

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self) -> None:
        """Write the resumable checkpoint (main process only; every process waits for it)."""
        from tokengs.models.checkpoint import save_model

        acc = self.accelerator
        acc.wait_for_everyone()
        if self.is_main:
            metadata = {"epoch": self.epoch, "step": self.global_step, "batch_in_epoch": self.batch_in_epoch,
                        "nonfinite_steps": self.nonfinite_total, "wandb_run_id": self.wandb_run_id,
                        "history": self.history, "rng_state": rng_state(), "time": time.time()}
            model = acc.unwrap_model(self.model)
            previous = ws.read_metadata(self.workspace)
            try:
                ws.save_checkpoint(self.workspace, {
                    ws.MODEL_FILE: lambda p: save_model(model, p),
                    ws.OPTIMIZER_FILE: torch_writer(self.optimizer.state_dict()),
                    ws.SCHEDULER_FILE: torch_writer(self.scheduler.state_dict()),
                    ws.METADATA_FILE: lambda p: p.write_text(json.dumps(metadata)),
                }, step=self.global_step)
            except OSError as exc:  # a full disk, a lost mount, a quota: say where, and what survived
                kept = (f"the checkpoint of step {previous['step']} is intact" if previous else
                        "no earlier checkpoint exists")
                raise ws.WorkspaceError(
                    f"cannot write the checkpoint of step {self.global_step} to {self.workspace} "
                    f"({exc.strerror or exc}); {kept}. Free space there (or fix the disk) and run the same "
                    "command to resume") from exc
        acc.wait_for_everyone()

    # -- one optimizer step's worth of micro-batches --------------------------------------------
    def train_step(self, batch: Batch) -> dict:
        opt, acc = self.opt, self.accelerator
        batch = batch.to(acc.device, non_blocking=True)
        model = acc.unwrap_model(self.model)
        with acc.accumulate(self.model):
            with acc.autocast():
                packed = self.model(batch)
            aux_weight = dyn_aux_weight(opt, self.global_step)
            result = self.loss.backward(packed.float(), supervised_views(opt, batch), dyn_aux_weight=aux_weight,
                                        num_static=model.num_static_gaussians, backward=acc.backward)
            # every micro-batch of the optimizer step counts: a NaN in an early one must skip the update too
            self.window_losses.append(result.loss.detach())
            stats = {"loss": result.loss.detach(), "psnr": result.psnr.detach().mean(), "dyn_aux_weight": aux_weight}
            if acc.sync_gradients:
                losses, self.window_losses = torch.stack(self.window_losses), []
                stats["loss"] = losses.mean()
                grad_norm = acc.clip_grad_norm_(self.model.parameters(), opt.gradient_clip) \
                    if opt.gradient_clip > 0 else _grad_norm(model)
                bad = ~torch.isfinite(grad_norm) | ~torch.isfinite(losses).all()
                if acc.num_processes > 1:
                    bad = acc.reduce(bad.float(), reduction="sum") > 0
                if bool(bad):  # the update is skipped: weights and optimizer state stay as they were
                    self.nonfinite_total += 1
                    self.nonfinite_in_row += 1
                    what = "gradient" if torch.isfinite(losses).all() else "loss"  # this process's view
                    log.warning("step %d: non-finite %s, update skipped (%d so far)",
                                self.global_step, what, self.nonfinite_total)
                    if self.nonfinite_in_row >= opt.max_consecutive_nonfinite_steps:
                        raise NonFiniteError(
                            f"{self.nonfinite_in_row} steps in a row had a NaN/Inf loss or gradient (limit "
                            f"--max_consecutive_nonfinite_steps {opt.max_consecutive_nonfinite_steps}); the last "
                            f"good checkpoint is in {self.workspace}. Lower --lr or check the data.")
                else:
                    self.optimizer.step()
                    self.nonfinite_in_row = 0
                self.optimizer.zero_grad(set_to_none=True)
                # the lr this step used: after scheduler.step() get_last_lr() is the next step's, and after the
                # last step OneCycleLR's cosine runs past its end and climbs back up
                stats["lr"] = self.scheduler.get_last_lr()[0]
                self.scheduler.step()
                stats["grad_norm"] = grad_norm.detach()
        stats["gaussians"] = packed.detach()
        return stats

    # -- validation ------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float:
        from tokengs.media import save_image_grid

        acc = self.accelerator
        self.model.eval()
        psnrs = []
        for i, scene in enumerate(self.val_set):
            batch = scene.to(acc.device)
            with acc.autocast():
                packed = self.model(batch)
            result = self.loss.evaluate(packed.float(), batch.target)
            psnrs.append(result.psnr.float().cpu())
            if i == 0 and self.is_main:
                save_image_grid(self.workspace / "val" / f"epoch_{self.epoch:04d}.png",
                                [batch.target.images[0], result.render.images[0]])
        self.model.train()
        return float(torch.cat(psnrs).mean())

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> bool:
        """Train to the end and mark the workspace COMPLETE (True), or stop early on SIGTERM after
        saving a checkpoint at the current step (False)."""
        from tqdm import tqdm

        work_started()
        bar = tqdm(total=self.opt.num_epochs * self.steps_per_epoch, initial=self.global_step,
                   disable=not self.is_main, desc="train", dynamic_ncols=True)
        try:
            with self._sigterm_stops():
                finished = self._train_epochs(bar)
        finally:
            bar.close()
            self._close_loggers()
        if finished and self.is_main:
            ws.atomic_write(self.workspace / ws.COMPLETE_FILE,
                            lambda p: p.write_text(json.dumps({"step": self.global_step})))
        return finished

    def _train_epochs(self, bar) -> bool:
        opt, acc = self.opt, self.accelerator
        self.model.train()
        micro_per_epoch = self.steps_per_epoch * opt.gradient_accumulation_steps
        while self.epoch < opt.num_epochs:
            self.sampler.set_epoch(self.epoch, skip=self.batch_in_epoch * opt.batch_size)
            if hasattr(self.train_set, "set_epoch"):
                self.train_set.set_epoch(self.epoch)
            tick, tick_step = time.perf_counter(), self.global_step
            for batch in self.loader:
                if self.batch_in_epoch >= micro_per_epoch:
                    break
                stats = self.train_step(batch)
                self.batch_in_epoch += 1
                if not acc.sync_gradients:
                    continue
                self.global_step += 1
                bar.update(1)
                if self.global_step % opt.print_freq == 0 or self.global_step == 1:
                    now = time.perf_counter()
                    self._log(stats, (self.global_step - tick_step) / (now - tick), bar)
                    tick, tick_step = now, self.global_step
                stop = self._stop_agreed()
                if stop or (opt.save_every_steps > 0 and self.global_step % opt.save_every_steps == 0):
                    self.save()
                if stop:
                    return self._stopped()
            self.epoch += 1
            self.batch_in_epoch = 0
            psnr = self.validate()
            self.history.append({"epoch": self.epoch, "step": self.global_step, "val_psnr": psnr})
            if self.is_main:
                self.tb.add_scalar("val/psnr", psnr, self.global_step)
                if self.wandb:
                    self.wandb.log({"val/psnr": psnr}, step=self.global_step)
                log.info("epoch %d: validation PSNR %.2f dB", self.epoch, psnr)
            self.save()
            if self._stop_agreed():  # SIGTERM during validation: the epoch's checkpoint is the current step's
                return self._stopped()
        return True

    @contextmanager
    def _sigterm_stops(self):
        """SIGTERM (how SLURM preempts) and a first Ctrl-C only set a flag, which the loop checks
        after each step: the run saves the step's checkpoint and stops. A second Ctrl-C interrupts
        at once. The previous handlers are back afterwards."""
        def request_stop(signum, frame):
            self.stop_requested = True
            if signum == signal.SIGINT:
                log.warning("Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again to quit now)")
                signal.signal(signal.SIGINT, signal.default_int_handler)

        with signal_handlers((signal.SIGTERM, signal.SIGINT), request_stop):
            yield

    def _stop_agreed(self) -> bool:
        """Whether any process got SIGTERM. Processes get it at different moments, and all must stop
        after the same step, or one would wait in the checkpoint's barrier while another trains on."""
        if self.accelerator.num_processes == 1:
            return self.stop_requested
        flag = torch.tensor(float(self.stop_requested), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum") > 0)

    def _stopped(self) -> bool:
        log.warning("stopped (SIGTERM or Ctrl-C): checkpoint saved at step %d in %s; run the same command to resume",
                    self.global_step, self.workspace)
        return False

    def _close_loggers(self) -> None:
        if not self.is_main:
            return
        self.tb.close()
        if self.wandb:
            self.wandb.finish()

    def _log(self, stats: dict, steps_per_second: float, bar) -> None:
        opt, acc = self.opt, self.accelerator
        loss_psnr = torch.stack([stats["loss"].float(), stats["psnr"].float()])
        if acc.num_processes > 1:  # the global batch's numbers, not this process's share of it
            loss_psnr = acc.reduce(loss_psnr, reduction="mean")
        loss, psnr = loss_psnr.tolist()
        lr = stats["lr"]
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        bar.set_postfix(loss=f"{loss:.4f}", psnr=f"{psnr:.2f}", lr=f"{lr:.2e}", its=f"{steps_per_second:.2f}",
                        mem=f"{mem:.1f}G", skipped=self.nonfinite_total)
        self.history.append({"step": self.global_step, "loss": loss, "psnr": psnr, "lr": lr})
        if not self.is_main:
            return
        scalars = {"train/loss": loss, "train/psnr": psnr, "train/lr": lr, "train/its": steps_per_second,
                   "train/mem_gib": mem, "train/grad_norm": float(stats.get("grad_norm", float("nan"))),
                   "train/skipped_steps": self.nonfinite_total,
                   "train/dyn_aux_weight": stats["dyn_aux_weight"]}  # the weight this step used
        for key, value in scalars.items():
            self.tb.add_scalar(key, value, self.global_step)
        if self.global_step % opt.log_image_freq == 0 or self.global_step == 1:
            from tokengs.gaussians import Gaussians

            g = Gaussians.unpack(stats["gaussians"].float())
            for name, values in (("opacity", g.opacities), ("scale", g.scales), ("z", g.means[..., 2]),
                                 ("color", g.colors)):
                self.tb.add_histogram(f"gaussians/{name}", values.flatten().cpu(), self.global_step)
        if self.wandb:
            self.wandb.log(scalars, step=self.global_step)


def validation_scenes(dataset: SceneDataset) -> list[Batch]:
    """The validation scenes of `dataset` that load, loaded once (their views depend on the seed
    and the scene only, so every validation sees the same tensors); each one that does not load
    is dropped with a warning naming it. DataLoadError when none loads."""
    from tokengs.data.scene import DataLoadError

    usable, failures = [], []
    for index in range(len(dataset)):
        try:
            usable.append(dataset[index])
        except DataLoadError as exc:
            log.warning("dropping a validation scene: %s", exc)
            failures.append(str(exc))
    if not usable:
        raise DataLoadError(f"none of the {len(dataset)} validation scenes (the last batch_size of each dataset) "
                            f"loads; the first: {failures[0]}. `python -m tokengs.data.check` lists every problem")
    return usable


def torch_writer(state: dict) -> Callable[[Path], None]:
    """A checkpoint writer of `state` that runs torch.save through a Python file: a full disk then
    raises the file's OSError inside torch's error, where `ws.disk_fault` finds it (torch's own
    file writer reports it without the errno)."""
    def write(path: Path) -> None:
        with open(path, "wb") as handle:
            torch.save(state, handle)
    return write


def _count(metadata: dict, key: str) -> int:
    value = metadata[key]
    if not Domain(0, integer=True).holds(value):
        raise ValueError(f"{key} is {value!r}, not a count")
    return value


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM and SIGINT. SLURM sends SIGTERM to every process of the
    job, and a terminal sends Ctrl-C's SIGINT to its whole process group; a worker stopped by
    either makes the next batch raise before the main process could save its checkpoint. The
    main process shuts its workers down itself when it stops."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def supervised_views(opt: Options, batch: Batch) -> Views:
    """The views the training loss renders: the targets, or with use_input_supervision the context
    views and then the targets (a sample may then have no view beyond its context)."""
    return batch.all_views() if opt.use_input_supervision else batch.target


def _grad_norm(model: torch.nn.Module) -> torch.Tensor:
    grads = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


def run(opt: Options) -> bool:
    """Train `opt` in `opt.workspace`: True when the workspace is COMPLETE, False when SIGTERM
    stopped the run after a checkpoint. Raises OptionsError listing every problem of the setup, and
    WorkspaceBusy when another process holds the workspace (only the main process locks it: the
    others write nothing there)."""
    trainer = Trainer(opt)  # its Accelerator tells which process is the main one
    try:
        return _run(trainer)
    finally:
        trainer.accelerator.end_training()  # leaves the process group cleanly (NCCL warns otherwise)


def _run(trainer: "Trainer") -> bool:
    opt = trainer.opt
    with ws.claimed(opt.workspace, hold=trainer.is_main):
        workspace = Path(opt.workspace)
        if trainer.is_main:  # first: the checks below read the checkpoint a killed save may have left half-renamed
            ws.recover(workspace)
        trainer.accelerator.wait_for_everyone()
        if (workspace / ws.COMPLETE_FILE).exists():
            if not opt.retrain:
                # changed flags would otherwise pass unnoticed, as if they had trained the workspace
                raise_problems(config_problems(opt), "running a COMPLETE workspace (--retrain trains it again)")
                log.warning("%s is COMPLETE; nothing to do (pass --retrain to train it again)", workspace)
                return True
            log.warning("--retrain: training %s again from the start; its checkpoint and logs will be replaced",
                        workspace)
            if trainer.is_main:
                ws.forget_checkpoint(workspace)
                shutil.rmtree(workspace / "tensorboard", ignore_errors=True)  # else two runs' curves share the steps
        trainer.accelerator.wait_for_everyone()  # every process reads the workspace as the main one left it
        raise_problems(startup_problems(opt), "training")
        trainer.setup()
        return trainer.fit()


@entry_point
def main(argv: Sequence[str]) -> None:
    """`python -m tokengs.train`: errors follow `tokengs.cli.entry_point`'s rule."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tokengs.threads import configure_cpu_threads

    opt = parse_options(argv, prog="python -m tokengs.train")
    configure_cpu_threads()
    run(opt)


if __name__ == "__main__":
    main()
