"""What each stage of a staged job runs in a worker: copy the stage's inputs from the job's prefix in
storage into a fresh local folder (frozen manifests checked against their digests), call the
stage's function (:mod:`rib_core.jobs.stages`, :mod:`rib_core.deeplab.job`), and store what it
wrote. Training states are copied to storage after every epoch, so a stage delivered again after
its worker died continues from its last epoch."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contract.stages import STAGE, STAGES, PipelineSpec, Stage
from contract.training import TrainingSpec
from rib_core.io.artifacts import (
    PIPELINE_INDEX,
    PIPELINE_MANIFEST,
    PIPELINE_VAL_MANIFEST,
    pipeline_index,
    pipeline_key,
    training_input_key,
)
from rib_core.jobs.pipeline import resolve_device
from worker import staged
from worker.staged import frozen_manifest, frozen_text, show_progress
from worker.tasks import Runtime

log = logging.getLogger(__name__)


def pull(rt: Runtime, job_id: str, stage: Stage, work: Path) -> None:
    """Copy what ``stage`` wrote (its folders in the registry) from the job's prefix in storage into
    ``work`` (each file written whole, then renamed)."""
    root = pipeline_key(job_id)
    for folder in STAGE[stage].folders:
        for key in rt.storage.list(pipeline_key(job_id, folder) + "/"):
            path = work / key[len(root):]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.part")
            tmp.write_bytes(rt.storage.get(key))
            os.replace(tmp, path)


def push(rt: Runtime, job_id: str, work: Path, stage: Stage, only: Callable[[Path], bool] = lambda p: True) -> None:
    """Copy ``stage``'s folders (the registry's) from ``work`` to the job's prefix in storage (every
    object is written whole)."""
    for path in sorted(p for folder in STAGE[stage].folders for p in (work / folder).rglob("*")):
        if path.is_file() and not path.name.startswith(".") and only(path):
            rt.storage.put(pipeline_key(job_id, path.relative_to(work).as_posix()), path.read_bytes())


def write_inputs(job_id: str, spec: PipelineSpec, work: Path, validation: bool = False) -> Path:
    """A frozen manifest (the data set, or the classifier's validation set) as a checked local file,
    for the stages that read one by path."""
    key, digest = ((PIPELINE_VAL_MANIFEST, spec.val_manifest_sha256) if validation
                   else (PIPELINE_MANIFEST, spec.manifest_sha256))
    path = work / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(frozen_text(pipeline_key(job_id, key), digest))
    return path


def classifier_uri(rt: Runtime, job_id: str, spec: PipelineSpec) -> str:
    return spec.classifier_uri or rt.storage.uri(pipeline_key(job_id, "classifier/classifier.pth"))


def epoch_hook(rt: Runtime, job_id: str, stage: str, work: Path, state: str, epochs: int) -> Callable[[int], None]:
    """After each epoch: store the training state (``state``, relative to ``work``), show the
    progress, and stop if the job was cancelled."""

    def after_epoch(epoch: int) -> None:
        rt.storage.put(pipeline_key(job_id, state), (work / state).read_bytes())
        show_progress(job_id, stage, epoch=epoch, epochs=epochs)

    return after_epoch


def run_classifier(rt: Runtime, job_id: str, spec: PipelineSpec, work: Path, device: str) -> dict[str, Any]:
    from rib_core.jobs.stages import classifier_stage

    pull(rt, job_id, "classifier", work)
    val = write_inputs(job_id, spec, work, validation=spec.val_manifest is not None)
    hook = epoch_hook(rt, job_id, "classifier", work, "classifier/train_state.pth", spec.classifier.epochs)
    report = classifier_stage(work, frozen_manifest(job_id, spec), spec.classifier, val, device, hook,
                              classifier_uri(rt, job_id, spec))
    push(rt, job_id, work, "classifier", lambda p: p.name != "train_state.pth")
    return report


def run_refine(rt: Runtime, job_id: str, spec: PipelineSpec, work: Path, device: str) -> dict[str, Any]:
    from rib_core.jobs.stages import refine_stage

    pull(rt, job_id, "maps", work)
    pull(rt, job_id, "refine", work)
    hook = epoch_hook(rt, job_id, "refine", work, "refined/irn_state.pth", spec.refine.irn.epochs)
    report = refine_stage(work, frozen_manifest(job_id, spec), classifier_uri(rt, job_id, spec), spec.refine,
                          device, hook)
    push(rt, job_id, work, "refine")
    index = pipeline_index(job_id, spec.image_ids, rt.storage.list(pipeline_key(job_id)))
    rt.storage.put(pipeline_key(job_id, PIPELINE_INDEX), json.dumps(index, indent=1).encode(), "application/json")
    return report


def run_deeplab(rt: Runtime, job_id: str, spec: PipelineSpec, work: Path, device: str) -> dict[str, Any]:
    from rib_core.jobs.stages import deeplab_stage

    assert spec.deeplab is not None  # the job has this stage only when DeepLab was asked for
    manifest = frozen_manifest(job_id, spec)
    truth = str(write_inputs(job_id, spec, work)) if any(r.mask for r in manifest.records) else None
    steps = spec.deeplab.iterations
    return deeplab_stage(rt.storage.uri(pipeline_key(job_id, "refined/masks.jsonl")),
                         rt.storage.uri(pipeline_key(job_id, "deeplab")), spec.deeplab, truth, device,
                         lambda entry: show_progress(job_id, "deeplab", **entry, steps=steps))


def run_training(rt: Runtime, job_id: str, spec: TrainingSpec, work: Path, device: str) -> dict[str, Any]:
    """An offline DeepLab job (train, evaluate or predict) on its frozen manifests (digests checked),
    written under the job's own prefix (``spec.output``)."""
    from rib_core.deeplab.job import run_training_job

    job = spec.model_dump(exclude_none=True, exclude={"manifest_sha256", "evaluate_on_sha256", "owner",
                                                      "callback_url", "request"})
    log.info("training job %s: %s", job_id, job)
    for name, digest in (("manifest", spec.manifest_sha256), ("evaluate_on", spec.evaluate_on_sha256)):
        if digest is not None:
            path = work / f"{name}.jsonl"
            path.write_bytes(staged.pipes().records.get_frozen(training_input_key(job_id, name), digest))
            job[name] = str(path)
    return run_training_job({**job, "device": device})


RUNNERS: dict[str, Callable[[Runtime, str, Any, Path, str], dict[str, Any]]] = {
    "classifier": run_classifier, "refine": run_refine, "deeplab": run_deeplab, "training": run_training}
assert set(RUNNERS) == {s.name for s in STAGES if s.queue == "training"}


def chunk_maps(rt: Runtime, job_id: str, spec: PipelineSpec, todo: list[str]) -> dict[str, str]:
    """Run the chunk's images; store each map written, return the images that failed, with why."""
    from rib_core.jobs.stages import maps_stage

    device = str(resolve_device(rt.settings.device))
    with tempfile.TemporaryDirectory(prefix=f"rib-{job_id}-maps-") as tmp:
        work = Path(tmp)
        error = ""
        try:
            maps_stage(work, frozen_manifest(job_id, spec), todo, classifier_uri(rt, job_id, spec), spec.rib, device,
                       cache_bytes=rt.settings.companion_cache_bytes, disk_cache=rt.settings.companion_disk_cache)
        except (Exception, MemoryError) as e:  # per image below: the maps written are kept
            error = f"{type(e).__name__}: {e}"
            log.warning("job %s: maps of %s: %s", job_id, todo, error)
        push(rt, job_id, work, "maps", lambda p: p.suffix == ".npz")
        return {i: error or "no map written" for i in todo if not (work / "maps" / f"{i}.npz").exists()}
