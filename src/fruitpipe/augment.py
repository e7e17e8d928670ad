"""Studio photo -> phone-like photo: a Fruits-360 fruit cut from its white background and pasted, alone or as a
pile, on a varied background, with the colour, light, blur, noise, JPEG and framing of a phone photo (pure,
deterministic by seed, content id and variant; Pillow and numpy only)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

#: Size of the made photo (square: the pipeline resizes it to the model's input, 224 for every backbone).
SIZE = 256
#: A pixel is background when its darkest channel is above this (Fruits-360's white is 240-255) ...
WHITE = 228
#: ... and its channels differ by less than this (a pale yellow fruit is not background).
GREY_SPREAD = 18
#: Shares of the variants that are a frame-filling bin of the fruit and a loose pile of it; the rest show one
#: fruit. Photos taken in shops are mostly of bins and piles.
DENSE = 0.35
PILE = 0.3


def variant_rng(seed: int, content_id: str, variant: int) -> np.random.Generator:
    """The random generator of one variant: the same photo, seed and variant give the same image everywhere."""
    return np.random.default_rng([seed, int(content_id[:15], 16), variant])


def fruit_mask(rgb: np.ndarray) -> np.ndarray:
    """Alpha (0..255, uint8) of the fruit: not near-white, holes filled by a closing, edges feathered."""
    lo, hi = rgb.min(axis=2).astype(np.int16), rgb.max(axis=2).astype(np.int16)
    fruit = ~((lo > WHITE) & (hi - lo < GREY_SPREAD))
    img = Image.fromarray((fruit * 255).astype(np.uint8))
    k = max(3, (min(rgb.shape[:2]) // 25) | 1)
    img = img.filter(ImageFilter.MaxFilter(k)).filter(ImageFilter.MinFilter(k))  # close small gaps
    img = img.filter(ImageFilter.MinFilter(3)).filter(ImageFilter.MaxFilter(3))  # drop specks
    img = img.filter(ImageFilter.MinFilter(k))  # inside the edge: no white fringe once feathered
    alpha = np.array(img, dtype=np.uint8)
    edge = max(2, k // 2)  # where the photo's frame cuts the fruit: a soft edge, not a line of the studio's white
    alpha[:edge], alpha[-edge:], alpha[:, :edge], alpha[:, -edge:] = 0, 0, 0, 0
    return np.asarray(Image.fromarray(alpha).filter(ImageFilter.GaussianBlur(1.2)), dtype=np.uint8)


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    return a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]


def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    """Wood, crate slats or shelf edges: stripes of two related tones."""
    base = rng.integers(40, 220, 3).astype(np.float64)
    other = np.clip(base * rng.uniform(0.5, 0.9), 0, 255)
    yy, xx = np.mgrid[0:size, 0:size]
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(8, 60)
    phase = (np.cos(angle) * xx + np.sin(angle) * yy) / period + 0.3 * np.sin(yy / rng.uniform(5, 30))
    t = (np.sin(2 * np.pi * phase) + 1) / 2
    return base[None, None, :] * (1 - t[..., None]) + other[None, None, :] * t[..., None]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = rng.choice(["gradient", "stripes", "flat"], p=[0.4, 0.35, 0.25])
    bg = _gradient(rng, size) if kind == "gradient" else _stripes(rng, size) if kind == "stripes" else \
        np.broadcast_to(rng.integers(0, 256, 3), (size, size, 3)).astype(np.float64)
    bg = bg + rng.normal(0, rng.uniform(2, 18), bg.shape)
    return np.clip(bg, 0, 255).astype(np.uint8)


def _paste(canvas: Image.Image, fruit: Image.Image, rng: np.random.Generator, scale: float) -> None:
    side = max(8, int(canvas.width * scale))
    piece = fruit.resize((side, side), Image.Resampling.BILINEAR).rotate(float(rng.uniform(0, 360)),
                                                                          Image.Resampling.BILINEAR, expand=True)
    x = int(rng.uniform(-0.25, 1.0) * (canvas.width - piece.width * 0.5))
    y = int(rng.uniform(-0.25, 1.0) * (canvas.height - piece.height * 0.5))
    canvas.paste(piece, (x, y), piece)


def _photometric(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    x: np.ndarray = np.asarray(img, dtype=np.float32)
    x = x * rng.uniform(0.85, 1.15, 3)[None, None, :]  # white balance
    x = x * rng.uniform(0.6, 1.3)  # exposure
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.7, 1.3) + mean  # contrast
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * rng.uniform(0.6, 1.4)  # saturation
    x = x + rng.normal(0, rng.uniform(0, 8), x.shape)  # sensor noise
    out = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.8))))
    return out


def phone_like(rgb: np.ndarray, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """One phone-like variant (size x size x 3 uint8) of a studio photo on white."""
    alpha = fruit_mask(rgb)
    if alpha.mean() < 8:  # nothing but white: the photo itself, framed and jittered
        alpha = np.full(alpha.shape, 255, np.uint8)
    fruit = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    canvas = Image.fromarray(_background(rng, size)).convert("RGBA")
    kind = rng.random()
    if kind < DENSE:  # a shop's bin: the frame filled with the fruit, the background barely showing
        for _ in range(int(rng.integers(14, 30))):
            _paste(canvas, fruit, rng, float(rng.uniform(0.22, 0.4)))
    elif kind < DENSE + PILE:  # a pile: more of the same fruit around and behind
        for _ in range(int(rng.integers(3, 9))):
            _paste(canvas, fruit, rng, float(rng.uniform(0.25, 0.5)))
    _paste(canvas, fruit, rng, float(rng.uniform(0.4, 0.95)))
    img = canvas.convert("RGB")
    if rng.random() < 0.5:  # framing: part of the scene, as a hand-held photo cuts it
        side = int(size * rng.uniform(0.6, 1.0))
        x0, y0 = (int(rng.integers(0, size - side + 1)) for _ in range(2))
        img = img.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.Resampling.BILINEAR)
    img = _photometric(img, rng)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(35, 92)))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.uint8)
