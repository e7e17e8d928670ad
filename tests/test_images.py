"""Decoding: every kind of bad input gets its reason; every odd-but-valid image becomes RGB."""

from __future__ import annotations

import io
import zlib
import struct

import numpy as np
import pytest
from PIL import Image

from fruitpipe import images
from conftest import SAMPLE

JPEG = next((SAMPLE / "Training").glob("*/*.jpg")).read_bytes()


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels (a decompression bomb as seen by a decoder)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _broken_huffman(jpeg: bytes) -> bytes:
    """The JPEG with its first Huffman table (DHT segment) overwritten: headers parse, the scan cannot."""
    at = jpeg.find(b"\xff\xc4")
    length = int.from_bytes(jpeg[at + 2 : at + 4], "big")
    return jpeg[: at + 4] + b"\xff" * (length - 2) + jpeg[at + 2 + length :]


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (JPEG[: len(JPEG) // 2], "truncated"),
        (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not_an_image"),
        (b"name,colour\napple,red\n" * 20, "not_an_image"),
        (_bomb_png(100_000, 100_000), "too_large"),
        (_broken_huffman(JPEG), "corrupt"),
    ],
    ids=["empty", "truncated-jpeg", "random-bytes", "text", "bomb", "corrupt-jpeg"],
)
def test_bad_inputs_are_rejected_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(images.Rejected) as info:
        images.model_input(data, 224, max_pixels=64_000_000)
    assert info.value.reason == reason
    assert info.value.detail


def test_real_bomb_rejected_before_decoding() -> None:
    big = Image.new("1", (20_000, 20_000))  # 400 Mpx, ~50 KB as PNG
    data = _png_bytes(big)
    assert len(data) < 2_000_000
    with pytest.raises(images.Rejected) as info:
        images.decode_rgb(data, max_pixels=64_000_000)
    assert info.value.reason == "too_large" and "400000000" in info.value.detail


def _rgb(img: Image.Image, fmt: str, **kw) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return images.decode_rgb(buf.getvalue(), max_pixels=10**8)


def test_grayscale_and_cmyk_jpeg_become_rgb() -> None:
    gray = _rgb(Image.new("L", (40, 30), 77), "JPEG")
    assert gray.shape == (30, 40, 3) and gray.dtype == np.uint8
    assert abs(int(gray[5, 5, 0]) - 77) <= 2 and np.all(gray[..., 0] == gray[..., 2])
    cmyk = _rgb(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG")  # pure red in CMYK
    assert cmyk.shape == (32, 32, 3)
    r, g, b = (int(v) for v in cmyk[16, 16])
    assert r > 200 and g < 60 and b < 60


def test_alpha_and_palette_flatten_on_white() -> None:
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (0, 0, 10, 20))  # opaque blue left half
    out = _rgb(rgba, "PNG")
    assert tuple(out[5, 2]) == (0, 0, 255) and tuple(out[5, 15]) == (255, 255, 255)
    pal = Image.new("P", (10, 10), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    out = _rgb(pal, "PNG", transparency=0)
    assert tuple(out[3, 3]) == (0, 200, 0)


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)  # uint16 -> mode I;16
    out = _rgb(img, "PNG")
    assert out.shape == (1, 3, 3)
    assert list(out[0, :, 0]) == [0, 128, 255]


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (60, 30), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    out = _rgb(img, "JPEG", exif=exif)
    assert out.shape == (60, 30, 3)  # height and width swapped


def test_webp_decodes() -> None:
    out = _rgb(Image.new("RGB", (16, 24), (0, 0, 250)), "WEBP", quality=90)
    assert out.shape == (24, 16, 3) and out[10, 10, 2] > 200


def test_model_input_range_and_shape() -> None:
    x = images.model_input(JPEG, 224, max_pixels=10**8)
    assert x.shape == (224, 224, 3) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0


def test_content_id_is_sha256_of_bytes() -> None:
    import hashlib

    assert images.content_id(JPEG) == hashlib.sha256(JPEG).hexdigest()


def test_vectors_round_trip() -> None:
    from fruitpipe.vectors import to_list_array, to_matrix

    m = np.arange(12, dtype=np.float32).reshape(3, 4)
    arr = to_list_array(m)
    assert arr.type == __import__("pyarrow").list_(__import__("pyarrow").float32())
    assert arr.to_pylist()[1] == [4.0, 5.0, 6.0, 7.0]
    np.testing.assert_array_equal(to_matrix(arr), m)
    assert len(to_list_array(np.zeros((0, 1280), np.float32))) == 0


def test_read_ahead_keeps_order_and_turns_missing_files_into_rejections(tmp_path) -> None:
    from fruitpipe.pipeline.embed import read_ahead

    uris = []
    for i in range(25):
        path = tmp_path / f"{i:02d}.bin"
        path.write_bytes(bytes([i]) * (i + 1))
        uris.append(str(path))
    uris.insert(7, str(tmp_path / "gone.jpg"))
    got = list(read_ahead(uris, window=4))
    assert len(got) == 26
    assert isinstance(got[7], images.Rejected) and got[7].reason == "unreadable"
    assert [g for i, g in enumerate(got) if i != 7] == [bytes([i]) * (i + 1) for i in range(25)]


def test_overlapped_inference_gives_the_same_tables(tmp_path) -> None:
    """Inference overlapped with decoding (the GPU default) keeps every row, its order and its reason."""
    import hashlib
    import threading

    import pyarrow as pa

    from fruitpipe.pipeline.embed import EmbedSettings, embed_rows, prepared
    from fruitpipe.storage import StorageOptions
    from fruitpipe.vectors import to_matrix

    good = sorted((SAMPLE / "Training").glob("*/*.jpg"))[:37]
    bad = {"empty.jpg": b"", "text.jpg": b"not an image", "trunc.jpg": JPEG[: len(JPEG) // 2],
           "bomb.png": _bomb_png(20_000, 20_000)}
    uris = [str(p) for p in good]
    for i, (name, data) in enumerate(bad.items()):
        (tmp_path / name).write_bytes(data)
        uris.insert(5 + 9 * i, str(tmp_path / name))
    uris.insert(3, str(tmp_path / "gone.jpg"))
    rows = pa.table({"uri": uris, "label": ["l"] * len(uris), "split": ["Training"] * len(uris)})
    settings = EmbedSettings(model_sha256="x", input_size=224, input_name="input", output_name="features", dim=3,
                             batch_size=8, max_pixels=64_000_000, staging_uri="", storage=StorageOptions())
    calls: list[tuple[int, str]] = []

    def predict(batch: np.ndarray) -> np.ndarray:  # a cheap stand-in for the model: per-channel means
        calls.append((len(batch), threading.current_thread().name))
        return batch.mean(axis=(1, 2)).astype(np.float32)

    serial = embed_rows(rows, predict, settings)
    overlapped = embed_rows(rows, predict, settings, overlap=True)
    assert serial[0].num_rows == 37 and serial[1].num_rows == 5
    assert serial[0].equals(overlapped[0]) and serial[1].equals(overlapped[1])
    assert serial[0].column("uri").to_pylist() == [str(p) for p in good]
    assert serial[0].column("id").to_pylist()[0] == hashlib.sha256(good[0].read_bytes()).hexdigest()
    assert sorted(serial[1].column("reason").to_pylist()) == ["empty", "not_an_image", "too_large", "truncated",
                                                               "unreadable"]
    assert [n for n, _ in calls] == [8, 8, 8, 8, 5] * 2  # batches are filled the same way
    assert {t for _, t in calls[:5]} == {threading.current_thread().name}
    assert all(t.startswith("fruitpipe-infer") for _, t in calls[5:])  # overlapped: off the decoding thread

    def failing(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("CUDA error")

    with pytest.raises(RuntimeError, match="CUDA error"):  # a failed inference fails the task (Spark retries it)
        embed_rows(rows, failing, settings, overlap=True)

    overflow = {str(good[2]), str(good[20])}  # the model overflows on two photos (an fp16 export, say)

    def overflowing(batch: np.ndarray) -> np.ndarray:
        out = batch.mean(axis=(1, 2)).astype(np.float32)
        for i, x in enumerate(batch):
            if any(np.array_equal(x, y) for y in marked):
                out[i, 1] = np.inf if i % 2 else np.nan
        return out

    marked = [x for cid, x in prepared(sorted(overflow), settings)]
    emb, rej = embed_rows(rows, overflowing, settings)
    assert emb.num_rows == 35 and not set(emb.column("uri").to_pylist()) & overflow
    not_finite = {u: d for u, r, d in zip(rej.column("uri").to_pylist(), rej.column("reason").to_pylist(),
                                          rej.column("detail").to_pylist()) if r == "not_finite"}
    assert not_finite == {u: "1 of 3 features are NaN or infinite" for u in overflow}
    assert np.isfinite(to_matrix(emb.column("features"))).all()


def test_a_huge_sixteen_bit_png_decodes_without_full_size_float_copies() -> None:
    """A 142 KB constant 16-bit PNG of 7999x7999 once made 1.7 GB of float64 arrays: numpy's allocations (which
    tracemalloc sees) now stay near the decoded image's own 128 MB, and the result is the same grey."""
    import tracemalloc

    buf = io.BytesIO()
    Image.fromarray(np.full((7999, 7999), 40000, np.uint16)).save(buf, "PNG")
    tracemalloc.start()
    try:
        x = images.model_pixels(buf.getvalue(), 224, max_pixels=10**8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert x.shape == (224, 224, 3) and abs(int(x[100, 100, 0]) - round(40000 * 255 / 65535)) <= 1
    assert peak < 300 * 2**20, f"{peak / 2**20:.0f} MiB of numpy arrays"


def test_images_under_the_minimum_side_are_too_small() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (images.MIN_SIDE - 1, 400), (0, 200, 0)).save(buf, "PNG")
    with pytest.raises(images.Rejected) as err:
        images.model_input(buf.getvalue(), 224, 10**8)
    assert err.value.reason == "too_small"
    assert images.decode_rgb(buf.getvalue(), 10**8).shape == (400, images.MIN_SIDE - 1, 3)  # no minimum there


@pytest.mark.parametrize("mode, size, fmt", [
    ("RGB", (1000, 300), "PNG"), ("RGB", (3000, 1000), "PNG"), ("RGB", (5001, 1100), "PNG"),
    ("RGB", (1100, 5001), "PNG"), ("RGBA", (3001, 1000), "PNG"), ("I;16", (3000, 1003), "PNG"),
    ("L", (4000, 999), "TIFF"), ("RGB", (3000, 1000), "JPEG"), ("P", (2999, 1201), "GIF"),
])
def test_the_central_square_cut_before_conversion_gives_the_same_pixels(mode: str, size: tuple, fmt: str) -> None:
    """decode_rgb(center=True) cuts the central square right after decoding (a 1,999,999 x 32 PNG cost 1.1 GB
    converted whole): the model sees exactly the pixels of the whole image's center view."""
    rng = np.random.default_rng(sum(size))
    w, h = size
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    elif mode == "P":
        img = Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).convert("P")
    else:
        bands = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        arr = rng.integers(0, 255, (h, w, bands), dtype=np.uint8)
        img = Image.fromarray(arr[..., 0] if bands == 1 else arr, mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    data = buf.getvalue()
    whole = images.square_views(images.decode_rgb(data, 10**9, size_hint=224), 224, "center")[0]
    cut = images.decode_rgb(data, 10**9, size_hint=224, center=True)
    assert cut.shape[0] == cut.shape[1]
    assert np.array_equal(images.square_views(cut, 224, "center")[0], whole)
    assert np.array_equal(images.model_pixels(data, 224, 10**9), whole)
