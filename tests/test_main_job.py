"""The main job end to end on a small config, its HTML report in headless Chromium, and the CLI's
exit codes."""

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

from benchmarks.results import COLUMNS, GAP, HEADER, demo_picture, readme_blocks, results_doc
from rib_core.artifacts import PIPELINE_IMAGE_FILES, pipeline_index, pipeline_key
from rib_core.datasets import load_manifest
from rib_core.demo_job import DemoJobConfig, report_rows, run_demo
from rib_core.rib_config import RibConfig
from rib_core.stage_configs import IrnTrainConfig, RefineConfig
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


@pytest.mark.slow
def test_main_job_writes_a_report_that_a_browser_shows(demo_run, tmp_path):
    report = demo_run / "report.html"
    html = report.read_text()
    assert html.count("<tr>") >= 1 + 5 + 1 + 3  # metrics header + 5 rows, images header + 3 rows
    assert "RIB map M" in html and "data:image/png;base64," in html
    assert CHROMIUM, "Chromium is part of the set-up (scripts/setup.sh)"
    shot = tmp_path / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1000,1400", report.as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (1400, 1000)
    assert pixels.std() > 10  # text, tables and pictures, not a blank page
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", report.as_uri()], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    assert dom.count("<img") == 3 * 5  # every picture of every row made it into the rendered page


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
    rows = report_rows(demo_run, subset.subset([r.id for r in subset.records[:2]]), 2)
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
