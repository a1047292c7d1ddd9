"""The TokenGS model, its building blocks, what its encoder reads of the views, and checkpoint I/O."""

from tokengs.models.checkpoint import CheckpointError, load_model_checkpoint, load_weights, save_model
from tokengs.models.tokengs import SceneEncoding, TokenGS

__all__ = ["TokenGS", "SceneEncoding", "CheckpointError", "load_weights", "load_model_checkpoint", "save_model"]
