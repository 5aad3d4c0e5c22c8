"""The main job end to end on a small config, its HTML report in headless Chromium, its pseudo-masks
exported and scored by COCOeval, and the CLI's exit codes."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.results import COLUMNS, GAP, HEADER, demo_picture, readme_blocks, results_doc, seed_sweeps
from rib_core.cli import main
from rib_core.config.rib_config import RibConfig
from rib_core.config.stage_configs import IrnTrainConfig, RefineConfig
from rib_core.data.datasets import load_manifest, load_mask
from rib_core.experiments.demo_job import DemoJobConfig, report_rows, run_demo
from rib_core.io.artifacts import PIPELINE_IMAGE_FILES, pipeline_index, pipeline_key
from rib_core.io.export_sources import manifest_masks
from rib_core.io.exports import COCO_ANNOTATIONS, ExportConfig, write_export
from rib_core.io.localization_map import LocalizationMap
from tests.conftest import SMALL_CLASSIFIER, SMALL_DEMO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def demo_run(classifier_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo_run")
    (out / "classifier").mkdir()
    shutil.copy(classifier_path, out / "classifier" / "classifier.pth")  # the job resumes: no retraining
    cfg = DemoJobConfig(
        data=SMALL_DEMO, classifier=SMALL_CLASSIFIER, n_images=6, report_rows=3,
        rib=RibConfig(iterations=3, companions=2, crop_size=64, resize_long=(48, 80)),
        refine=RefineConfig(irn=IrnTrainConfig(arch="resnet18", crop_size=64, batch_size=4, epochs=1, radius=5)),
    )
    summary = run_demo(out, cfg, progress=False)
    assert [m["method"] for m in summary["metrics"]][:3] == ["all background", "CAM seed", "RIB seed (M)"]
    return out


def _chromium(url: str, tmp_path: Path, *args: str) -> str:
    """Headless Chromium on ``url`` with no network or profile of its own; returns what it prints."""
    assert CHROMIUM, "Chromium is part of the set-up (scripts/setup.sh)"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([CHROMIUM, *flags, *args, url], check=True, capture_output=True, text=True,
                          timeout=120).stdout


@pytest.mark.slow
def test_main_job_writes_a_report_that_a_browser_shows(demo_run, tmp_path):
    """The report is made from report.json: every figure it prints is there, the keys to the pictures
    (class colours, the heat maps' colour bar) and the threshold curve are drawn, no path of the
    machine shows, and Chromium renders every picture."""
    report = json.loads((demo_run / "report.json").read_text())
    html = (demo_run / "report.html").read_text()
    classes = load_manifest(demo_run / "data" / "train.jsonl").classes
    methods = [m["method"] for m in report["metrics"]]
    assert methods == ["all background", "CAM seed", "RIB seed (M)", "RIB seed + CRF", "IRN confident labels",
                       "RIB + IRN pseudo-mask"]
    assert report["metrics"][4]["miou"] == report["refine"]["ir_labels"]["miou"]
    for method in methods:
        assert f"<td>{method}</td>" in html
    for m in report["metrics"][1:]:  # per-class IoU of every scored stage, as printed
        assert set(m["iou"]) == {"background", *classes}
        assert "".join(f"<td>{'-' if v is None else f'{100 * v:.1f}'}</td>" for v in m["iou"].values()) in html
    for name, ap in report["classifier"]["ap"].items():  # the classifier's per-class AP
        assert f"<td>{name}</td><td>{'-' if ap is None else f'{100 * ap:.1f}'}</td>" in html
    for name in classes:  # the legend names every class
        assert f"</i>{name}</span>" in html
    assert "id='colourbar'" in html and "id='threshold-curve'" in html
    for stage, seconds in report["timing"].items():
        assert f"<td>{stage.removesuffix('_s')}</td><td>{seconds:.1f}</td>" in html
    assert str(demo_run) not in html and str(demo_run.parent) not in html  # no path of this machine
    assert len(report["rows"]) == 3
    for row in report["rows"]:  # each picture's IoU in its caption
        assert set(row["miou"]) == {"CAM", "RIB map M", "pseudo-mask"}
        for value in row["miou"].values():
            assert f"<figcaption>mIoU {100 * value:.1f}%</figcaption>" in html

    shot = tmp_path / "report.png"
    _chromium((demo_run / "report.html").as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1200,1600")
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels.std() > 10  # text, tables and pictures, not a blank page
    dom = _chromium((demo_run / "report.html").as_uri(), tmp_path, "--dump-dom")
    # every picture of every row, the colour bar and the threshold curve made it into the rendered page
    assert dom.count("<img") == 3 * 5 + 2


@pytest.mark.slow
def test_the_runs_pseudo_masks_export_scored_and_cocoeval_reads_them(demo_run, tmp_path):
    """rib export of the run's refined folder with its maps: each region's score is M's mean inside it,
    and COCOeval reads the export as results against the export of the truth (images matched by
    name): its IoU of every region is the IoU of our mask and the truth's, and AP50 is above 0 exactly
    when some region overlaps its digit by half or more (this small run's masks are poor)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    assert main(["export", str(demo_run / "refined"), "--format", "coco", "--out", str(tmp_path / "ours"),
                 "--maps", str(demo_run / "maps")]) == 0
    ours = json.loads((tmp_path / "ours" / COCO_ANNOTATIONS).read_text())
    by_name = {e["file_name"]: e for e in ours["images"]}
    ids = [Path(name).stem for name in by_name]
    masks = {i: load_mask(demo_run / "refined" / "masks" / f"{i}.png") for i in ids}
    for entry in ours["images"]:
        image_id = Path(entry["file_name"]).stem
        lmap = LocalizationMap.load(demo_run / "maps" / f"{image_id}.npz")
        channel = {int(k) + 1: c for c, k in enumerate(lmap.keys)}
        for a in (a for a in ours["annotations"] if a["image_id"] == entry["id"]):
            region = masks[image_id] == a["category_id"]
            assert a["score"] == pytest.approx(lmap.high_res[channel[a["category_id"]]][region].mean(), abs=1e-4)
    truth_manifest = load_manifest(demo_run / "data" / "train.jsonl").subset(ids)
    classes, items = manifest_masks(truth_manifest)
    write_export(items, classes, ExportConfig(format="coco", images=False), tmp_path / "truth")
    gt = COCO(str(tmp_path / "truth" / COCO_ANNOTATIONS))
    gt_id = {e["file_name"]: e["id"] for e in gt.dataset["images"]}
    ours_id = {e["id"]: gt_id[name] for name, e in by_name.items()}
    results = [{**a, "image_id": ours_id[a["image_id"]]} for a in ours["annotations"]]
    evaluator = COCOeval(gt, gt.loadRes(results), iouType="segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    overlaps = []
    for r in truth_manifest.records:
        truth, mask = load_mask(truth_manifest.mask_uri(r)), masks[r.id]
        for value in {int(v) for v in np.unique(mask) if 0 < v < 255} & {int(v) for v in np.unique(truth) if v > 0}:
            ours_region, truth_region = mask == value, truth == value
            iou = (ours_region & truth_region).sum() / (ours_region | truth_region).sum()
            assert evaluator.ious[(gt_id[Path(r.image).name], value)][0][0] == pytest.approx(iou, abs=1e-6)
            overlaps.append(iou)
    assert overlaps and (evaluator.stats[1] > 0) == (max(overlaps) >= 0.5)


@pytest.mark.slow
def test_the_demo_folder_is_a_pipeline_jobs_work_folder(demo_run):
    """The demo is the local form of a pipeline job: the service's index finds every image's files in it."""
    job = "demo"
    present = [pipeline_key(job, p.relative_to(demo_run).as_posix()) for p in demo_run.rglob("*") if p.is_file()]
    ids = [r.id for r in load_manifest(demo_run / "data" / "train.jsonl").records[:6]]  # n_images=6
    index = pipeline_index(job, ids, present)
    assert [sorted(item["files"]) for item in index] == [sorted(PIPELINE_IMAGE_FILES)] * len(ids)
    assert (demo_run / "classifier" / "classifier.pth").exists() and (demo_run / "refined" / "irn.pth").exists()


@pytest.mark.slow
def test_the_report_records_its_run_and_gives_the_results_doc_its_table_and_picture(demo_run, tmp_path):
    """report.json says when, from which commit and where it ran; docs/RESULTS.md and the README's
    blocks are made from it (every stage row), and the picture holds the report's own pictures."""
    report = json.loads((demo_run / "report.json").read_text())
    run = report["run"]
    assert datetime.fromisoformat(run["date"]).tzinfo is not None
    assert run["machine"]["device"] == "cpu" and run["machine"]["cpus"] == os.cpu_count()
    (tmp_path / "demo.json").write_text(json.dumps(report))
    for text in (results_doc(tmp_path), readme_blocks(tmp_path)["demo table"]):
        assert run["date"] in text and str(run["commit"]) in text
        for row in report["metrics"]:
            assert f"| {row['method']} | {100 * row['miou']:.1f} |" in text

    sheet = demo_picture(demo_run, rows=2, zoom=1)
    subset = load_manifest(demo_run / "data" / "train.jsonl")
    ids = [r.id for r in subset.records[:2]]
    pictures = report_rows(demo_run, subset.subset(ids), 2, seed_sweeps(demo_run))[1]
    rows = [pictures[i] for i in ids]
    w, h = Image.open(io.BytesIO(rows[0]["input"])).size
    assert sheet.size == (len(COLUMNS) * (w + GAP) - GAP, HEADER + 2 * (h + GAP) - GAP)
    for i, row in enumerate(rows):
        for j, column in enumerate(COLUMNS):
            cell = sheet.crop((j * (w + GAP), HEADER + i * (h + GAP), j * (w + GAP) + w, HEADER + i * (h + GAP) + h))
            expected = Image.open(io.BytesIO(row[column])).convert("RGB")
            assert np.array_equal(np.asarray(cell), np.asarray(expected)), (i, column)


def _rib(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rib_core.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.heavy  # starts processes
def test_cli_exit_codes_and_messages(demo, tmp_path):
    assert _rib("--help").returncode == 0
    assert _rib("rib", "--help").returncode == 0
    assert _rib("no-such-command").returncode == 2
    (tmp_path / "bad.pth").write_bytes(b"junk")
    bad_ckpt = _rib("cam", str(tmp_path / "bad.pth"), str(Path(demo.root) / "val.jsonl"), str(tmp_path / "o"))
    assert bad_ckpt.returncode == 3 and "not a readable PyTorch checkpoint" in bad_ckpt.stderr
    (tmp_path / "bad.jsonl").write_text('{"classes": ["a"]}\n{"id": "x", "image": "x.png", "labels": ["b"]}\n')
    bad_manifest = _rib("eval", str(tmp_path), str(tmp_path / "bad.jsonl"))
    assert bad_manifest.returncode == 3 and "line 2" in bad_manifest.stderr and "unknown class" in bad_manifest.stderr
    bad_setting = _rib("demo-data", str(tmp_path / "d"), "--set", "n_train=-1")
    assert bad_setting.returncode == 3 and "n_train" in bad_setting.stderr
    ok = _rib("demo-data", str(tmp_path / "d"), "--set", "n_train=3", "--set", "n_val=2", "--set", "canvas=64",
              "--set", "digit_size=[26,40]")
    assert ok.returncode == 0 and (tmp_path / "d" / "train.jsonl").exists()
