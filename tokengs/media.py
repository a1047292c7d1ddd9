"""Images, videos and depth maps for people to look at: grids, MP4s, colored depth, curves."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """[..., 3, H, W] float in [0, 1] -> [..., H, W, 3] uint8."""
    array = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return array.movedim(-3, -1).numpy()


def grid(rows: Sequence[Tensor]) -> np.ndarray:
    """Rows of views, each [V, 3, H, W] (same H, W), -> one [sum H, max V * W, 3] uint8 image."""
    strips = [np.concatenate(list(to_uint8(row)), axis=1) for row in rows]
    width = max(s.shape[1] for s in strips)
    strips = [np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0)), constant_values=255) for s in strips]
    return np.concatenate(strips, axis=0)


def comparison_grid(columns: Sequence[Tensor], min_height: int = 192) -> np.ndarray:
    """Views side by side for a person to compare: each column [V, 3, H, W] (e.g. prediction,
    truth), one row per view, every image enlarged by a whole factor (nearest pixel) to at least
    min_height pixels, with a white gap between images. -> [rows, cols, 3] uint8."""
    scale = max(1, -(-min_height // columns[0].shape[-2]))
    views, gap = columns[0].shape[0], 4
    tiles = [[np.kron(to_uint8(column[v]), np.ones((scale, scale, 1), np.uint8)) for column in columns]
             for v in range(views)]
    height, width = tiles[0][0].shape[:2]
    canvas = np.full((views * (height + gap) - gap, len(columns) * (width + gap) - gap, 3), 255, np.uint8)
    for v, row in enumerate(tiles):
        for c, tile in enumerate(row):
            canvas[v * (height + gap):v * (height + gap) + height, c * (width + gap):c * (width + gap) + width] = tile
    return canvas


def save_png(path: str | Path, image: np.ndarray, compress_level: int = 6) -> Path:
    """[H, W, 3] uint8 -> PNG. compress_level (zlib, 0-9; Pillow's default 6): 1 wrote a 256x896
    photo 3.8x faster, into a file 3% larger."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, compress_level=compress_level)
    return path


def save_image_grid(path: str | Path, rows: Sequence[Tensor]) -> Path:
    return save_png(path, grid(rows))


def colorize_depth(depth: Tensor, alpha: Tensor | None = None) -> Tensor:
    """[..., 1, H, W] depth -> [..., 3, H, W] turbo colors in [0, 1], near = warm; empty pixels black.

    The range is taken from the 2nd-98th percentiles of the covered pixels so outliers do not wash it out.
    """
    import cv2

    depth = depth.detach().float().cpu()
    valid = torch.isfinite(depth) & (depth > 0)
    if alpha is not None:
        valid &= alpha.detach().cpu() > 0.5
    values = depth[valid]
    lo, hi = (torch.quantile(values, 0.02).item(), torch.quantile(values, 0.98).item()) if values.numel() else (0, 1)
    scaled = ((hi - depth) / max(hi - lo, 1e-8)).clamp(0, 1).nan_to_num(0)
    gray = (scaled * 255).round().to(torch.uint8).numpy()
    flat = gray.reshape(-1, gray.shape[-1])
    colored = cv2.applyColorMap(flat, cv2.COLORMAP_TURBO)[..., ::-1]  # BGR -> RGB
    colored = torch.from_numpy(colored.copy()).reshape(*gray.shape[:-3], gray.shape[-2], gray.shape[-1], 3)
    colored = colored.movedim(-1, -3).float() / 255
    return colored * valid.float()


def save_video(path: str | Path, frames: np.ndarray | Tensor, fps: int = 24) -> Path:
    """Write [T, H, W, 3] uint8 (or [T, 3, H, W] float) frames to MP4 (H.264 via imageio-ffmpeg,
    or OpenCV's mp4v where the ffmpeg plugin is absent); RuntimeError where neither can."""
    if torch.is_tensor(frames):
        frames = to_uint8(frames)
    frames = np.asarray(frames)
    # H.264 wants even sizes
    frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (only to know the plugin is there)

        imageio.mimwrite(path, list(frames), fps=fps, codec="libx264", quality=8, macro_block_size=1)
    except ImportError:
        import cv2

        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (frames.shape[2], frames.shape[1]))
        if not writer.isOpened():  # OpenCV built without an MP4 encoder would write nothing, silently
            raise RuntimeError(f"{path}: no MP4 encoder here (neither imageio's ffmpeg plugin nor OpenCV's mp4v); "
                               "pip install imageio[ffmpeg]")
        for frame in frames:
            writer.write(np.ascontiguousarray(frame[..., ::-1]))
        writer.release()
    return path


def read_video(path: str | Path) -> np.ndarray:
    """Decode an MP4 to [T, H, W, 3] uint8 (tests check what the writers produced)."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame[..., ::-1])
    capture.release()
    if not frames:
        raise ValueError(f"{path}: no decodable video frames")
    return np.stack(frames)


PLOT_FONT_SIZE = 13  # pixels


def plot_curves(path: str | Path, series: dict[str, Sequence[tuple[float, float]]], title: str = "",
                size: tuple[int, int] = (640, 360)) -> Path:
    """Line plot of named (x, y) series as a PNG, with axes, ticks and a legend (Pillow only)."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    left, right, top, bottom = 60, 20, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    # Pillow's default font at its default 10 px gives a space 2 px, too narrow to read between words
    draw.font = ImageFont.load_default(size=PLOT_FONT_SIZE)
    points = [(x, y) for values in series.values() for x, y in values if np.isfinite(y)]
    if not points:
        draw.text((left, top), "no data", fill="black")
        return save_png(path, np.asarray(image))
    xs, ys = zip(*points)
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(5):
        y = y0 + (y1 - y0) * k / 4
        draw.text((4, at(x0, y)[1] - 7), f"{y:.3g}", fill="black")
        x = x0 + (x1 - x0) * k / 4
        draw.text((at(x, y0)[0] - 10, height - bottom + 6), f"{x:.0f}" if x1 - x0 > 8 else f"{x:.3g}", fill="black")
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]
    for i, (name, values) in enumerate(series.items()):
        line = [at(x, y) for x, y in values if np.isfinite(y)]
        color = palette[i % len(palette)]
        if len(line) > 1:  # each line narrower than the one before, so that curves which agree all show
            draw.line(line, fill=color, width=2 + (len(series) - 1 - i))
        elif line:
            draw.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=color)
        draw.text((left + 8, top + 4 + 16 * i), name, fill=color)
    draw.text((left, 6), title, fill="black")
    return save_png(path, np.asarray(image))
