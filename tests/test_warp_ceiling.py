"""scripts/warp_ceiling.py: the geometry-aware predictions it scores the demo's baseline against."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import warp_ceiling  # noqa: E402

from tokengs.data.synthetic import evaluation_views, generate  # noqa: E402


def test_warps_reproduce_context_views_and_true_depth_beats_the_mean(tmp_path):
    (scene,) = generate("dl3dv_eval", tmp_path, 1, seed=3, frames=6, height=48, width=80)
    images = warp_ceiling.scene_images(scene)
    last = len(images) - 1
    context = {c: (images[c], scene.c2ws[c]) for c in (0, last)}
    depths = {c: scene.depths[c] for c in (0, last)}
    mean = images[[0, last]].mean(axis=(0, 1, 2))
    # a context frame warped onto itself with its true depth is that image, pixel for pixel
    for c in (0, last):
        for occlusion in (None, depths):
            warped = warp_ceiling.warp(scene.depths[c], scene.c2ws[c], scene.intrinsics[c], context, mean, [c, 0],
                                       occlusion)
            np.testing.assert_array_equal(warped, images[c])
    # between them, the true geometry explains the view far better than its mean colour
    scores = warp_ceiling.room_scores(scene, (0, last), range(last + 1))
    assert scores["true_depth_occlusion"] > scores["mean_colour"] + 3.0, scores
    assert np.isfinite(list(scores.values())).all()


def test_benchmark_protocol_puts_every_target_between_nearby_context_views():
    context, targets = evaluation_views(48, 4, 12)
    assert context == [17, 21, 25, 29] and targets == [18, 19, 20, 22, 23, 24, 26, 27, 28]
    assert evaluation_views(24, 2) == ([0, 23], list(range(24)))  # the whole clip, every frame a target
    with pytest.raises(ValueError, match="eval_span 2: 4 context views need a span of 3 to 47"):
        evaluation_views(48, 4, 2)
