"""Datasets: one reader per raw layout (dl3dv, dl3dv_eval, re10k, kubric), the registry of the
release's names, the provider (view sampling and preprocessing into typed `Views` and `Batch`es),
the synthetic scene generator (`python -m tokengs.data.synthetic`) and the data check
(`python -m tokengs.data.check`). data/DATA.md describes the raw layouts.
"""

from tokengs.data.provider import SceneDataset, preprocess_views
from tokengs.data.registry import REGISTRY, build_dataset, dataset_root_problems, parse_name
from tokengs.data.scene import DataLoadError, SceneError
from tokengs.data.types import Batch, Views, collate

__all__ = ["REGISTRY", "Batch", "DataLoadError", "SceneDataset", "SceneError", "Views", "build_dataset", "collate",
           "dataset_root_problems", "parse_name", "preprocess_views"]
