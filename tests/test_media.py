"""Media for people to look at: the text of a plot can be read, a video is written or says why not."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tokengs.media import plot_curves


def test_plot_title_shows_the_spaces_between_its_words(tmp_path):
    title = "tokengs demo: PSNR during training"
    path = plot_curves(tmp_path / "curve.png", {"train PSNR (dB)": [(1, 10.0), (2, 12.0)]}, title=title)
    above_the_frame = np.asarray(Image.open(path).convert("L"))[:28, 50:]  # the frame starts 30 px down, 60 px in
    inked = np.flatnonzero((above_the_frame < 160).any(axis=0))
    gaps = np.diff(inked) - 1
    # letters of a word stand at most 2 px apart; a space must show as a wider gap
    assert (gaps >= 4).sum() == title.count(" "), f"blank gaps between inked columns: {gaps[gaps > 0].tolist()}"


def test_comparison_grid_puts_each_view_beside_its_truth_enlarged_to_be_seen():
    from tokengs.media import comparison_grid, to_uint8

    prediction, truth = torch.rand(3, 3, 48, 80), torch.rand(3, 3, 48, 80)
    canvas = comparison_grid([prediction, truth], min_height=150)  # 48 px -> x4 = 192 px, the first whole factor
    assert canvas.shape == (3 * 192 + 2 * 4, 2 * 320 + 4, 3)
    row, column = 2, 1  # the third view's truth
    tile = canvas[row * 196:row * 196 + 192, column * 324:column * 324 + 320]
    np.testing.assert_array_equal(tile[::4, ::4], to_uint8(truth[2]))  # nearest-pixel enlargement
    np.testing.assert_array_equal(tile[3::4, 3::4], to_uint8(truth[2]))
    assert (canvas[192:196] == 255).all()  # the white gap between rows


def test_video_without_ffmpeg_falls_back_to_opencv_and_says_when_no_encoder_opens(tmp_path, monkeypatch):
    import cv2

    from tokengs.media import read_video, save_video

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails: OpenCV's mp4v
    frames = np.zeros((5, 33, 48, 3), np.uint8)
    frames[:, :, :24] = 200
    video = read_video(save_video(tmp_path / "ok.mp4", frames))
    assert video.shape == (5, 32, 48, 3)  # cut to even sizes
    assert abs(float(video[:, :, :20].mean()) - 200) < 5 and float(video[:, :, 28:].mean()) < 5

    monkeypatch.setattr(cv2, "VideoWriter_fourcc", lambda *code: cv2.VideoWriter.fourcc(*"ZZZZ"))  # a codec no build has
    with pytest.raises(RuntimeError, match="bad.mp4: no MP4 encoder here"):
        save_video(tmp_path / "bad.mp4", frames)
