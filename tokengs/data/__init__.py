"""Datasets: one reader per raw layout (dl3dv, dl3dv_eval, re10k, kubric), the registry of the
release's names, the provider (view sampling and preprocessing), the synthetic scene generator
(`python -m tokengs.data.synthetic`) and the data check (`python -m tokengs.data.check`).

Layouts: DESIGN.md "Datasets (raw layouts)" and data/DATA.md.
"""

from tokengs.data.provider import SceneDataset, preprocess_views
from tokengs.data.registry import REGISTRY, build_dataset, dataset_root_problems, parse_name
from tokengs.data.scene import DataLoadError, SceneError

__all__ = ["REGISTRY", "DataLoadError", "SceneDataset", "SceneError", "build_dataset", "dataset_root_problems",
           "parse_name", "preprocess_views"]
