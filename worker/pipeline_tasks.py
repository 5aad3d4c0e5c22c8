"""The tasks of a pipeline job: a training stage (training queue) and a chunk of RIB maps (image queue).

Both are thin: copy the stage's inputs from the job's prefix in storage into a fresh local folder,
call the stage's function in :mod:`rib_core.dataset_job`, store what it wrote (a stage's report,
``stages/<stage>.json``, last) and record the stage's state in Redis. Training states are copied
to storage after every epoch, so a stage delivered again after its worker died continues from its
last epoch; a stage whose report is in storage is not run again. The order of the stages is the
Celery canvas the API sent (:meth:`contract.tasks.TaskQueue.send_pipeline`); the guards against
duplicate deliveries are :class:`contract.pipelines.PipelineStore`'s leases and hand-offs.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from celery import Task
from celery.exceptions import Ignore

from contract.pipelines import PIPELINE_MAPS, PIPELINE_STAGE, PipelineSpec, PipelineStore
from rib_core.artifacts import PIPELINE_INDEX, PIPELINE_SPEC, pipeline_index, pipeline_key, stage_marker
from rib_core.datasets import load_manifest
from rib_core.pipeline import resolve_device
from worker.celery_app import app
from worker.tasks import Runtime, beating, runtime

log = logging.getLogger(__name__)
MAPS_WAIT_S = 10  # how often a refinement stage started before the last chunk of maps looks again


class CancelledError(Exception):
    """The job was cancelled while this stage ran."""


@cache
def pipelines() -> PipelineStore:
    rt = runtime()
    return PipelineStore(rt.store.r, rt.settings.job_ttl_s)


def _lease_name(task_name: str, args: tuple[Any, ...] | list[Any]) -> str:
    return f"maps-{args[1]}" if task_name == PIPELINE_MAPS else str(args[1])


class PipelineTask(Task):
    """Records a hand-off once Celery has sent what follows this task (``on_success`` runs after)."""

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        pipelines().hand_off(args[0], _lease_name(self.name, args))


@contextmanager
def guarded(task: Task, job_id: str, name: str) -> Iterator[PipelineStore]:
    """Run the block as the only copy of ``name``: a copy delivered after the stage handed on is
    ignored; one delivered while another holds the lease retries after a lease (it takes over if
    that one died). The lease is renewed from a thread while the block runs."""
    store, lease_s = pipelines(), runtime().settings.lease_s
    if store.handed_off(job_id, name):
        raise Ignore()
    token = f"{task.request.hostname}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    if not store.claim(job_id, name, token, lease_s):
        raise task.retry(countdown=lease_s, max_retries=None)
    try:
        with beating(lambda: store.renew(job_id, name, token, lease_s), lease_s / 4, "rib-lease"):
            yield store
    finally:
        store.release(job_id, name, token)


def load_spec(rt: Runtime, job_id: str) -> PipelineSpec:
    return PipelineSpec.model_validate_json(rt.storage.get(pipeline_key(job_id, PIPELINE_SPEC)))


def pull(rt: Runtime, job_id: str, folder: str, work: Path) -> None:
    """Copy the job's ``folder`` from storage into ``work`` (each file written whole, then renamed)."""
    root = pipeline_key(job_id)
    for key in rt.storage.list(pipeline_key(job_id, folder) + "/"):
        path = work / key[len(root):]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_bytes(rt.storage.get(key))
        os.replace(tmp, path)


def push(rt: Runtime, job_id: str, work: Path, folder: str, only: Callable[[Path], bool] = lambda p: True) -> None:
    """Copy ``work/folder`` to the job's prefix in storage (every object is written whole)."""
    for path in sorted((work / folder).rglob("*")):
        if path.is_file() and not path.name.startswith(".") and only(path):
            rt.storage.put(pipeline_key(job_id, path.relative_to(work).as_posix()), path.read_bytes())


def classifier_uri(rt: Runtime, job_id: str, spec: PipelineSpec) -> str:
    return spec.classifier_uri or rt.storage.uri(pipeline_key(job_id, "classifier/classifier.pth"))


def show_progress(job_id: str, stage: str, **values: Any) -> None:
    """Show a training stage's progress; stop it (:class:`CancelledError`) if the job was cancelled."""
    store = pipelines()
    store.progress(job_id, stage, **values)
    if store.cancelled(job_id):
        raise CancelledError(f"cancelled at {values}")


def epoch_hook(rt: Runtime, job_id: str, stage: str, work: Path, state: str, epochs: int) -> Callable[[int], None]:
    """After each epoch: store the training state (``state``, relative to ``work``), show the
    progress, and stop if the job was cancelled."""

    def after_epoch(epoch: int) -> None:
        rt.storage.put(pipeline_key(job_id, state), (work / state).read_bytes())
        show_progress(job_id, stage, epoch=epoch, epochs=epochs)

    return after_epoch


def run_classifier(rt: Runtime, job_id: str, spec: PipelineSpec, work: Path, device: str) -> dict[str, Any]:
    from rib_core.dataset_job import classifier_stage

    pull(rt, job_id, "classifier", work)
    hook = epoch_hook(rt, job_id, "classifier", work, "classifier/train_state.pth", spec.classifier.epochs)
    report = classifier_stage(work, load_manifest(spec.manifest), spec.classifier,
                              spec.val_manifest or spec.manifest, device, hook, classifier_uri(rt, job_id, spec))
    push(rt, job_id, work, "classifier", lambda p: p.name != "train_state.pth")
    return report


def run_refine(rt: Runtime, job_id: str, spec: PipelineSpec, work: Path, device: str) -> dict[str, Any]:
    from rib_core.dataset_job import refine_stage

    pull(rt, job_id, "maps", work)
    pull(rt, job_id, "refined", work)
    hook = epoch_hook(rt, job_id, "refine", work, "refined/irn_state.pth", spec.refine.irn.epochs)
    report = refine_stage(work, load_manifest(spec.manifest), classifier_uri(rt, job_id, spec), spec.refine,
                          device, hook)
    push(rt, job_id, work, "refined")
    index = pipeline_index(job_id, spec.image_ids, rt.storage.list(pipeline_key(job_id)))
    rt.storage.put(pipeline_key(job_id, PIPELINE_INDEX), json.dumps(index, indent=1).encode(), "application/json")
    return report


def run_deeplab(rt: Runtime, job_id: str, spec: PipelineSpec, work: Path, device: str) -> dict[str, Any]:
    from rib_core.dataset_job import deeplab_stage

    assert spec.deeplab is not None  # the canvas has this stage only when DeepLab was asked for
    has_truth = any(r.mask for r in load_manifest(spec.manifest).records)
    steps = spec.deeplab.iterations
    return deeplab_stage(rt.storage.uri(pipeline_key(job_id, "refined/masks.jsonl")),
                         rt.storage.uri(pipeline_key(job_id, "deeplab")), spec.deeplab,
                         spec.manifest if has_truth else None, device,
                         lambda entry: show_progress(job_id, "deeplab", **entry, steps=steps))


STAGE_RUNNERS = {"classifier": run_classifier, "refine": run_refine, "deeplab": run_deeplab}


@app.task(name=PIPELINE_STAGE, bind=True, base=PipelineTask, acks_late=True)
def pipeline_stage(self: Task, job_id: str, stage: str) -> None:
    """One training stage of a pipeline job; its report in storage means it is done."""
    rt = runtime()
    with guarded(self, job_id, stage) as store:
        if store.cancelled(job_id):
            store.stop_all(job_id)
            raise Ignore()  # the chain ends here
        marker = pipeline_key(job_id, stage_marker(stage))
        if store.stage_state(job_id, stage) == "skipped":
            return
        if rt.storage.exists(marker):  # finished before (a redelivery, a restart)
            store.finish(job_id, stage, "done", json.loads(rt.storage.get(marker)))
            return
        if stage == "refine" and (ready := store.maps_ready(job_id)) is not True:
            if ready is None:  # the maps stage failed or was cancelled: the job has ended
                raise Ignore()
            raise self.retry(countdown=MAPS_WAIT_S, max_retries=None)  # the chord fired early
        store.start(job_id, stage)
        try:
            spec, device = load_spec(rt, job_id), str(resolve_device(rt.settings.device))
            with tempfile.TemporaryDirectory(prefix=f"rib-{job_id}-{stage}-") as tmp:
                report = STAGE_RUNNERS[stage](rt, job_id, spec, Path(tmp), device)
        except CancelledError:
            store.stop_all(job_id)
            raise Ignore() from None
        except Exception as e:
            log.exception("job %s: stage %s failed", job_id, stage)
            store.finish(job_id, stage, "failed", error=f"{type(e).__name__}: {e}")
            raise
        text = json.dumps(report, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
        rt.storage.put(marker, text.encode(), "application/json")
        store.finish(job_id, stage, "done", json.loads(text))


@app.task(name=PIPELINE_MAPS, bind=True, base=PipelineTask, acks_late=True)
def pipeline_maps(self: Task, job_id: str, chunk: int) -> None:
    """RIB maps of one chunk of a pipeline job's images; maps already in storage are kept."""
    from rib_core.dataset_job import maps_stage

    rt = runtime()
    with guarded(self, job_id, f"maps-{chunk}") as store:
        try:
            spec = load_spec(rt, job_id)
        except Exception as e:  # without its spec the chunk cannot count: the job ends failed here
            store.finish(job_id, "maps", "failed", error=f"cannot read the job: {type(e).__name__}: {e}")
            raise
        failures: dict[str, str] = {}
        if not store.cancelled(job_id):
            store.start(job_id, "maps")
            try:
                todo = [i for i in spec.chunks[chunk]
                        if not rt.storage.exists(pipeline_key(job_id, f"maps/{i}.npz"))]
                failures = _maps(rt, job_id, spec, todo, maps_stage) if todo else {}
            except Exception as e:  # the chunk still counts: the chord must reach the next stage
                failures = {i: f"{type(e).__name__}: {e}" for i in spec.chunks[chunk]}
        if store.chunk_done(job_id, chunk, failures) == len(spec.chunks) and not store.cancelled(job_id):
            report = {"images": len(spec.image_ids), "maps": len(spec.image_ids) - len(store.map_failures(job_id))}
            rt.storage.put(pipeline_key(job_id, stage_marker("maps")), json.dumps(report).encode(), "application/json")
            store.finish(job_id, "maps", "done", report)


def _maps(rt: Runtime, job_id: str, spec: PipelineSpec, todo: list[str], maps_stage: Callable[..., Path],
          ) -> dict[str, str]:
    """Run the chunk's images; store each map written, return the images that failed, with why."""
    device = str(resolve_device(rt.settings.device))
    with tempfile.TemporaryDirectory(prefix=f"rib-{job_id}-maps-") as tmp:
        work = Path(tmp)
        error = ""
        try:
            maps_stage(work, load_manifest(spec.manifest), todo, classifier_uri(rt, job_id, spec), spec.rib, device)
        except Exception as e:  # per image below: the maps written are kept
            error = f"{type(e).__name__}: {e}"
            log.warning("job %s: maps of %s: %s", job_id, todo, error)
        push(rt, job_id, work, "maps", lambda p: p.suffix == ".npz")
        return {i: error or "no map written" for i in todo if not (work / "maps" / f"{i}.npz").exists()}
