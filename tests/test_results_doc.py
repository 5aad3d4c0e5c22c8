"""docs/RESULTS.md and the README's generated blocks are what the committed result files give.

(A real demo run's report.json through the same renderer, and its picture, are checked in
tests/test_main_job.py, which runs the demo on a small config.)"""

import json
import os
import re
import shutil
import subprocess
from datetime import datetime

import pytest

from benchmarks.bench_classifier_length import LENGTH_HOWTO, summary
from benchmarks.results import (
    PICTURE_LINK,
    README,
    RESULTS_DIR,
    RESULTS_MD,
    ROOT,
    readme_blocks,
    results_doc,
    with_readme_blocks,
)
from rib_core.runtime.provenance import run_record


def test_results_doc_and_the_readme_blocks_are_regenerated_from_the_files():
    assert RESULTS_MD.read_text() == results_doc(), "docs/RESULTS.md is stale: run python -m benchmarks.results"
    readme = README.read_text()
    assert with_readme_blocks(readme, readme_blocks()) == readme, "README's blocks are stale: same command"


def test_every_figure_and_the_date_come_from_the_files(tmp_path):
    folder = tmp_path / "results"
    shutil.copytree(RESULTS_DIR, folder)
    (folder / "demo.json").unlink(missing_ok=True)
    text = results_doc(folder)
    assert "No result committed yet. To produce it: `rib demo" in text
    assert "No demo result committed yet" in readme_blocks(folder)["demo table"]

    # the renderer's input, as run_demo writes it (a run record of this machine, stage rows, times)
    report = {"run": run_record("cpu"), "images": 7, "timing": {"data_s": 1.0, "rib_s": 2.5},
              "classifier": {"val_map": 0.9012, "f1": 0.8},
              "metrics": [{"method": "all background", "miou": 0.05, "detail": "the floor"},
                          {"method": "CAM seed", "miou": 0.01234, "precision": 0.5, "recall": 0.25, "f1": 0.33,
                           "detail": "best threshold 0.60"}],
              "refine": {"ir_labels": {"miou": 0.7, "ignored_fraction": 0.125}}}
    (folder / "demo.json").write_text(json.dumps(report))
    text = results_doc(folder)
    table = readme_blocks(folder)["demo table"]
    for shown in (text, table):
        assert "| CAM seed | 1.2 | 50.0 | 25.0 | 33.0 | best threshold 0.60 |" in shown
        assert report["run"]["date"] in shown and report["run"]["commit"] in shown
        assert "mAP 90.1%" in shown and "12.5% of pixels left unlabelled" in shown
    # a report whose rows hold the confident labels: their unlabelled share goes on that row, once
    report["metrics"].append({"method": "IRN confident labels", "miou": 0.7, "precision": 0.6, "recall": 0.9,
                              "f1": 0.72, "detail": "what IRN trains on"})
    (folder / "demo.json").write_text(json.dumps(report))
    table = readme_blocks(folder)["demo table"]
    assert ("| IRN confident labels | 70.0 | 60.0 | 90.0 | 72.0 | what IRN trains on; 12.5% of pixels left "
            "unlabelled |") in table and table.count("IRN confident labels") == 1
    del report["run"]
    (folder / "demo.json").write_text(json.dumps(report))
    assert "not recorded in this file" in results_doc(folder)

    walk = json.loads((folder / "bench_random_walk.json").read_text())
    walk["peak_memory_mb"] = 123456.5
    (folder / "bench_random_walk.json").write_text(json.dumps(walk))
    assert "| `peak_memory_mb` | 123456.5 |" in results_doc(folder)
    (folder / "bench_random_walk.json").unlink()
    assert ("`python -m benchmarks.bench_random_walk --size 500 375 > docs/results/bench_random_walk.json`"
            in results_doc(folder))


def test_the_picture_is_shown_once_there_is_one(tmp_path):
    picture = tmp_path / "demo.png"
    assert "No picture" in readme_blocks(picture=picture)["demo picture"]
    picture.write_bytes(b"")
    assert f"]({PICTURE_LINK})" in readme_blocks(picture=picture)["demo picture"]


def test_a_readme_without_the_markers_is_refused():
    with pytest.raises(ValueError, match="markers"):
        with_readme_blocks("# a README\n", readme_blocks())


def test_the_readme_is_short_and_links_documents_that_exist():
    readme = README.read_text()
    assert len(readme.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#]+)", readme)
    assert {"docs/RESULTS.md", "docs/USAGE.md", "docs/SERVICE.md", "docs/ARCHITECTURE.md"} <= set(links)
    for link in links:
        assert (ROOT / link).exists(), link


def test_a_run_record_names_this_checkout_and_machine():
    run = run_record("cpu")
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert run["commit"] in (head, f"{head}-dirty")
    assert datetime.fromisoformat(run["date"]).utcoffset().total_seconds() == 0
    assert run["machine"]["cpus"] == os.cpu_count() and run["machine"]["device"] == "cpu"


def test_the_lr_section_shows_each_setting_and_the_choices(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    assert "OMP_NUM_THREADS=1 python -m benchmarks.bench_lr > docs/results/bench_lr.json" in results_doc(folder)
    one = {"mean": 0.5, "sd": 0.125}
    setting = {"first_step_change": one, "map_change": one, "lr_median": {"mean": 3e-5, "sd": 1e-5},
               "scored_miou": {"mean": 0.4321, "sd": 0.01}}
    pick = {"picked": ["fixed_lr0.001", "fixed_lr0.0001"], "scored_miou": one,
            "gain_over_cam": {"mean": 0.02, "sd": 0.01}}
    recipe = {"val_map": one, "cam_scored_miou": one, "fixed_lr0.001": setting, "chosen_fixed": pick,
              "chosen_first_step": pick}
    result = {"run": run_record("cpu"), "images": {"tuning": 8, "scored": 8}, "seeds": 3, "recipes": {"irn": recipe}}
    (folder / "bench_lr.json").write_text(json.dumps(result))
    text = results_doc(folder)
    assert "| irn | fixed_lr0.001 | 3e-05 ± 1e-05 | 50.0 ± 12.5 | 50.0 ± 12.5 | 43.2 ± 1.0 |" in text
    assert ("| irn | 50.0 ± 12.5 | 50.0 ± 12.5 | fixed | fixed_lr0.001, fixed_lr0.0001 | 50.0 ± 12.5 | 2.0 ± 1.0 |"
            in text)
    assert result["run"]["commit"] in text and "on 8 and scored on the other 8" in text


def test_the_classifier_length_section_comes_from_its_file(tmp_path):
    folder = tmp_path / "results"
    shutil.copytree(RESULTS_DIR, folder)
    (folder / "bench_classifier_length.json").unlink(missing_ok=True)
    assert f"No result committed yet. To produce it: `{LENGTH_HOWTO}`" in results_doc(folder)

    def run(seed, arm, curve, kept, epochs):
        config = {"epochs": epochs, "patience": 2, "min_delta": 0.005}
        return {"scene": "texture-large-grey-128", "seed": seed, "arm": arm, "curve": curve, "epochs_run": len(curve),
                "epoch_kept": kept, "map": curve[kept - 1], "config": config, "run": run_record("cpu")}

    runs = [run(1, "fixed", [0.8, 0.87, 0.893], 3, 3), run(1, "plateau", [0.7, 0.9, 0.93, 0.91, 0.92], 3, 8),
            run(2, "plateau", [0.6, 0.8, 0.85], 3, 8)]
    result = {"run": run_record("cpu"), "n_train": 1500, "n_val": 200, "runs": runs, "summary": summary(runs)}
    (folder / "bench_classifier_length.json").write_text(json.dumps(result))
    text = results_doc(folder)
    assert "| texture-large-grey-128 | 1 | plateau | 70.0, 90.0, 93.0, 91.0, 92.0 | 5 of 8 | 3 | 93.0 |" in text
    assert "| texture-large-grey-128 | plateau | 1, 2 | 89.0 ± 5.7 | 5, 3 | 1 of 2 |" in text
    assert "| texture-large-grey-128 | fixed | 1 | 89.3 | 3 | 0 of 1 |" in text
    assert "not risen by 0.5 points for 2 epochs" in text and result["run"]["date"] in text
    assert result["summary"]["texture-large-grey-128"]["paired_gain"] == {1: pytest.approx(0.93 - 0.893)}


def test_the_premise_section_and_block_show_each_stage_and_a_partial_run(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    howto = "python -m benchmarks.bench_premise --seeds 0 1 2 --irn"
    assert howto in results_doc(folder) and howto in readme_blocks(folder)["premise"]
    one = {"mean": 0.5, "sd": 0.125}
    seed_row = {"miou": one, "precision": one, "recall": {"mean": 0.25, "sd": 0.01}, "head_recall": one,
                "body_recall": one, "mass_head": {"mean": 0.75, "sd": 0.05}, "mass_body": one}
    per_seed = [{"data_seed": s, "cam": {"miou": 0.4 + s / 100}, "rib_paper_crf": {"miou": 0.6}} for s in (0, 1)]
    result = {"run": run_record("cpu"), "seeds": [[0, 0], [1, 1], [2, 2]], "seeds_done": 2, "images": 16,
              "data": {"canvas": 112, "digit_size": [24, 34], "body_area": [1.5, 2.5], "body_style_p": 0.4},
              "classifier_map": one, "stages": {"cam": seed_row, "rib_paper_crf": {"miou": one, "precision": one,
                                                                                   "recall": one}},
              "paired": {"rib_paper_crf - cam": {"miou": {"mean": 0.031, "sd": 0.01}},
                         "rib_paper - cam": {"miou": {"mean": 0.01, "sd": 0.004}},
                         "rib_first_step - cam": {"miou": {"mean": 0.01, "sd": 0.006}}}, "per_seed": per_seed}
    (folder / "bench_premise.json").write_text(json.dumps(result))
    text, block = results_doc(folder), readme_blocks(folder)["premise"]
    for shown in (text, block):
        assert result["run"]["commit"] in shown and result["run"]["date"] in shown
        assert "| CAM seed | 50.0 ± 12.5 |" in shown and "| 75.0 ± 5.0 / 50.0 ± 12.5 | - |" in shown
    assert "| RIB-GNDRP (8e-6) seed + CRF | 50.0 ± 12.5 | 50.0 ± 12.5 | 50.0 ± 12.5 | - | - | +3.1 ± 1.0 |" in text
    assert "seed + CRF" not in block  # the README's table has the seeds only
    assert "PARTIAL: 2 of the 3 planned seeds finished" in text
    assert "RIB-GNDRP seed, lr 8e-6 (paper) − CAM +1.0 ± 0.4 points: goal met" in text
    assert "RIB-GNDRP seed, first_step 0.3 − CAM +1.0 ± 0.6 points: goal not met" in text
    assert "| CAM seed | 40.0 | 41.0 |" in text
