"""Listing: Fruits-360 and flat layouts, hidden and stray files, type by content not extension."""

from __future__ import annotations

from pathlib import Path

import pytest

from fruitpipe.errors import ConfigError
from fruitpipe.pipeline.listing import list_images, parse_layout


@pytest.mark.parametrize(
    "parts, expected",
    [
        (["Training", "Apple Red 1", "r_1_100.jpg"], ("Apple Red 1", "Training")),
        (["Test", "Banana 1", "0_100.jpg"], ("Banana 1", "Test")),
        (["test", "Kiwi 1", "x.png"], ("Kiwi 1", "Test")),
        (["Kiwi 1", "x.png"], ("Kiwi 1", None)),
        (["Kiwi 1", "more", "x.png"], ("Kiwi 1", None)),
        (["README.md"], None),
        (["Training", "stray.jpg"], None),
        (["Training", "Kiwi 1", ".DS_Store"], None),
        ([".git", "Kiwi", "config"], None),
    ],
)
def test_parse_layout(parts: list[str], expected: tuple[str, str | None] | None) -> None:
    assert parse_layout(parts) == expected


def test_list_fruits360_layout(tmp_path: Path) -> None:
    for rel in ["Training/Kiwi 1/a.jpg", "Training/Kiwi 1/b.PNG", "Test/Kiwi 1/c", "Test/Fig 1/notes.txt",
                "Training/Kiwi 1/._a.jpg", "LICENSE"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    listing = list_images(str(tmp_path))
    rows = listing.manifest.to_pylist()
    assert [(Path(r["uri"]).name, r["label"], r["split"]) for r in rows] == [
        ("notes.txt", "Fig 1", "Test"), ("c", "Kiwi 1", "Test"),  # extension decides nothing
        ("a.jpg", "Kiwi 1", "Training"), ("b.PNG", "Kiwi 1", "Training"),
    ]
    assert all(Path(r["uri"]).is_absolute() and r["size"] == 1 for r in rows)
    assert sorted(Path(u).name for u in listing.ignored) == ["._a.jpg", "LICENSE"]


def test_list_flat_layout(tmp_path: Path) -> None:
    for rel in ["Apple/1.jpg", "Apple/2.jpg", "Pear/1.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    rows = list_images(str(tmp_path)).manifest.to_pylist()
    assert [(r["label"], r["split"]) for r in rows] == [("Apple", None), ("Apple", None), ("Pear", None)]


def test_missing_input_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a folder"):
        list_images(str(tmp_path / "nope"))
