"""Media for people to look at: the text of a plot can be read."""

import numpy as np
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
