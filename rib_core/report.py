"""A self-contained HTML report (no server, no external files): metrics and image rows."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}" if isinstance(v, float) else html.escape(str(v))


def write_html_report(path: str | Path, title: str, metrics: Sequence[dict[str, Any]],
                      columns: Sequence[str], rows: Sequence[dict[str, Any]], notes: Sequence[str] = (),
                      warnings: Sequence[str] = ()) -> Path:
    """``metrics``: dicts with ``method``, ``miou``, ``precision``, ``recall``, ``f1`` (fractions) and
    ``detail``; ``rows``: dicts with ``id``, ``labels`` and one PNG (bytes) per name in ``columns``;
    ``warnings`` are shown above the metrics, where they cannot be missed."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("method", "mIoU", "precision", "recall", "F1", "detail"))
    keys = ("method", "miou", "precision", "recall", "f1", "detail")
    body = "".join("<tr>" + "".join(f"<td>{_fmt(m.get(k))}</td>" for k in keys) + "</tr>" for m in metrics)
    img_head = "<th>image</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    img_rows = "".join(
        f"<tr><td class='id'>{html.escape(r['id'])}<br><small>{html.escape(', '.join(r['labels']))}</small></td>"
        + "".join(f"<td><img alt='{html.escape(c)} of {html.escape(r['id'])}' src='{data_uri(r[c])}'></td>"
                  for c in columns) + "</tr>" for r in rows)
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    warning_html = "".join(f"<p class='warning'>Warning: {html.escape(w)}</p>" for w in warnings)
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: center; }}
th {{ background: #f0f0f0; }}
td.id {{ text-align: left; font-family: monospace; }}
img {{ width: 128px; height: 128px; image-rendering: pixelated; }}
.warning {{ background: #fff3cd; border: 1px solid #e0a800; padding: 8px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{warning_html}
<h2>Metrics (%)</h2>
<table id="metrics"><tr>{head}</tr>{body}</table>
<ul>{note_html}</ul>
<h2>Images</h2>
<table id="images"><tr>{img_head}</tr>{img_rows}</table>
</body></html>
"""
    path = Path(path)
    path.write_text(doc)
    return path
