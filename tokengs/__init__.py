"""tokengs: feed-forward 3D Gaussian Splatting with learnable Gaussian tokens (TokenGS).

Subpackages: `tokengs.data` (datasets, the typed batch, the synthetic generator), `tokengs.models`
(the model and checkpoints), `tokengs.rendering` (gsplat and a pure-PyTorch rasterizer);
commands: `python -m tokengs.train | tokengs.evaluate | tokengs.demo`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tokengs")
except PackageNotFoundError:  # run from a checkout without installing
    __version__ = "0.0.0+checkout"
