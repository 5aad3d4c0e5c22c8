"""``rib study``'s arithmetic: means, sample spreads and paired differences over seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rib_core.experiments.study import markdown, merge_studies, summarise


def test_summary_pairs_each_seed_before_averaging():
    per_seed = {
        0: {"cam_seed": 0.30, "rib_gndrp_seed": 0.34, "seed_crf": 0.50, "irn_mask": 0.45},
        1: {"cam_seed": 0.40, "rib_gndrp_seed": 0.41, "seed_crf": 0.55, "irn_mask": 0.60},
        2: {"cam_seed": 0.20, "rib_gndrp_seed": 0.25, "seed_crf": 0.40, "irn_mask": 0.41},
    }
    s = summarise(per_seed)
    assert s["seeds"] == [0, 1, 2]
    assert s["table"]["cam_seed"]["mean"] == pytest.approx(0.30)
    assert s["table"]["cam_seed"]["std"] == pytest.approx(0.10)  # sample std (n - 1)
    gain = s["differences"]["rib_gndrp_seed - cam_seed"]
    assert gain["mean"] == pytest.approx((0.04 + 0.01 + 0.05) / 3)
    # paired: the spread of the differences, far below the spread of either row
    assert gain["std"] == pytest.approx(math.sqrt(((0.04 - 0.1 / 3) ** 2 + (0.01 - 0.1 / 3) ** 2
                                                   + (0.05 - 0.1 / 3) ** 2) / 2))
    assert "rib_gap_seed - cam_seed" not in s["differences"]  # rows not measured are left out
    assert "deeplab_fraction_of_full" not in s
    text = markdown(s)
    assert "| CAM seed | 30.0 | 10.0 |" in text and "| RIB-GNDRP seed - CAM seed | +3.3 |" in text


def test_deeplab_is_reported_as_a_fraction_of_full_supervision():
    per_seed = {0: {"deeplab_pseudo": 0.30, "deeplab_full": 0.60}, 1: {"deeplab_pseudo": 0.45, "deeplab_full": 0.50}}
    s = summarise(per_seed)
    assert s["deeplab_fraction_of_full"]["mean"] == pytest.approx((0.5 + 0.9) / 2)


def test_seeds_run_apart_merge_into_one_study_and_nothing_else_does():
    """The committed study at size, cut into one file per seed (as if each seed ran in its own
    session), merges back into the same table; files that are not one study are refused."""
    study = json.loads((Path(__file__).parents[1] / "docs/results/study_demo.json").read_text())
    run_of = {s: r["run"] for r in study.get("seed_runs", [{"seeds": study["seeds"], "run": study.get("run")}])
              for s in r["seeds"]}
    apart = [{**{k: v for k, v in study.items() if k != "seed_runs"}, "run": run_of[int(s)], "per_seed": {s: row}}
             for s, row in reversed(list(study["per_seed"].items()))]
    merged = merge_studies(apart)
    assert merged["seeds"] == sorted(int(s) for s in study["per_seed"]) and len(merged["seeds"]) > 1
    for part in ("table", "differences"):
        assert merged[part].keys() == study[part].keys()
        for key, stat in study[part].items():
            got = merged[part][key]
            assert (got["mean"], got["std"], got["n"]) == (pytest.approx(stat["mean"]), pytest.approx(stat["std"]),
                                                           stat["n"])
    assert [r["seeds"] for r in merged["seed_runs"]] == [[s] for s in sorted(merged["seeds"], reverse=True)]
    assert merged["config"]["seeds"] == merged["seeds"]
    with pytest.raises(ValueError, match="more than one study"):
        merge_studies([apart[0], apart[0]])
    other = {**apart[1], "config": {**apart[1]["config"], "held_out": apart[1]["config"]["held_out"] + 1}}
    with pytest.raises(ValueError, match="other than their seeds"):
        merge_studies([apart[0], other])


def test_a_tiny_study_on_part_scenes_scores_the_held_out_images_apart(tmp_path):
    """The whole chain at study size's shape (issue 24 part 5), as small as it runs: part scenes, IRN
    trained on the first images' confident labels (following the seed threshold) and applied to
    held-out ones with the seed threshold and walk chosen on the first, both DeepLabs; a rerun
    resumes every stage."""
    from rib_core.config.network_configs import DeepLabTrainConfig
    from rib_core.config.rib_config import RibConfig
    from rib_core.config.stage_configs import ConfidentLabelConfig, IrnTrainConfig, RefineConfig
    from rib_core.data.datasets import load_manifest
    from rib_core.data.part_scenes import PREMISE_SCENES
    from rib_core.experiments.demo_job import DemoJobConfig
    from rib_core.experiments.study import StudyConfig, run_study

    parts = PREMISE_SCENES.model_copy(update={"n_train": 24, "n_val": 8, "canvas": 64, "digit_size": (18, 24),
                                              "digits": [0, 1, 2]})
    demo = DemoJobConfig(pretrain=None, n_images=6, rib=RibConfig(iterations=3, companions=2), refine=RefineConfig(
        irn=IrnTrainConfig(arch="resnet18", batch_size=4, epochs=1, radius=5),
        labels=ConfidentLabelConfig(follow_seed=True)))
    cfg = StudyConfig(seeds=[0], demo=demo, parts=parts, held_out=3, use_gap=False, walk_exp_times=[2, 4],
                      walk_thresholds=[0.3, 0.7], walk_crf=[False, True],
                      deeplab=DeepLabTrainConfig(arch="resnet18", batch_size=4, iterations=2, lr=2e-3,
                                                 freeze_bn=False, msc_scales=[]))
    job = cfg.job()  # the sizes follow the scenes' canvas; the rest is the job's own
    assert job.data.canvas == 64 and job.refine.irn.crop_size == 64 and job.rib.crop_size == 64
    assert job.rib.iterations == 3 and job.classifier.crop_size < 64
    first = run_study(tmp_path, cfg, progress=False)
    row = first["per_seed"][0]
    for key in ("cam_seed", "rib_gndrp_seed", "seed_crf", "irn_mask", "seed_crf_held_out", "irn_mask_held_out",
                "deeplab_pseudo", "deeplab_full"):
        assert 0 <= row[key] <= 1, key
    assert "rib_gap_seed" not in row and first["held_out_images"] == 3 and first["scenes"] == "parts"
    seed_dir = tmp_path / "seed_0"
    held = json.loads((seed_dir / "refined_held_out" / "report.json").read_text())
    refined = json.loads((seed_dir / "refined" / "report.json").read_text())
    assert held["images"] == 3 and held["seed_threshold"] == refined["seed_threshold"]  # chosen on the first 6
    assert held["irn_checkpoint"] == refined["irn_checkpoint"]  # IRN trained on the first images only
    walk = held["config"]["walk"]  # chosen on the first images from the study's grid
    assert (walk["exp_times"], walk["bg_threshold"], float(walk["crf"])) == (
        row["walk_exp_times"], row["walk_bg_threshold"], row["walk_crf"])  # the CRF after the walk is a choice too
    assert row["walk_exp_times"] in (2, 4) and row["walk_bg_threshold"] in (0.3, 0.7)
    scale = min(refined["seed_threshold"] / 0.15, 1.0)  # faint maps: the labels follow the seed down
    assert refined["ir_label_thresholds"]["bg"] == pytest.approx(0.17 * scale)
    assert "irn_mask_held_out - seed_crf_held_out" in first["differences"]
    train = load_manifest(tmp_path / "data" / "train.jsonl")
    assert sorted(p.name for p in (seed_dir / "maps").iterdir()) == sorted(f"{r.id}.npz" for r in train.records[:9])
    stamp = (seed_dir / "refined_held_out" / "report.json").stat().st_mtime_ns
    assert run_study(tmp_path, cfg, progress=False)["per_seed"] == first["per_seed"]  # resumed, nothing redone
    assert (seed_dir / "refined_held_out" / "report.json").stat().st_mtime_ns == stamp
