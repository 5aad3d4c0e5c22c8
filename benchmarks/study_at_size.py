"""``rib study`` at a size where IRN and DeepLab are not starved (issue 24, part 5).

Two recipes, 3 seeds each: the demo's scenes and the premise benchmark's part scenes
(:data:`~rib_core.data.part_scenes.PREMISE_SCENES`). Per seed, RIB-GNDRP maps of 200 training
images (IRN trained on all of them, DeepLab on their pseudo-masks against DeepLab on their true
masks) and of 40 more held-out training images that the IRN refines at the seed threshold and with
the walk chosen on the 200. Fixed before the run, never chosen on the scored images:

- IRN for 40 epochs: 1,000 steps at batch 8, about VOC's 990 (3 epochs on 10,582 images); the
  demo's 100 epochs are its rule for 24 images (300 steps), where 3 would be 9.
- The demo's confident-label thresholds (RIB's 0.35 / 0.17; ``labels.follow_seed`` off, as the
  official code).
- No RIB-GAP row (one more RIB run per image; the 24-image study measured it).

About an hour per seed and recipe with the two side by side on 2 cores (one thread each)::

    OMP_NUM_THREADS=1 python -m benchmarks.study_at_size --scenes demo --out runs/study_demo
    OMP_NUM_THREADS=1 python -m benchmarks.study_at_size --scenes parts --out runs/study_parts

``--tuned docs/results/tune_<scenes>.json`` runs the variant at what ``rib tune`` chose on its 24
tuning scenes (``benchmarks/tune_scenes.py``): RIB's step, the confident labels, the walk, and the
CRF after the walk as one more choice for the held-out rows.

Each writes ``study.json`` after every seed (a cut-off run leaves its finished seeds, and a rerun
resumes); copy it to ``docs/results/study_<scenes>.json`` and run ``python -m benchmarks.results``.
Seeds run apart (``--seeds 2 --out runs/study_demo_s2``, in another session or on another machine)
join the others with ``--merge``, which checks that the files differ in nothing but their seeds::

    python -m benchmarks.study_at_size --merge docs/results/study_demo.json runs/study_demo_s2/study.json \
        --out runs/study_demo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rib_core.data.part_scenes import PREMISE_SCENES
from rib_core.experiments.demo_job import starting_job, tuned_job
from rib_core.experiments.study import StudyConfig, merge_studies, run_study, write_study

IMAGES, HELD_OUT, IRN_EPOCHS = 200, 40, 40


def study_config(scenes: str, seeds: list[int], follow_seed: bool = False, deeplab: bool = True,
                 tuned: dict[str, Any] | None = None) -> StudyConfig:
    """The study at size on ``scenes`` (demo or parts); ``follow_seed`` the variant with confident
    labels that follow a faint seed (``labels.follow_seed``), ``deeplab`` False stops at the masks;
    ``tuned`` (a ``benchmarks.tune_scenes --record`` file of these scenes) the variant at what ``rib
    tune`` chose on its tuning subset: RIB's setting, the confident labels and the walk (with the CRF
    after it as one more choice for the held-out rows)."""
    demo = starting_job(n_images=IMAGES)
    irn = demo.refine.irn.model_copy(update={"epochs": IRN_EPOCHS})
    labels = demo.refine.labels.model_copy(update={"follow_seed": follow_seed})
    demo = demo.model_copy(update={"refine": demo.refine.model_copy(update={"irn": irn, "labels": labels})})
    walk_crf = [False]
    if tuned is not None:
        if tuned["scenes"] != scenes:
            raise ValueError(f"the tune record is of the {tuned['scenes']} scenes, not the {scenes} scenes")
        demo, walk_crf = tuned_job(demo, tuned), [False, True]
    return StudyConfig(seeds=seeds, demo=demo, held_out=HELD_OUT,
                       use_gap=False, use_deeplab=deeplab, parts=PREMISE_SCENES if scenes == "parts" else None,
                       walk_crf=walk_crf)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", choices=("demo", "parts"))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", required=True, help="the study's folder (study.json and study.md at its top)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--follow-seed", action="store_true",
                   help="confident labels that follow a faint seed (labels.follow_seed); to compare on the same "
                        "maps, copy a finished seed folder's pretrain/, classifier/, cam/ and maps/ into --out first")
    p.add_argument("--no-deeplab", action="store_true", help="stop at the pseudo-masks")
    p.add_argument("--tuned", type=Path, metavar="TUNE_JSON",
                   help="at the settings rib tune chose (docs/results/tune_<scenes>.json, benchmarks.tune_scenes)")
    p.add_argument("--merge", nargs="+", type=Path, metavar="STUDY_JSON",
                   help="write the study of these files' seeds to --out instead of running one")
    args = p.parse_args()
    if args.merge:
        write_study(Path(args.out), merge_studies([json.loads(f.read_text()) for f in args.merge]))
    elif args.scenes:
        tuned = json.loads(args.tuned.read_text()) if args.tuned else None
        run_study(args.out, study_config(args.scenes, args.seeds, args.follow_seed, not args.no_deeplab, tuned),
                  args.device, progress=False)
    else:
        p.error("give --scenes to run a study, or --merge to join studies")


if __name__ == "__main__":
    main()
