"""Upright faces: a photo turned by quarter turns is analysed as if it were upright."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.pipeline.faces import FacePipeline
from server.pipeline.upright import turn, turns_to_upright, unturn_box, unturn_points
from tests.conftest import lfw_image


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_turned_pixels_map_back_to_where_they_came_from(k: int) -> None:
    image = np.arange(5 * 7).reshape(5, 7, 1)
    turned = turn(image, k)[..., 0]
    height, width = turned.shape
    ys, xs = np.mgrid[0:height, 0:width]
    back = unturn_points(np.stack([xs, ys], axis=-1), k, width, height).astype(int)
    assert (image[back[..., 1], back[..., 0], 0] == turned).all()
    assert (unturn_box(np.array([0, 0, width, height]), k, width, height)
            == [0, 0, 7, 5]).all()


def test_the_turn_that_makes_a_face_upright() -> None:
    # Where the face's downward direction (eyes -> mouth) points in the image.
    assert [turns_to_upright(np.array(d)) for d in ([0, 1], [1, 0], [0, -1], [-1, 0])] \
        == [0, 3, 2, 1]
    assert turns_to_upright(np.array([0.5, 1.0])) == 0  # tilted, not sideways


@pytest.mark.parametrize("model_set", ["sface", "dlib"])
@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_a_turned_photo_gives_the_upright_photos_embedding_and_face(
        request: pytest.FixtureRequest, model_set: str, lfw_dir: Path, degrees: int) -> None:
    """BlazeFace's keypoints show a sideways face; YuNet's never do (its faces are
    told by their score): both sets turn the photo back."""
    from server.pipeline.faces import FacePolicy
    from server.pipeline.image import ImageLimits
    from server.pipeline.loader import load_models

    model_dir: Path = request.getfixturevalue(f"{model_set}_model_dir")
    pipeline: FacePipeline = load_models(model_dir, "cpu", 0, ImageLimits(),
                                         FacePolicy()).pipeline
    data = lfw_image(lfw_dir, "Abel_Pacheco", 1)
    upright = pipeline.analyse(data, "selfie", False)
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).rotate(degrees, expand=True).save(buf, "PNG")  # lossless
    turned = pipeline.analyse(buf.getvalue(), "selfie", False)
    assert upright.turns == 0 and turned.turns == (4 - degrees // 90) % 4
    np.testing.assert_allclose(turned.embedding, upright.embedding, atol=1e-6)
    # Reported in the uploaded (turned) photo's pixels: the upright box, turned.
    k = degrees // 90
    expected = unturn_box(upright.face.box, (4 - k) % 4, 250, 250)
    np.testing.assert_allclose(turned.face.box, expected, atol=1e-6)
