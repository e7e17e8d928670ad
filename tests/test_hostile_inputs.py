"""Hostile inputs (issue 12, findings 5-8): any decoder failure is one reject, empty Spark partitions, names that
are not UTF-8, symlink loops, dangling links and FIFOs; the run always finishes with every input accounted for."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import fruitpipe
from conftest import SAMPLE, copy_classes, sample_classes
from fruitpipe import images
from fruitpipe.pipeline.listing import list_images
from fruitpipe.storage import StorageOptions

DECODE_REASONS = {"corrupt", "not_an_image", "truncated", "too_large", "empty"}


def _dds(width: int = 64, height: int = 64) -> bytes:
    """A small DDS header with a FourCC Pillow does not implement (it raises NotImplementedError, not OSError)."""
    header = bytearray(128)
    header[:4] = b"DDS "
    struct.pack_into("<7I", header, 4, 124, 0x1007, height, width, width * 4, 0, 1)
    struct.pack_into("<2I4s", header, 76, 32, 0x4, b"ZZZZ")
    return bytes(header) + bytes(3000)


def _seeds() -> dict[str, bytes]:
    photo = Image.open(sorted((SAMPLE / "Training" / sample_classes(1)[0]).iterdir())[0]).convert("RGB")
    out = {}
    for fmt in ("JPEG", "PNG", "TIFF", "GIF", "WEBP"):
        buf = io.BytesIO()
        photo.save(buf, format=fmt)
        out[fmt] = buf.getvalue()
    out["DDS"] = _dds()
    return out


def test_decoder_fuzz_every_mutation_is_an_image_or_a_reason() -> None:
    """A few hundred seeded mutations (bit flips, overwritten runs, cuts, header splices) of six formats: decoding
    returns an RGB array or raises Rejected with a known reason, never anything else."""
    rng = np.random.default_rng(12)
    outcomes: dict[str, int] = {}
    for fmt, seed in _seeds().items():
        for i in range(60):
            data = bytearray(seed)
            kind = i % 4
            if kind == 0:
                for pos in rng.integers(0, len(data), size=int(rng.integers(1, 20))):
                    data[pos] ^= 1 << int(rng.integers(0, 8))
            elif kind == 1:
                start = int(rng.integers(0, len(data)))
                n = len(data[start:start + 64])
                data[start:start + 64] = rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
            elif kind == 2:
                data = data[: int(rng.integers(1, len(data)))]
            else:
                head = int(rng.integers(8, 64))
                data[head:head + 16] = b"\xff" * 16  # sizes and offsets in the header become huge
            try:
                rgb = images.decode_rgb(bytes(data), max_pixels=50_000_000)
            except images.Rejected as rj:
                assert rj.reason in DECODE_REASONS and rj.detail, (fmt, i, rj)
                outcomes[rj.reason] = outcomes.get(rj.reason, 0) + 1
            else:
                assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
                outcomes["decoded"] = outcomes.get("decoded", 0) + 1
    assert sum(outcomes.values()) == 360 and len(outcomes) >= 3, outcomes


def test_formats_outside_the_allowlist_and_a_decoder_bug_are_rejects_in_a_run(spark, tmp_path: Path,
                                                                            monkeypatch) -> None:
    """A DDS and an EPS named .jpg are not_an_image in `run` without their plug-ins reading a byte (Ghostscript
    never runs); a plug-in of an allowed format that raises NotImplementedError on its header is one reject too."""
    from PIL import EpsImagePlugin, PngImagePlugin

    from test_serve_limits import EPS

    data = copy_classes(tmp_path / "in", sample_classes(1), per_split=3)
    folder = data / "Training" / sample_classes(1)[0]
    (folder / "texture.jpg").write_bytes(_dds())
    (folder / "poster.jpg").write_bytes(EPS)
    ran: list[bytes] = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append(b"gs"))
    for hostile in (_dds(), EPS):
        with pytest.raises(images.Rejected) as info:
            images.decode_rgb(hostile, 10**8)
        assert info.value.reason == "not_an_image" and "JPEG, PNG" in info.value.detail
    result = fruitpipe.run(fruitpipe.Config(input=str(data), output=str(tmp_path / "out"), k=2, quiet=True))
    rej = pq.read_table(tmp_path / "out" / "rejects").to_pylist()
    assert sorted((Path(r["uri"]).name, r["reason"]) for r in rej) == [("poster.jpg", "not_an_image"),
                                                                       ("texture.jpg", "not_an_image")]
    assert result.counts["accounted"] and result.counts["embedded"] == 6 and ran == []

    def not_implemented(self) -> None:
        raise NotImplementedError("an unsupported PNG variant")

    png = io.BytesIO()
    Image.new("RGB", (40, 40)).save(png, "PNG")
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "_open", not_implemented)
    with pytest.raises(images.Rejected) as info:
        images.decode_rgb(png.getvalue(), 10**8)
    assert info.value.reason == "not_an_image" and "NotImplementedError" in info.value.detail


def test_any_exception_from_preprocessing_is_a_reject_not_a_failed_task(tmp_path: Path, monkeypatch) -> None:
    from fruitpipe.pipeline import embed

    monkeypatch.setattr(images, "resize_rgb", lambda rgb, size: (_ for _ in ()).throw(OverflowError("fuzzed TIFF")))
    jpeg = sorted((SAMPLE / "Training" / sample_classes(1)[0]).iterdir())[0].read_bytes()
    cid, got = embed._prepare(jpeg, embed.EmbedSettings("x", 224, "input", "features", 1280, 8, 10**8,
                                                        str(tmp_path), StorageOptions()))
    assert isinstance(got, images.Rejected) and got.reason == "corrupt" and "OverflowError" in got.detail and cid


@pytest.mark.parametrize("n_photos, partition_size", [(2, 512), (1, 512), (3, 1), (5, 2), (7, 2)])
def test_empty_spark_partitions(spark, tmp_path: Path, n_photos: int, partition_size: int) -> None:
    """More tasks than photos leaves partitions empty: each task handles one (exactly 2 photos once crashed)."""
    data = copy_classes(tmp_path / "in", sample_classes(1), splits=("Training",), per_split=n_photos)
    result = fruitpipe.embed(fruitpipe.Config(input=str(data), output=str(tmp_path / "out"), quiet=True,
                                              partition_size=partition_size))
    assert result.counts["embedded"] == n_photos and result.counts["accounted"]


def test_names_that_are_not_utf8_are_listed_and_rejected_not_fatal(spark, tmp_path: Path) -> None:
    data = copy_classes(tmp_path / "in", sample_classes(1), per_split=3)
    folder = data / "Training" / sample_classes(1)[0]
    raw = os.fsencode(folder) + b"/caf\xe9-latin1.jpg"
    with open(raw, "wb") as fh:
        fh.write((folder / os.listdir(folder)[0]).read_bytes())
    result = fruitpipe.run(fruitpipe.Config(input=str(data), output=str(tmp_path / "out"), k=2, quiet=True))
    assert result.counts["listed"] == 7 and result.counts["accounted"]
    rej = pq.read_table(tmp_path / "out" / "rejects").to_pylist()
    assert len(rej) == 1 and rej[0]["reason"] == "bad_name" and rej[0]["uri"].endswith("caf\\xe9-latin1.jpg")
    again = fruitpipe.run(fruitpipe.Config(input=str(data), output=str(tmp_path / "out"), k=2, quiet=True))
    assert again.counts["embedded_this_run"] == again.counts["rejected_this_run"] == 0  # done once, not redone


def test_symlink_loops_end_and_real_folders_keep_their_labels(spark, tmp_path: Path) -> None:
    apple, kiwi = sample_classes(2)
    data = copy_classes(tmp_path / "in", [apple, kiwi], splits=("Training",), per_split=10)
    training = data / "Training"
    os.symlink("..", training / apple / "loop")  # each class folder links to its parent
    os.symlink("..", training / kiwi / "loop")
    os.symlink(training / kiwi, training / apple / "aa-kiwi")  # sorts before Kiwi's own folder
    os.symlink(training / "nowhere", training / apple / "dangling.jpg")
    os.mkfifo(training / kiwi / "pipe.jpg")
    listing = list_images(str(data))
    assert listing.count == 20
    labels = {Path(r["uri"]).parent.name: r["label"] for r in listing.manifest.to_pylist()}
    assert labels == {apple: apple, kiwi: kiwi}  # Kiwi photos are never labelled Apple through the link
    assert listing.skipped_by_reason() == {"dangling_symlink": 1, "not_a_regular_file": 1, "symlink_repeat": 3}
    result = fruitpipe.embed(fruitpipe.Config(input=str(data), output=str(tmp_path / "out"), quiet=True))
    assert result.counts["ignored"] == listing.skipped_by_reason() and result.counts["embedded"] == 20
    assert json.loads((tmp_path / "out" / "run.json").read_text())["counts"]["ignored"]["symlink_repeat"] == 3


def test_a_linked_folder_outside_the_input_is_listed_once(tmp_path: Path) -> None:
    photos = copy_classes(tmp_path / "elsewhere", sample_classes(1), splits=("Training",), per_split=4)
    data = tmp_path / "in" / "Training"
    data.mkdir(parents=True)
    os.symlink(photos / "Training" / sample_classes(1)[0], data / "Linked class")
    os.symlink(photos / "Training" / sample_classes(1)[0], data / "Same again")
    listing = list_images(str(tmp_path / "in"))
    assert listing.count == 4 and {r["label"] for r in listing.manifest.to_pylist()} == {"Linked class"}
    assert listing.skipped_by_reason() == {"symlink_repeat": 1}
