"""What the answer says about a fruit beyond its folder name: a display name (and, later, facts) per class."""

from __future__ import annotations

import re
from typing import Any


def display_name(label: str) -> str:
    """A readable name from a Fruits-360 folder name: its trailing variant number dropped ("Apple Braeburn 1"
    -> "Apple Braeburn", "Tomato 4" -> "Tomato")."""
    name = re.sub(r"(\s+\d+)+$", "", label.strip())
    return name or label


def describe(label: str) -> dict[str, Any]:
    """Information about a class for the answer: its label and display name; the facts of a curated table
    (variety, scientific name, family, one sentence) are not shipped yet, so they are null, never invented."""
    return {"label": label, "name": display_name(label), "variety": None, "scientific_name": None, "family": None,
            "about": None, "source": "derived from the folder name"}
