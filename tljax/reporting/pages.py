"""What the self-contained HTML pages (`tljax.report`, `tljax.sweep`) share: the inline style sheet and figures
as PNG data URIs, so that one file opens in any browser offline."""

from __future__ import annotations

import base64
import html
import io
from typing import Callable

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1150px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { padding: 0.25em 0.8em; border: 1px solid #ddd; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; } pre { background: #f7f7f7; padding: 1em; overflow-x: auto; }
"""


def figure(draw: Callable[[io.BytesIO], None], alt: str) -> str:
    """An <img> holding the PNG that `draw` writes."""
    buffer = io.BytesIO()
    draw(buffer)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
