"""fruitpipe.augment: the fruit is cut from its white background, and each variant is the same image for the
same seed, content id and variant, whatever the machine."""

from __future__ import annotations

import numpy as np

from fruitpipe import augment, images
from conftest import SAMPLE


def _studio() -> np.ndarray:
    """A red disc on Fruits-360's white, with JPEG-like noise on the white."""
    rng = np.random.default_rng(0)
    rgb = np.clip(250 + rng.normal(0, 2, (100, 100, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:100, 0:100]
    disc = (yy - 50) ** 2 + (xx - 50) ** 2 < 30 ** 2
    rgb[disc] = (200, 30, 40)
    return rgb


def test_the_mask_keeps_the_fruit_and_drops_the_white() -> None:
    rgb = _studio()
    alpha = augment.fruit_mask(rgb)
    yy, xx = np.mgrid[0:100, 0:100]
    r2 = (yy - 50) ** 2 + (xx - 50) ** 2
    assert alpha[r2 < 22 ** 2].min() >= 250  # the inside is opaque
    assert alpha[r2 > 34 ** 2].max() == 0  # the white is gone, corners included
    pale = rgb.copy()
    pale[r2 < 30 ** 2] = (245, 235, 150)  # a pale yellow fruit is not background
    assert augment.fruit_mask(pale)[r2 < 22 ** 2].min() >= 250


def test_variants_are_deterministic_and_differ() -> None:
    data = sorted((SAMPLE / "Training" / "Banana 1").iterdir())[0].read_bytes()
    rgb, cid = images.decode_rgb(data, 10**8), images.content_id(data)
    a = augment.phone_like(rgb, augment.variant_rng(7, cid, 0))
    b = augment.phone_like(rgb, augment.variant_rng(7, cid, 0))
    assert a.shape == (augment.SIZE, augment.SIZE, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    others = [augment.phone_like(rgb, augment.variant_rng(s, cid, k)) for s, k in ((7, 1), (8, 0))]
    assert all(np.abs(a.astype(int) - o.astype(int)).mean() > 10 for o in others)
    # the white studio background is replaced: far fewer near-white pixels than in the photo
    white = lambda x: float(np.mean(x.min(axis=2) > augment.WHITE))  # noqa: E731
    assert white(rgb) > 0.3 and all(white(x) < 0.15 for x in (a, *others))
    # a plain-white photo (nothing to cut) still makes a variant
    assert augment.phone_like(np.full((100, 100, 3), 255, np.uint8), augment.variant_rng(7, cid, 0)).shape[2] == 3


def test_where_the_photo_frame_cuts_the_fruit_the_edge_is_soft() -> None:
    """A fruit running off the photo (a banana's tip) ends in a feathered edge, not in a straight line of the
    frame's pixels."""
    rgb = np.full((100, 100, 3), 252, np.uint8)
    rgb[30:70, :60] = (230, 200, 40)  # runs off the left edge
    alpha = augment.fruit_mask(rgb)
    assert alpha[:, 0].max() < 64 and alpha[50, 0] < alpha[50, 2] < alpha[50, 4] <= 255
    assert alpha[50, 10:50].min() >= 250
