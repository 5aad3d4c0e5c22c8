"""A self-contained HTML report (no server, no external files) made from a run's ``report.json``:
what a reader needs to judge the pseudo-masks without opening the JSON.

Sections: the class colours and the heat maps' colour bar (the keys to every picture), the stage
table (mIoU, precision, recall, F1), per-class IoU of every stage, the classifier's per-class AP
and F1, the seed threshold curves as a small plot, the timings, and the pictures of some images
with each one's IoU in its caption. Figures are printed from the report as they are; a figure the
report does not hold prints as "-".
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rib_core.data.classes import IGNORE_INDEX
from rib_core.io.visualize import PALETTE, heatmap, png_bytes


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}" if isinstance(v, float) else html.escape(str(v))


def _table(table_id: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table; fractions print as percentages, text escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table id='{table_id}'><tr>{head}</tr>{body}</table>"


def _rgb(value: int) -> str:
    return "rgb({},{},{})".format(*(int(c) for c in PALETTE[value]))


def legend_html(classes: Sequence[str]) -> str:
    """The label colours of the masks (VOC's palette): background, each class, ignore."""
    entries = [("background", 0), *((name, i + 1) for i, name in enumerate(classes)), ("ignore (255)", IGNORE_INDEX)]
    return "<div id='legend'>" + "".join(
        f"<span class='swatch'><i style='background:{_rgb(v)}'></i>{html.escape(n)}</span>" for n, v in entries
    ) + "</div>"


def colour_bar_html() -> str:
    """The heat maps' ramp (:func:`rib_core.io.visualize.heatmap`) from 0 to 1, labelled."""
    ramp = np.repeat(heatmap(np.linspace(0.0, 1.0, 256))[None], 12, axis=0)
    return (f"<div id='colourbar'><img alt='heat map colour bar from 0 to 1' src='{data_uri(png_bytes(ramp))}'>"
            "<div class='ticks'><span>0</span><span>0.5</span><span>1</span></div>"
            "<small>CAM and M: each pixel's largest class score, normalised per class to a maximum of 1, "
            "blended half over the image</small></div>")


def threshold_plot_png(curves: Mapping[str, Mapping[str, float]], best: Mapping[str, float]) -> bytes:
    """mIoU of the seeds against the background threshold, one line per map, the best marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 2.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, curve in curves.items():
        thresholds = sorted(curve, key=float)
        line, = ax.plot([float(t) for t in thresholds], [100 * curve[t] for t in thresholds], label=name)
        if name in best:
            ax.plot([best[name]], [100 * curve[f"{best[name]:.2f}"]], "o", color=line.get_color())
    ax.set_xlabel("background threshold")
    ax.set_ylabel("seed mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _classifier_section(classifier: Mapping[str, Any]) -> str:
    ap, f1 = classifier.get("ap") or {}, classifier.get("f1_per_class") or {}
    rows = [[name, ap.get(name), f1.get(name)] for name in ap]
    rows.append(["mean", classifier.get("map"), classifier.get("f1")])
    return _table("classifier", ["class", "AP", "F1"], rows)


def _timing_rows(timing: Mapping[str, float], refine_timing: Mapping[str, float]) -> list[list[str]]:
    """Seconds per stage (a stage skipped because its output existed shows its skip), then the
    refinement's own split."""
    rows = [[name.removesuffix("_s"), f"{seconds:.1f}"] for name, seconds in timing.items()]
    rows += [[f"refine: {name.removesuffix('_s').replace('_', ' ')}", f"{seconds:.1f}"]
             for name, seconds in refine_timing.items()]
    return rows


def _image_rows(columns: Sequence[str], rows: Sequence[Mapping[str, Any]],
                pictures: Mapping[str, Mapping[str, bytes]]) -> str:
    out = []
    for r in rows:
        cells = []
        for c in columns:
            caption = f"<figcaption>mIoU {_fmt(r['miou'][c])}%</figcaption>" if c in r.get("miou", {}) else ""
            cells.append(f"<td><figure><img alt='{html.escape(c)} of {html.escape(r['id'])}' "
                         f"src='{data_uri(pictures[r['id']][c])}'>{caption}</figure></td>")
        out.append(f"<tr><td class='id'>{html.escape(r['id'])}<br><small>{html.escape(', '.join(r['labels']))}"
                   "</small></td>" + "".join(cells) + "</tr>")
    return "".join(out)


def write_html_report(path: str | Path, title: str, report: Mapping[str, Any], classes: Sequence[str],
                      columns: Sequence[str], pictures: Mapping[str, Mapping[str, bytes]],
                      notes: Sequence[str] = ()) -> Path:
    """Write the report of ``report`` (what ``report.json`` holds: ``metrics`` rows with ``method``,
    ``miou``, ``precision``, ``recall``, ``f1`` and per-class ``iou``; ``classifier``; ``timing``;
    ``cam_seed``/``rib_seed`` sweeps; ``refine``; ``rows``, per pictured image its ``id``,
    ``labels`` and ``miou`` per column). ``pictures``: id -> column -> PNG bytes. The classifier's
    warning is shown above everything, where it cannot be missed."""
    metrics = report["metrics"]
    stage_rows = [[m["method"], m.get("miou"), m.get("precision"), m.get("recall"), m.get("f1"), m.get("detail")]
                  for m in metrics]
    iou_rows = [[m["method"], *(m["iou"].get(c) for c in ("background", *classes))] for m in metrics if "iou" in m]
    sweeps = {name: report[key] for name, key in (("CAM seed", "cam_seed"), ("RIB seed (M)", "rib_seed"))
              if key in report}
    plot = threshold_plot_png({n: s["curve"] for n, s in sweeps.items()},
                              {n: float(s["best_threshold"]) for n, s in sweeps.items()}) if sweeps else None
    classifier = report.get("classifier", {})
    warning = classifier.get("warning")
    img_head = "<th>image</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: center; }}
th {{ background: #f0f0f0; }}
td.id {{ text-align: left; font-family: monospace; }}
#images img {{ width: 128px; height: 128px; image-rendering: pixelated; }}
figure {{ margin: 0; }} figcaption {{ font-size: 0.85em; }}
.warning {{ background: #fff3cd; border: 1px solid #e0a800; padding: 8px; }}
.swatch {{ display: inline-block; margin-right: 1em; }}
.swatch i {{ display: inline-block; width: 1em; height: 1em; margin-right: 0.3em; vertical-align: middle;
            border: 1px solid #888; }}
#colourbar {{ width: 256px; margin: 0.8em 0 1.5em; }} #colourbar img {{ width: 256px; height: 12px; }}
.ticks {{ display: flex; justify-content: space-between; font-size: 0.85em; }}
.row {{ display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{f"<p class='warning'>Warning: {html.escape(warning)}</p>" if warning else ""}
<h2>Colours</h2>
{legend_html(classes)}
{colour_bar_html()}
<h2>Stages (%)</h2>
{_table("metrics", ["method", "mIoU", "precision", "recall", "F1", "detail"], stage_rows)}
<h2>IoU per class (%)</h2>
{_table("per-class-iou", ["method", "background", *classes], iou_rows)}
<div class="row">
<div><h2>Classifier on validation (%)</h2>{_classifier_section(classifier)}</div>
<div><h2>Seed threshold</h2>{f"<img id='threshold-curve' alt='seed mIoU against threshold' src='{data_uri(plot)}'>"
                              if plot else "<p>no sweep in the report</p>"}</div>
<div><h2>Timings (s)</h2>
{_table("timings", ["stage", "seconds"], _timing_rows(report.get("timing", {}),
                                                      report.get("refine", {}).get("timing", {})))}</div>
</div>
<ul>{"".join(f"<li>{html.escape(n)}</li>" for n in notes)}</ul>
<h2>Images</h2>
<table id="images"><tr>{img_head}</tr>{_image_rows(columns, report.get("rows", []), pictures)}</table>
</body></html>
"""
    path = Path(path)
    path.write_text(doc)
    return path
