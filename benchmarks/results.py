"""docs/RESULTS.md and the README's demo picture and table, generated from the files under docs/results/.

Figures in the docs were typed by hand and went stale; here every table is made from a committed
result file (the demo's ``report.json``, ``rib study``'s ``study.json``, the benchmarks' JSON), and
each section states the date, commit and machine its file recorded
(:func:`rib_core.runtime.provenance.run_record`). A section whose file is missing says how to produce it.
``docs/results/notes.md`` is the hand-written narrative, appended as it is and marked as such.
Usage: ``python -m benchmarks.results`` (rewrite both), ``--demo runs/demo`` (first take a
finished demo run's ``report.json`` and its picture together, so both show one run), ``--check``
(exit 1 when either differs from what the files give; tests/test_results_doc.py does the same).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from benchmarks.bench_classifier_length import section as length_section
from benchmarks.bench_premise import readme_block as premise_block
from benchmarks.bench_premise import section as premise_section
from benchmarks.sections import provenance, section
from benchmarks.tune_scenes import SCENE_NAMES
from benchmarks.tune_scenes import section as tune_section
from rib_core.data.datasets import load_manifest
from rib_core.experiments.demo_job import report_rows
from rib_core.experiments.study import ROWS
from rib_core.experiments.study import markdown as study_markdown

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "docs" / "results"
RESULTS_MD = ROOT / "docs" / "RESULTS.md"
README = ROOT / "README.md"
PICTURE_LINK = "docs/img/demo.png"  # as the README links it
PICTURE = ROOT / PICTURE_LINK
GAP, HEADER = 4, 16  # the picture's gap between cells and its header row (px)
COLUMNS = ("input", "CAM", "RIB map M", "pseudo-mask", "ground truth")  # the report's picture columns

DEMO_HOWTO = ("`rib demo --out runs/demo` (or `bash scripts/demo.sh`), then "
              "`python -m benchmarks.results --demo runs/demo`")
STUDY_HOWTO = ("`rib study --out runs/study` (about 50 min on 2 cores), then "
               "`cp runs/study/study.json docs/results/study.json` and `python -m benchmarks.results`")
STUDY_AT_SIZE_HOWTO = ("`OMP_NUM_THREADS=1 python -m benchmarks.study_at_size --scenes {scenes} --out "
                       "runs/study_{scenes}` (about an hour per seed on one core), then "
                       "`cp runs/study_{scenes}/study.json docs/results/study_{scenes}.json` and "
                       "`python -m benchmarks.results`")
LR_HOWTO = "OMP_NUM_THREADS=1 python -m benchmarks.bench_lr > docs/results/bench_lr.json"
# (file stem, title, the command that writes the file)
BENCHMARKS = (
    ("bench_rib", "RIB's speed: FLOPs, seconds per image, fraction of peak",
     "python -m benchmarks.bench_rib --threads 2 > docs/results/bench_rib.json"),
    ("bench_random_walk", "Memory and time of the random walk on a VOC-sized image",
     "python -m benchmarks.bench_random_walk --size 500 375 > docs/results/bench_random_walk.json"),
    ("bench_device_crops", "Device crops against IRN's host crops",
     "python -m benchmarks.bench_device_crops > docs/results/bench_device_crops.json"),
    ("bench_manifest", "Manifest validation time",
     "python -m benchmarks.bench_manifest --lines 100000 > docs/results/bench_manifest.json"),
    ("bench_load", "The service under load, against the CLI",
     "python -m benchmarks.bench_load --uploads 50 --bulk 8 > docs/results/bench_load.json"),
)


def load(folder: Path, stem: str) -> dict[str, Any] | None:
    """A result file's content, or None when it has not been committed."""
    path = folder / f"{stem}.json"
    return json.loads(path.read_text()) if path.exists() else None


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def demo_table(report: dict[str, Any]) -> str:
    """The demo's stage table: every row of its report, mIoU and pixel scores in percent."""
    lines = ["| stage | mIoU % | precision % | recall % | F1 % | how |", "|---|---|---|---|---|---|"]
    labels = report["refine"].get("ir_labels")
    share = f"{pct(labels['ignored_fraction'])}% of pixels left unlabelled" if labels else None
    for row in report["metrics"]:
        detail = row["detail"]
        if share and row["method"] == "IRN confident labels":  # the share goes on the labels' own row
            detail, share = f"{detail}; {share}", None
        lines.append(f"| {row['method']} | {pct(row['miou'])} | {pct(row.get('precision'))} | "
                     f"{pct(row.get('recall'))} | {pct(row.get('f1'))} | {detail} |")
    if share:  # a report from before the labels had a row of their own
        lines.append(f"| IRN confident labels | {pct(labels['miou'])} | | | | {share} |")
    return "\n".join(lines)


def demo_summary(report: dict[str, Any]) -> str:
    """The lines under the demo table: classifier quality, images scored, stage times."""
    c = report["classifier"]
    timing = ", ".join(f"{k.removesuffix('_s')} {v:.0f}" for k, v in report["timing"].items())
    return (f"Classifier validation mAP {pct(c['val_map'])}% (F1 at 0.5: {pct(c.get('f1'))}%); "
            f"{report['images']} training images scored. Stage times (s; a stage whose output already "
            f"existed is skipped): {timing}.")


def demo_section(report: dict[str, Any] | None) -> str:
    return section("## The demo (`rib demo`, `docs/results/demo.json`)", report, DEMO_HOWTO,
                   lambda r: [provenance(r), demo_table(r), demo_summary(r)])


TUNED_HOWTO = ("`OMP_NUM_THREADS=1 python -m benchmarks.study_at_size --scenes {scenes} --no-deeplab "
               "--tuned docs/results/tune_{scenes}.json --out runs/study_{scenes}_tuned` (about an hour per seed "
               "on one core; seeds run apart join with `--merge`), then "
               "`cp runs/study_{scenes}_tuned/study.json docs/results/study_{scenes}_tuned.json` and "
               "`python -m benchmarks.results`")
# The study at size's recipes: (file stem, name, how to make it); each at the demo's settings and at
# those rib tune chose on its tuning scenes (benchmarks/tune_scenes.py)
AT_SIZE = (
    ("study_demo", "demo's scenes", STUDY_AT_SIZE_HOWTO.format(scenes="demo")),
    ("study_parts", "premise benchmark's part scenes", STUDY_AT_SIZE_HOWTO.format(scenes="parts")),
    ("study_demo_tuned", "demo's scenes at `rib tune`'s settings", TUNED_HOWTO.format(scenes="demo")),
    ("study_parts_tuned", "part scenes at `rib tune`'s settings", TUNED_HOWTO.format(scenes="parts")),
)
# The DeepLab rows at rib tune's settings, one seed per recipe (docs/RESULTS.md only): the same
# command as TUNED_HOWTO's without --no-deeplab
DEEPLAB_TUNED_HOWTO = ("`OMP_NUM_THREADS=1 python -m benchmarks.study_at_size --scenes {scenes} --seeds 1 "
                       "--tuned docs/results/tune_{scenes}.json --out runs/study_{scenes}_tuned_s1`, then "
                       "`cp runs/study_{scenes}_tuned_s1/study.json docs/results/study_{scenes}_tuned_deeplab.json` "
                       "and `python -m benchmarks.results`")
# (file stem, title, how to make it): the 24-image study, and the study at size on both recipes
STUDIES = (
    ("study", "Every stage's gain over seeds (`rib study`, `docs/results/study.json`)", STUDY_HOWTO),
    *((stem, f"`rib study` at size on the {name} (`benchmarks/study_at_size.py`, `docs/results/{stem}.json`)",
       howto) for stem, name, howto in AT_SIZE),
    *((f"{stem}_deeplab",
       f"`rib study` at size on the {name} with DeepLab, one seed (`docs/results/{stem}_deeplab.json`)",
       DEEPLAB_TUNED_HOWTO.format(scenes=stem.removeprefix("study_").removesuffix("_tuned")))
      for stem, name, _ in AT_SIZE if stem.endswith("_tuned")),
)


def study_section(title: str, summary: dict[str, Any] | None, howto: str) -> str:
    return section(f"## {title}", summary, howto, study_paragraphs)


def study_scope(summary: dict[str, Any], note: bool = True) -> str:
    """Which images each row is scored on, which seeds are in, and (``note``) how settings were chosen."""
    held = summary.get("held_out_images", 0)
    return (f"{summary['images']} training images per seed (maps, IRN and DeepLab training)"
            + (f", {held} held-out training images (maps, refined by that IRN)" if held else "")
            + f", {summary['val_images']} validation images (DeepLab); seeds {', '.join(map(str, summary['seeds']))}"
            + (f"; {summary['note']}." if note else "."))


def study_paragraphs(summary: dict[str, Any]) -> list[str]:
    labels = dict(ROWS)
    seeds = [str(s) for s in summary["seeds"]]
    per_seed = ["| stage | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for key in summary["table"]:
        per_seed.append(f"| {labels[key].strip()} | " + " | ".join(pct(summary["per_seed"][s][key]) for s in seeds)
                        + " |")
    return [provenance(summary), study_scope(summary), study_markdown(summary).strip(), "\n".join(per_seed)]


# The README's study rows: the chain's stages (the masks on the held-out images), then the gains
# issue 24's goals name; docs/RESULTS.md has every row
STUDY_BLOCK_ROWS = ("seed_crf_held_out", "irn_mask_held_out", "deeplab_pseudo", "deeplab_full",
                    "rib_gndrp_seed - cam_seed", "irn_mask_held_out - seed_crf_held_out")


def _mean_sd(stat: dict[str, float] | None, sign: str = "", digits: int = 1) -> str:
    if stat is None:
        return "-"
    mean = f"{100 * stat['mean']:{sign}.{digits}f}"
    return mean if stat["n"] < 2 else f"{mean} ± {100 * stat['std']:.{digits}f}"


def study_block(folder: Path) -> str:
    """The README's summary of the study at size: one column per recipe, stage means ± sd over its
    seeds and the paired differences, with each file's provenance."""
    studies = [(name, load(folder, stem), howto) for stem, name, howto in AT_SIZE]
    missing = [f"{name}: no result committed yet ({howto})." for name, summary, howto in studies if summary is None]
    done = [(name, summary) for name, summary, _ in studies if summary is not None]
    if not done:
        return "\n\n".join(missing)
    labels = dict(ROWS)
    lines = ["| stage (mIoU %, mean ± sd over seeds) | " + " | ".join(
        f"{name} (seeds: {len(summary['seeds'])})" for name, summary in done) + " |", "|---|" + "---|" * len(done)]
    for key in STUDY_BLOCK_ROWS:
        a, _, b = key.partition(" - ")
        name = f"{labels[a].strip()} − {labels[b].strip()} (points)" if b else labels[key].strip()
        cells = [_mean_sd(summary["differences"].get(key), "+", 2) if b else _mean_sd(summary["table"].get(key))
                 for _, summary in done]
        if any(c != "-" for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    fractions = [summary.get("deeplab_fraction_of_full") for _, summary in done]
    if any(fractions):
        lines.append("| DeepLab on pseudo-masks / on true masks (%) | " + " | ".join(map(_mean_sd, fractions)) + " |")
    head = "The whole chain at size (`benchmarks/study_at_size.py`). " + " ".join(
        f"**{name}:** {provenance(summary)} {study_scope(summary, note=False)}" for name, summary in done)
    head += (" Held-out rows: the seed threshold and the walk chosen on the first images (at `rib tune`'s settings, "
             "with or without the CRF after the walk, chosen the same way).")
    return "\n\n".join([head, "\n".join(lines), *missing])


SCALE_HOWTO = ("`OMP_NUM_THREADS=1 python -m benchmarks.bench_scale --sizes 1000 10000 100000 --submit "
               "--out docs/results/bench_scale.json` (about 30 min on 2 cores), then `python -m benchmarks.results`")


def scale_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per data set of a ``bench_scale`` run: the warm chunks' overhead (wall time not in RIB runs)
    and its ratio to the smallest data set on the same storage, and the peak RSS beside the model's
    and the cache's."""
    mib = 2**20
    rows = []
    for r in report["results"]:
        warm = [c for c in r["chunks"] if c["prefetch"]][1:] or r["chunks"][:1]
        rows.append({"size": r["size"], "storage": r["storage"],
                     "overhead_s": sum(c["overhead_s"] for c in warm) / len(warm),
                     "peak_mib": r["peak_rss_bytes"] / mib, "model_mib": r["rss_model_bytes"] / mib,
                     "cache_mib": r["cache_held_bytes"] / mib, "bound_mib": report["cache_bytes"] / mib})
    for row in rows:
        smallest = min((o for o in rows if o["storage"] == row["storage"]), key=lambda o: o["size"])
        row["growth"] = row["overhead_s"] / smallest["overhead_s"]
        row["rest_mib"] = row["peak_mib"] - row["model_mib"] - row["cache_mib"]
    return rows


SUBMIT_HOWTO = ("`python -m benchmarks.bench_submit --images 100000 --out docs/results/bench_submit.json` on a "
                "quiet machine, then `python -m benchmarks.results`")


def submit_lines(result: dict[str, Any] | None) -> str:
    """The submit latency of the largest jobs (``bench_submit``), with its own provenance."""
    if result is None or "run" not in result:
        return f"Submit latency: no result committed yet: {SUBMIT_HOWTO}."
    largest = max(r["images"] for r in result["rows"])
    rows = [r for r in result["rows"] if r["images"] == largest]
    return (f"Submit latency of {largest:,}-image jobs, from the request to the 202 "
            f"(`benchmarks/bench_submit.py`, median of {result['repeats']}; the job's other chunk "
            f"messages follow from the workers): "
            + "; ".join(f"{r['kind']} {r['median_s']:.2f} s" for r in rows) + ". " + provenance(result)
            + f" Load average at the end: {result.get('load_average_1m_end')}.")


def projection_line(report: dict[str, Any]) -> str:
    p = report.get("projection")
    if not p:
        return ""
    return (f"PROJECTED, not measured: VOC train_aug's maps stage ({p['images']:,} images at the paper's "
            f"settings, {p['paper_tflop_per_image']:.1f} TFLOP per image by `bench_rib`'s FLOP count) would take "
            f"{p['cpu_hours']:,.0f} h on this CPU ({p['cpu_achieved_tflop_per_s']:.3f} TFLOP/s achieved in the "
            f"chunks' RIB runs) and {p['h100_hours']:.1f} h on one H100 at an assumed "
            f"{p['h100_assumed_tflop_per_s']:.0f} TFLOP/s, each plus {p['overhead_s_per_image']:.2f} s per image "
            "of the overhead measured here.")


def scale_summary(report: dict[str, Any]) -> str:
    """The compact table of a ``bench_scale`` run (the README's performance block)."""
    lines = ["| data set | warm chunk overhead (s) | vs the smallest | peak RSS (MiB) | model (MiB) | "
             "cache held / bound (MiB) | the rest (MiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in scale_rows(report):
        lines.append(f"| {r['size']:,} images, {r['storage']} | {r['overhead_s']:.2f} | {r['growth']:.2f}x | "
                     f"{r['peak_mib']:.0f} | {r['model_mib']:.0f} | {r['cache_mib']:.0f} / {r['bound_mib']:.0f} | "
                     f"{r['rest_mib']:.0f} |")
    c = report["config"]
    setup = (f"{c['chunk']}-image chunks of {report['data']}; {c['arch']}, K {c['iterations']}, "
             f"{c['companions']} companions of {c['crop']} px; *model* is the RSS once the classifier is "
             f"loaded; *the rest* is the peak beyond the model and the cache: RIB's step (activations and "
             f"gradients of the crops) and the data set's index. Load average "
             f"{report['run']['machine']['load_average_1m']} at the start, {report.get('load_average_1m_end')} "
             "at the end.")
    return "\n\n".join(part for part in ["\n".join(lines), setup, projection_line(report)] if part)


def scale_section(report: dict[str, Any] | None) -> str:
    from benchmarks.bench_scale import table

    return section("### Data-set scale: per-chunk overhead, memory, submit latency (`benchmarks/bench_scale.py`)",
                   report, SCALE_HOWTO,
                   lambda r: [provenance(r), scale_summary(r), "Every figure of the run:", table(r)])


def spread_text(value: dict[str, float] | None, scale: float = 1.0, digits: int = 1) -> str:
    """A bench_lr figure, mean ± sd over seeds, times ``scale``."""
    if value is None:
        return "-"
    return f"{scale * value['mean']:.{digits}f} ± {scale * value['sd']:.{digits}f}"


def lr_section(result: dict[str, Any] | None) -> str:
    return section("## RIB's step size across classifier recipes (`benchmarks/bench_lr.py`, "
                   "`docs/results/bench_lr.json`)", result, f"`{LR_HOWTO}`", lr_paragraphs)


def lr_paragraphs(result: dict[str, Any]) -> list[str]:
    """RIB's step size across classifier recipes: every setting's movement and score, and the
    settings chosen on the tuning half, scored on the other half."""
    images = result["images"]
    intro = (f"Made by `{LR_HOWTO}`. {result['seeds']} classifier seeds per recipe (mean ± sd over them); RIB on "
             f"{images['tuning'] + images['scored']} training scenes, settings chosen on {images['tuning']} and "
             f"scored on the other {images['scored']} at the threshold chosen on the first. Step size: the median "
             "over images (the rule gives each image its own); ΔS/S: the first step's relative change of the "
             "target logit sum; M − CAM: mean absolute difference of the normalised maps (%).")
    lines = ["| recipe | setting | step size | ΔS/S, first step (%) | M − CAM (%) | scored seed mIoU % |",
             "|---|---|---|---|---|---|"]
    chosen = ["| recipe | val mAP % | CAM seed % | rule | picked per seed | scored seed mIoU % | minus CAM |",
              "|---|---|---|---|---|---|---|"]
    for recipe, rows in result["recipes"].items():
        lines.append(f"| {recipe} | CAM | | | | {spread_text(rows['cam_scored_miou'], 100)} |")
        for name, row in rows.items():
            if name.startswith(("fixed_", "first_step_")):
                lr = row["lr_median"]
                lines.append(f"| {recipe} | {name} | {lr['mean']:.2g} ± {lr['sd']:.1g} | "
                             f"{spread_text(row['first_step_change'], 100)} | {spread_text(row['map_change'], 100)} | "
                             f"{spread_text(row['scored_miou'], 100)} |")
        for rule in ("chosen_fixed", "chosen_first_step"):
            pick = rows[rule]
            chosen.append(f"| {recipe} | {spread_text(rows['val_map'], 100)} | "
                          f"{spread_text(rows['cam_scored_miou'], 100)} | {rule.removeprefix('chosen_')} | "
                          f"{', '.join(pick['picked'])} | "
                          f"{spread_text(pick['scored_miou'], 100)} | {spread_text(pick['gain_over_cam'], 100)} |")
    return [provenance(result), intro, "\n".join(lines), "\n".join(chosen)]


def flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts as dotted keys; lists and scalars as compact JSON."""
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    return [(prefix, json.dumps(value))]


def bench_section(stem: str, title: str, command: str, result: dict[str, Any] | None) -> str:
    def paragraphs(r: dict[str, Any]) -> list[str]:
        rows = [f"| `{k}` | {v} |" for k, v in flatten({k: v for k, v in r.items() if k != "run"})]
        return [provenance(r) + f" Made by `{command}`.", "\n".join(["| figure | value |", "|---|---|", *rows])]

    return section(f"### {title} (`benchmarks/{stem}.py`)", result, f"`{command}`", paragraphs)


def results_doc(folder: Path = RESULTS_DIR) -> str:
    """docs/RESULTS.md from the files in ``folder``."""
    parts = [
        "# Results\n\nGenerated by `python -m benchmarks.results` from the files in `docs/results/`: do not "
        "edit; edit the files (or `docs/results/notes.md`, the hand-written part) and regenerate. Every "
        "section states the date, commit and machine its file recorded. Scores are on MNIST scenes (the "
        "demo data), not on VOC or COCO; mIoU in percent.\n",
        demo_section(load(folder, "demo")),
        *(study_section(title, load(folder, stem), howto) for stem, title, howto in STUDIES),
        lr_section(load(folder, "bench_lr")),
        length_section(load(folder, "bench_classifier_length")),
        premise_section(load(folder, "bench_premise")),
        *(tune_section(scenes, load(folder, f"tune_{scenes}")) for scenes in SCENE_NAMES),
        "## Benchmarks\n\nSpeed and resource figures; timings depend on the machine and on what else ran on "
        "it.\n",
        scale_section(load(folder, "bench_scale")),
        *(bench_section(stem, title, command, load(folder, stem)) for stem, title, command in BENCHMARKS),
    ]
    notes = folder / "notes.md"
    if notes.exists():
        parts.append("## Notes (hand-written narrative, not regenerated: `docs/results/notes.md`)\n\n"
                     + notes.read_text().strip() + "\n")
    return "\n".join(parts)


def markers(name: str) -> tuple[str, str]:
    """The comments around the README's generated block ``name``."""
    return (f"<!-- {name}: generated by `python -m benchmarks.results` from docs/results/; do not edit -->",
            f"<!-- end of {name} -->")


def readme_blocks(folder: Path = RESULTS_DIR, picture: Path = PICTURE) -> dict[str, str]:
    """The README's generated blocks by name: the demo run's picture and its table with its date, the
    premise benchmark's stage table, and the data-set scale benchmark's summary."""
    report = load(folder, "demo")
    if report is None:
        table = f"No demo result committed yet: {DEMO_HOWTO}."
    else:
        table = "\n\n".join([provenance(report), demo_table(report), demo_summary(report)])
    if picture.exists():
        shown = (f"![Rows of the demo's report: {', '.join(COLUMNS)}]({PICTURE_LINK})\n\n"
                 f"*The first rows of the committed demo run's report (its table is below): "
                 f"{', '.join(COLUMNS)}.*")
    else:
        shown = f"*No picture of a demo run committed yet: {DEMO_HOWTO}.*"
    scale = load(folder, "bench_scale")
    performance = (f"No data-set scale result committed yet: {SCALE_HOWTO}." if scale is None
                   else "\n\n".join([provenance(scale), scale_summary(scale)]))
    performance += "\n\n" + submit_lines(load(folder, "bench_submit"))
    return {"demo picture": shown, "demo table": table, "premise": premise_block(load(folder, "bench_premise")),
            "study": study_block(folder), "performance": performance}


def with_readme_blocks(readme: str, blocks: dict[str, str]) -> str:
    """``readme`` with the text between each block's markers replaced by the block."""
    for name, body in blocks.items():
        begin, end = markers(name)
        if begin not in readme or end not in readme:
            raise ValueError(f"README.md lacks the markers of its generated block {name!r}: {begin} ... {end}")
        readme = readme[:readme.index(begin) + len(begin)] + f"\n{body}\n" + readme[readme.index(end):]
    return readme


def seed_sweeps(run_dir: Path) -> dict[str, Any]:
    """The CAM and M seed sweeps of a demo run, from its report.json (the rows' seeds use their best thresholds)."""
    report = json.loads((run_dir / "report.json").read_text())
    return {name: report[name] for name in ("cam_seed", "rib_seed")}


def demo_picture(run_dir: Path, rows: int = 3, zoom: int = 2) -> Image.Image:
    """The first ``rows`` rows of a demo run's report (the same pictures as its report.html,
    :func:`rib_core.experiments.demo_job.report_rows`) as one image, columns headed by name."""
    train = load_manifest(run_dir / "data" / "train.jsonl")
    ids = [r.id for r in train.records[:rows]]
    _, pictures = report_rows(run_dir, train.subset(ids), rows, seed_sweeps(run_dir))
    cells = [[Image.open(io.BytesIO(pictures[i][c])).convert("RGB") for c in COLUMNS] for i in ids]
    w, h = (zoom * max(im.size[i] for r in cells for im in r) for i in (0, 1))
    sheet = Image.new("RGB", (len(COLUMNS) * (w + GAP) - GAP, HEADER + len(cells) * (h + GAP) - GAP), "white")
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(COLUMNS):
        draw.text((j * (w + GAP) + 2, 2), name, fill="black")
    for i, row in enumerate(cells):
        for j, im in enumerate(row):
            sheet.paste(im.resize((zoom * im.size[0], zoom * im.size[1]), Image.Resampling.NEAREST),
                        (j * (w + GAP), HEADER + i * (h + GAP)))
    return sheet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if docs/RESULTS.md or the README's blocks are stale")
    p.add_argument("--demo", type=Path, metavar="RUN_DIR", help="first take a finished demo run (e.g. runs/demo): "
                   "its report.json as docs/results/demo.json and its picture as docs/img/demo.png")
    args = p.parse_args()
    if args.demo:
        (RESULTS_DIR / "demo.json").write_text((args.demo / "report.json").read_text())
        PICTURE.parent.mkdir(parents=True, exist_ok=True)
        demo_picture(args.demo).save(PICTURE, optimize=True)
        print(f"took {args.demo / 'report.json'}; wrote {PICTURE.relative_to(ROOT)}")
    expected = {RESULTS_MD: results_doc(), README: with_readme_blocks(README.read_text(), readme_blocks())}
    stale = [path for path, text in expected.items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is stale: run python -m benchmarks.results", file=sys.stderr)
        sys.exit(1 if stale else 0)
    for path in stale:
        path.write_text(expected[path])
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
