"""Building blocks of the self-contained HTML pages (run report, drift report): style, escaping, tables, PNGs."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

STYLE = """body{font:15px/1.45 system-ui,sans-serif;color:#1b1b1b;max-width:60rem;margin:0 auto;padding:1rem}
h1{color:#0b5d1e}table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;
text-align:left}th{background:#f1f1f1}img{max-width:100%;height:auto}code{font-size:.9em}section{margin:1.5rem 0}
.alert{color:#a40000;font-weight:600}"""


def escape(value: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(value))


def table(rows: list[list[Any]], head: list[str]) -> str:
    """An HTML table with a header row; every cell escaped."""
    out = "<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"
    for row in rows:
        out += "<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>"
    return out + "</table>"


def png_img(data: bytes, alt: str) -> str:
    """An <img> holding PNG bytes as a data: URI (no file beside the page, no network)."""
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def figure_png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
