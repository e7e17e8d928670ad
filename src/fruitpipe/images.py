"""Image bytes -> uint8 RGB -> model input, with a typed rejection reason for every bad input (pure, no I/O)."""

from __future__ import annotations

import hashlib
import io
import logging
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's DEBUG logging prints every EXIF tag it parses, GPS position included: users' locations must never reach
# a log, whatever level an application sets (--verbose included), so its loggers stop at INFO here.
logging.getLogger("PIL").setLevel(max(logging.getLogger("PIL").level, logging.INFO))

#: Reasons recorded in rejects/; the detail column says more.
REASONS = {
    "empty": "the file has zero bytes",
    "not_an_image": "the content is not an image in an accepted format (JPEG, PNG, WebP, AVIF, GIF, BMP, TIFF): "
                    "text, random bytes, PostScript, JPEG 2000, ...",
    "too_large": "the header claims more pixels than --max-pixels (decompression bomb guard)",
    "truncated": "the image data ends early",
    "corrupt": "the image data is damaged and cannot be decoded",
    "unreadable": "the file or object could not be read (missing, permission denied)",
    "duplicate": "same bytes as another input, which was embedded instead",
    "bad_name": "the file name is not valid UTF-8 (stored with \\x escapes): rename the file",
    "empty_folder": "the path has an empty folder name (an S3 key with '//'), so it has no class: rename it",
    "too_small": "the image is smaller than MIN_SIDE pixels on a side: nothing in it can be recognised",
    "not_finite": "the model gave NaN or infinite features for it (an fp16 or badly quantised export overflowing)",
}
#: The formats `run`, `serve` and `evaluate` decode: what phones, cameras and scanners produce (JPEG includes
#: MPO, the multi-picture JPEG of some cameras). Pillow is asked to identify only these, so no other plug-in ever
#: parses a byte: an EPS upload once ran Ghostscript on attacker PostScript through a temp file on disk, and a 4 KB
#: JPEG 2000 claiming 7999x7999 cost 1.2 GiB. HEIF/HEIC is absent because Pillow reads it only through the
#: pillow-heif plug-in, which fruitpipe does not install; phones' browsers upload JPEG.
FORMATS = ("JPEG", "PNG", "WEBP", "AVIF", "GIF", "BMP", "TIFF")

#: The smallest side `run` and `serve` accept (a 1x1 image once got "Apple Red 1, probability 1.0"): below 32
#: pixels the model sees a 7x blow-up of a few pixels. Unit-level decoding (decode_rgb's default) has no minimum.
MIN_SIDE = 32

#: The largest decoded image every command accepts by default (--max-pixels): a decompression-bomb guard, 64 Mpx
#: (a 7999 x 7999 photo; phones take 12-50 Mpx). serve's decode budget is sized from it (serve/app.py).
DEFAULT_MAX_PIXELS = 64_000_000

#: Modes Pillow's reduce() takes; 16/32-bit ones are subsampled in _to_rgb instead, P and 1 after conversion.
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "RGBa", "La", "CMYK", "I", "F", "YCbCr")


def _openable() -> tuple[str, ...]:
    """FORMATS that this Pillow build registers (AVIF and WebP need their libraries in the wheel)."""
    Image.init()
    return tuple(f for f in FORMATS if f in Image.OPEN)


_OPENABLE = _openable()
#: Background used when flattening transparency: Fruits-360 photos are shot on white.
_BACKGROUND = (255, 255, 255)


class Rejected(Exception):
    """An input that cannot be embedded; `reason` is a key of REASONS, `detail` is for humans."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def content_id(data: bytes) -> str:
    """Identifier of an input: the sha256 of its bytes, hex."""
    return hashlib.sha256(data).hexdigest()


def _to_rgb(img: Image.Image, step: int = 1) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: scale 16/32-bit, flatten alpha on white, CMYK via Pillow. `step` > 1
    keeps every step-th row and column of a 16/32-bit image before converting (no full-size float copy)."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        full = np.asarray(img)
        # 16-bit images use the full 0..65535 range; 8-bit data stored in mode I stays as is. float32 on the
        # subsampled array only: a 64 Mpx 16-bit PNG once cost 1.7 GB here in float64 at full size.
        arr = full[::step, ::step].astype(np.float32)
        del full
        scale = np.float32(255.0 / 65535.0) if arr.max(initial=0) > 255 else np.float32(1.0)
        arr8 = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr8)  # uint8 2-D -> mode L
        mode = "L"
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, _BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if mode != "RGB":
        img = img.convert("RGB")
    return img


def decode_rgb(data: bytes, max_pixels: int, size_hint: int | None = None, min_side: int = 0,
               center: bool = False) -> np.ndarray:
    """Decode image bytes to a HxWx3 uint8 RGB array, EXIF orientation applied; raise Rejected otherwise.

    `size_hint` bounds memory for images far larger than the model input: JPEG decodes at 1/2..1/8 in the decoder
    (Pillow draft), other formats are reduced by an integer factor right after decoding, before any conversion;
    neither goes below twice the hint. `min_side`: smaller images are rejected as too_small. `center`: keep only
    the central square of the shorter side (what the center crop feeds the model), cut right after decoding, so a
    1,999,999 x 32 PNG is converted as 32 x 32 (it cost 1.1 GB converted whole); the pixels are those of
    square_views(..., "center") of the whole image, to the bit.
    """
    if not data:
        raise Rejected("empty", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(data), formats=_OPENABLE)
            except UnidentifiedImageError:  # before OSError, of which it is a subclass
                raise Rejected("not_an_image", f"not one of the accepted formats ({', '.join(_OPENABLE)}; "
                               f"{len(data)} bytes)") from None
            except (Image.DecompressionBombError, Image.DecompressionBombWarning, OSError, SyntaxError, ValueError,
                    EOFError):
                raise  # classified below: too_large, truncated or corrupt
            except Exception as exc:  # any plug-in's failure to parse a header (DDS: NotImplementedError, ...)
                raise Rejected("not_an_image", f"{type(exc).__name__}: {exc}"[:300]) from None
            width, height = img.size
            if width * height > max_pixels:
                raise Rejected("too_large", f"{width}x{height} = {width * height} pixels > {max_pixels}")
            if min(width, height) < min_side:
                raise Rejected("too_small", f"{width}x{height}: under {min_side} pixels on a side")
            if size_hint and img.format == "JPEG":
                img.draft("RGB", (size_hint, size_hint))
            img.load()
            # In place: without an orientation tag, exif_transpose would return a full-size copy. EXIF itself is
            # never kept.
            ImageOps.exif_transpose(img, in_place=True)
            oriented: Image.Image = img
            step = max(1, min(oriented.size) // (2 * size_hint)) if size_hint else 1
            if center and oriented.width != oriented.height:
                oriented = _central_square(oriented, step)
            if step > 1 and oriented.mode in ("P", "PA", "1"):  # no reduce() for palettes: their colours first
                oriented = oriented.convert("RGBA" if "transparency" in oriented.info or oriented.mode == "PA"
                                            else "RGB")
            if step > 1 and oriented.mode in _REDUCIBLE:
                oriented = oriented.reduce(step)  # box-averaged, before the conversion copies
                step = 1
            rgb = _to_rgb(oriented, step)
            arr = np.asarray(rgb, dtype=np.uint8)
            if arr.ndim != 3 or arr.shape[2] != 3 or 0 in arr.shape:
                raise Rejected("corrupt", f"decoded to an unusable array of shape {arr.shape}")
            return arr
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected("too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc) or type(exc).__name__
        reason = "truncated" if "truncat" in msg.lower() or isinstance(exc, EOFError) else "corrupt"
        raise Rejected(reason, msg[:300]) from None
    except Exception as exc:  # a decoder bug on hostile bytes (OverflowError, NotImplementedError, ...) is one reject
        raise Rejected("corrupt", f"{type(exc).__name__}: {exc}"[:300]) from None


#: Peak bytes per pixel of one decode by decode_rgb(size_hint=..., center=True), by the image's mode: Pillow's own
#: storage (4 bytes for RGB), the palette's or 16-bit's conversion, the premultiplied copy reduce() makes of images
#: with alpha. Measured as peak RSS at 64 Mpx (7999 x 7999, and 1,999,999 x 32), rounded up, with a margin
#: (_margin): bench/decode_memory.py, measured/estimate 0.91-0.98 for every accepted format and mode.
PEAK_BYTES_PER_PIXEL = {"1": 5, "L": 1, "P": 5, "PA": 9, "LA": 8, "La": 8, "RGB": 4, "RGBA": 8, "RGBa": 8,
                        "CMYK": 4, "YCbCr": 4, "I": 4, "F": 4, "I;16": 6, "I;16L": 6, "I;16B": 6, "I;16N": 6}
#: Formats whose library decodes into its own buffer before Pillow copies it: libwebp (977 MiB at 64 Mpx, RGB or
#: RGBA), libavif (706 MiB RGBA).
PEAK_BYTES_PER_PIXEL_OF_FORMAT = {"WEBP": 16, "AVIF": 12}


def decode_cost(data: bytes, max_pixels: int, size_hint: int) -> int:
    """Bytes that decoding `data` for the model (decode_rgb with `size_hint`, center crop) may take at its peak,
    estimated from the header alone (Pillow reads no pixels): pixels x PEAK_BYTES_PER_PIXEL, a JPEG at the scale
    its draft decodes. 0 for what decode_rgb refuses before decoding (not an image, over `max_pixels`)."""
    try:
        with Image.open(io.BytesIO(data), formats=_OPENABLE) as img:
            width, height = img.size
            if width * height > max_pixels:
                return 0
            if img.format == "JPEG":
                scale = next(s for s in (8, 4, 2, 1) if min(width // size_hint, height // size_hint) >= s)
                return _margin(8 * -(-width // scale) * -(-height // scale))
            per_pixel = PEAK_BYTES_PER_PIXEL_OF_FORMAT.get(img.format or "") or \
                PEAK_BYTES_PER_PIXEL.get("PA" if img.mode == "P" and "transparency" in img.info else img.mode, 8)
            return _margin(per_pixel * width * height)
    except Exception:  # whatever decode_rgb will refuse at once
        return 0


def _margin(estimate: int) -> int:
    """An estimate with 5 % and 4 MiB of headroom (the measured peaks came within 2 % of the table)."""
    return estimate * 21 // 20 + (4 << 20)


def _central_square(img: Image.Image, step: int) -> Image.Image:
    """The region of `img` that becomes square_views' center view once reduced by `step`: the reduced image's
    central square, in the original's pixels, its start a multiple of `step` so the blocks averaged are the same."""
    w, h = img.size
    side, long_side = min(w, h), max(w, h)
    side_r, long_r = -(-side // step), -(-long_side // step)  # reduce() rounds up
    start = (long_r - side_r) // 2 * step
    end = min(long_side, start + side_r * step)
    return img.crop((start, 0, end, h) if w > h else (0, start, w, end))


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize an RGB array to size x size with bilinear filtering (the filter used for MODELS.md's checks)."""
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    img = Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


#: Pixel scalings a model may expect (--preprocess): tf = pixel / 127.5 - 1 (Keras MobileNetV2, every registered
#: model), torch = (pixel / 255 - ImageNet mean) / std (torchvision), raw = 0..255 as float32.
PREPROCESS = ("tf", "torch", "raw")
LAYOUTS = ("nhwc", "nchw")
#: ImageNet mean and standard deviation on the 0..255 scale (torch scaling), shared with the uint8 model wrapper.
MEAN_255 = np.array([0.485, 0.456, 0.406], np.float32) * np.float32(255.0)
STD_255 = np.array([0.229, 0.224, 0.225], np.float32) * np.float32(255.0)


def preprocess(rgb: np.ndarray, mode: str = "tf") -> np.ndarray:
    """uint8 RGB (..., 3) -> float32 model input: `mode` tf (pixel / 127.5 - 1, the default), torch (ImageNet
    mean and standard deviation) or raw (0..255)."""
    x = rgb.astype(np.float32)
    if mode == "tf":
        return x / np.float32(127.5) - np.float32(1.0)
    if mode == "torch":
        return (x - MEAN_255) / STD_255
    if mode == "raw":
        return x
    raise ValueError(f"unknown preprocessing {mode!r}: one of {', '.join(PREPROCESS)}")


#: How a photo that is not square becomes the model's square input: squash (the whole frame resized, its aspect
#: ratio changed), center (the central square of the shorter side), three (three squares along the longer side,
#: start, centre and end: their probabilities averaged, three inferences). A square photo (every Fruits-360 one)
#: gives the same input in all three.
CROPS = ("squash", "center", "three")
#: What `run`, `serve` and `evaluate` use unless told otherwise. Measured by `fruitpipe evaluate --crop` on the 51
#: photos of real-photos-dev that are not square (a classifier trained on the shared sample, 2026-12-03): top-1
#: squash 0/51, center 2/51, three 1/51; top-5 4, 7 and 9 of 51 (docs/real-photos.md). Too few to rank center
#: and three; center is no worse than either, costs one inference, and is how the backbone was trained and is
#: evaluated on ImageNet (aspect ratio kept).
DEFAULT_CROP = "center"


def square_views(rgb: np.ndarray, size: int, crop: str = DEFAULT_CROP) -> list[np.ndarray]:
    """The size x size views of one RGB array that `crop` (CROPS) feeds the model."""
    if crop not in CROPS:
        raise ValueError(f"unknown crop {crop!r}: one of {', '.join(CROPS)}")
    h, w = rgb.shape[:2]
    if crop == "squash" or h == w:
        return [resize_rgb(rgb, size)]
    side, long_side = min(h, w), max(h, w)
    starts = [(long_side - side) // 2] if crop == "center" else [0, (long_side - side) // 2, long_side - side]
    return [resize_rgb(np.ascontiguousarray(rgb[s:s + side] if h > w else rgb[:, s:s + side]), size)
            for s in starts]


def model_pixels(data: bytes, size: int, max_pixels: int, crop: str = DEFAULT_CROP) -> np.ndarray:
    """Image bytes -> uint8 size x size x 3 RGB, what a uint8-wrapped model takes (models/wrap.py); raises Rejected.
    The batch pipeline's path: the scaling runs inside the model's graph. One view: "three" embeds the centre."""
    crop = "center" if crop == "three" else crop
    views = square_views(decode_rgb(data, max_pixels, size_hint=size, min_side=MIN_SIDE, center=crop == "center"),
                         size, crop)
    return views[0]


def model_views(data: bytes, size: int, max_pixels: int, mode: str = "tf", layout: str = "nhwc",
                crop: str = DEFAULT_CROP) -> np.ndarray:
    """Image bytes -> float32 model inputs of the views `crop` makes (views x size x size x 3, or views x 3 x size
    x size for nchw; one view but for "three"); raises Rejected. Serving's exported classifier and `evaluate`
    average the views' probabilities."""
    rgb = decode_rgb(data, max_pixels, size_hint=size, min_side=MIN_SIDE, center=crop == "center")
    x = preprocess(np.stack(square_views(rgb, size, crop)), mode)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if layout == "nchw" else x


def model_input(data: bytes, size: int, max_pixels: int, mode: str = "tf", layout: str = "nhwc",
                crop: str = DEFAULT_CROP) -> np.ndarray:
    """Image bytes -> float32 model input of one image (size x size x 3, or 3 x size x size for nchw); raises
    Rejected. For float-input graphs: int8 calibration, tests ("three" gives its centre view)."""
    return model_views(data, size, max_pixels, mode, layout, "center" if crop == "three" else crop)[0]
