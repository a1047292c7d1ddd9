"""The start-up of training, evaluation and the render scripts: the problems that would stop a run,
found before any work and reported together (each naming the flag that sets what is wrong), and
the model built from the options and a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

from tokengs.options import Options, OptionsError

if TYPE_CHECKING:
    from tokengs.models import TokenGS

PathLike = Union[str, Path]


def model_and_data_problems(opt: Options, checkpoint: Optional[PathLike], named: str,
                            strict: Optional[bool] = None) -> list[str]:
    """Every problem of the options' dataset roots and of the checkpoint (missing, empty, a header
    that does not cover the file, names and shapes that do not fit opt's model: exactly when
    strict, else by the finetune rule; strict None: opt.strict_checkpoint_loading), in that order;
    `named` says which flag set the checkpoint's path. No checkpoint: none checked."""
    from tokengs.data import dataset_root_problems
    from tokengs.models.checkpoint import checkpoint_file_problems

    problems = list(dataset_root_problems(opt))
    if checkpoint is not None:
        problems += checkpoint_file_problems(checkpoint, named, opt, strict)
    return problems


def raise_problems(problems: Sequence[str], before: str) -> None:
    """Raise one OptionsError listing every problem ("fix N problem(s) before BEFORE: ..."), if any;
    the commands end with it and exit code 2."""
    if problems:
        raise OptionsError(f"fix {len(problems)} problem(s) before {before}:\n  - " + "\n  - ".join(problems))


def build_model(opt: Options, checkpoint: Optional[PathLike] = None, strict: Optional[bool] = None) -> "TokenGS":
    """The model of `opt`, holding the weights of `checkpoint` when one is given: strictly (a
    mismatch raises CheckpointError naming the file and the preset it fits) or tolerantly with
    the options' token and latent init rules (strict None: opt.strict_checkpoint_loading)."""
    from tokengs.models import TokenGS, load_model_checkpoint

    model = TokenGS(opt)
    if checkpoint is not None:
        load_model_checkpoint(model, checkpoint, opt, strict=strict)
    return model
