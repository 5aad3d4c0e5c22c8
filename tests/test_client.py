"""The Python client (``rib_client``, issue 26 item 2) against the real API: in-process (Starlette's
TestClient, real Redis and moto's S3 server) for submissions, refusals, waiting and paging; the same
app under uvicorn for the ``rib-remote``/``rib remote`` command line; and the full stack (uvicorn +
a Celery worker running RIB) for an upload and a bulk job end to end, with their export downloaded.

In the in-process tests no worker runs: images are moved through the job store's own calls (the
ones a worker makes: begin, mark_done, mark_failed, count_chunk), so the client sees a job progress.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.pipelines import PipelineStore
from contract.records import Records
from contract.stages import Send
from rib_client import ApiError, RibClient, WaitTimeoutError
from rib_client.client import download
from rib_client.progress import describe, duration
from rib_core.data.demo_data import DemoDataset
from rib_core.io.storage import Storage
from tests.api_inprocess import BUCKET, Api, inprocess_api
from tests.service_stack import ROOT, served, upload_dataset
from tests.test_service import API_KEY, SMALL_RIB, Stack, running_stack

CLASSIFIER = f"s3://{BUCKET}/models/classifier.pth"
# The finished files of an image as a worker lists them (no refinement by IRN): the map, the seed + CRF mask.
FILES = ["map.npz", "map.png", "crf_mask.png", "crf_overlay.png", "meta.json"]


@pytest.fixture(scope="module")
def api(demo: DemoDataset, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with inprocess_api(tmp_path_factory.mktemp("redis"), demo.train.classes, ["other-key", API_KEY], API_KEY,
                       classifier_uri=CLASSIFIER, rib_defaults=SMALL_RIB) as api:
        api.s3.put_object(Bucket=BUCKET, Key="models/classifier.pth", Body=b"placeholder")
        yield api


@pytest.fixture()
def client(api: Api) -> RibClient:
    return RibClient(api_key=API_KEY, http=api.client)


def store(api: Api) -> PipelineStore:
    return api.client.app.state.clients.store  # type: ignore[attr-defined]


def client_storage(api: Api) -> Storage:
    return api.client.app.state.clients.storage  # type: ignore[attr-defined]


def records(n: int, labels: list[str]) -> list[dict[str, object]]:
    return [{"id": f"im{i}", "image": f"s3://{BUCKET}/inputs/im{i}.png", "labels": labels} for i in range(n)]


def test_submissions_reach_the_api_and_refusals_carry_its_message(api: Api, client: RibClient,
                                                                   demo: DemoDataset) -> None:
    record = demo.val.records[0]
    image = Path(demo.val.image_uri(record))
    upload = client.submit_upload(image, list(record.labels), refine={"crf": {"iterations": 3}})
    assert (upload.state, upload.image_id) == ("queued", image.stem)
    status = client.status(upload.job_id)
    assert (status.total, status.counts.queued, status.refine["crf"]["iterations"]) == (1, 1, 3)
    bulk = client.submit_job(images=records(3, ["digit1"]), rib={"iterations": 1})
    assert bulk.total == 3 and client.status(bulk.job_id).rib["iterations"] == 1
    header = {"format": "rib-manifest", "version": 1, "classes": demo.train.classes}
    lines = [header, *({"id": f"p{i}", "image": f"images/p{i}.png", "labels": ["digit2"]} for i in range(3))]
    api.s3.put_object(Bucket=BUCKET, Key="inputs/set.jsonl", Body="".join(json.dumps(x) + "\n" for x in lines))
    by_manifest = client.submit_job(manifest_uri=f"s3://{BUCKET}/inputs/set.jsonl")
    assert by_manifest.total == 3
    pipeline = client.submit_pipeline(f"s3://{BUCKET}/inputs/set.jsonl", classifier_uri=CLASSIFIER,
                                      refine={"irn": {"batch_size": 2}})
    assert pipeline.stages and pipeline.total == 3
    shown = client.status(pipeline.job_id, pipeline=True)
    assert list(shown.stages) == pipeline.stages and not shown.finished
    assert client.cancel(pipeline.job_id, pipeline=True).state in ("cancelling", "cancelled")

    def refused(call: object, *args: object, **kwargs: object) -> ApiError:
        with pytest.raises(ApiError) as caught:
            call(*args, **kwargs)  # type: ignore[operator]
        return caught.value

    e = refused(client.submit_upload, image.read_bytes(), ["digit1", "cat"])
    assert e.status_code == 422 and "unknown class" in e.detail and "unknown class" in str(e)
    e = refused(client.submit_job, manifest_uri=f"s3://{BUCKET}/inputs/set.jsonl", images=records(1, ["digit1"]))
    assert (e.status_code, e.method, e.path) == (422, "POST", "/v1/jobs") and "exactly one of" in e.detail
    e = refused(client.submit_job, images=[*records(1, ["digit1"]), *records(1, ["digit2"])])
    assert e.errors == [{"item": 2, "error": "duplicate id 'im0'"}] and "1 invalid" in e.detail
    assert json.dumps(e.errors[0]) in str(e)  # the message shows what to fix, line by line
    e = refused(client.submit_pipeline, f"s3://{BUCKET}/inputs/set.jsonl")  # a classifier to train: batch 16
    assert e.status_code == 422 and "fewer than one batch" in e.detail
    e = refused(RibClient(api_key="nope", http=api.client).status, bulk.job_id)
    assert e.status_code == 401 and "wrong API key" in e.detail
    assert refused(client.status, "0" * 32).status_code == 404
    e = refused(client.export, bulk.job_id, "coco", api.settings.storage_uri)
    assert e.status_code == 409 and "nothing to export yet" in e.detail
    e = refused(client.export, bulk.job_id, "tiff", ".")
    assert e.status_code == 422 and e.errors  # FastAPI's own validation answer, its items kept
    assert refused(lambda: list(client.results(bulk.job_id, page_size=1001))).status_code == 422


def test_wait_draws_progress_and_results_page_through(api: Api, client: RibClient) -> None:
    job = client.submit_job(images=records(5, ["digit3"]))
    jobs = store(api)
    for image_id in ("im0", "im1"):
        assert jobs.begin(job.job_id, image_id, 3) == "run"
        jobs.mark_done(job.job_id, image_id, FILES, 2.0)
    assert jobs.begin(job.job_id, "im2", 3) == "run"
    shown = io.StringIO()
    with pytest.raises(WaitTimeoutError) as timed_out:
        client.wait(job.job_id, timeout=0, progress=shown)
    running = timed_out.value.status
    assert running.state == "running" and running.progress.images_per_minute is not None
    fraction, words = describe(running)
    assert fraction == 2 / 5 and "2/5" in words and f"ETA {duration(running.progress.eta_s or 0)}" in words
    assert shown.getvalue() == f"job {job.job_id[:8]} [{'#' * 10}{'.' * 14}] {words}\n"  # not a terminal: lines

    jobs.mark_failed(job.job_id, "im2", "ImageError: not a readable image")
    for image_id in ("im3", "im4"):
        assert jobs.begin(job.job_id, image_id, 3) == "run"
        jobs.mark_done(job.job_id, image_id, FILES, 2.0)
    spec = jobs.read_spec(job.job_id, Records(client_storage(api), api.settings.signing_key()))
    assert jobs.count_chunk(job.job_id, spec, Send("images", 0), {}, client_storage(api)) == 1  # the job's end
    done = client.wait(job.job_id, progress=shown, interval=0.01)
    assert done.finished and done.state == "done" and (done.counts.done, done.counts.failed) == (4, 1)
    assert shown.getvalue().splitlines()[-1].startswith(f"job {job.job_id[:8]} [{'#' * 24}] 5/5, 1 failed, done")

    items = list(client.results(job.job_id, page_size=2))  # three pages
    assert [it.id for it in items] == [f"im{i}" for i in range(5)]
    assert [it.status for it in items] == ["done", "done", "failed", "done", "done"]
    assert items[2].error == "ImageError: not a readable image" and items[2].mask is None
    assert all(it.mask and it.mask.key.endswith(f"/{it.id}/crf_mask.png") for it in items if it.status == "done")


def _remote(url: str, *args: str, via_rib: bool = False) -> subprocess.CompletedProcess[str]:
    module = ["rib_core.cli", "remote"] if via_rib else ["rib_client"]
    return subprocess.run([sys.executable, "-m", *module, "--url", url, "--api-key", API_KEY, *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_the_command_line_submits_and_reports_over_http(api: Api, demo: DemoDataset, tmp_path: Path) -> None:
    record = demo.val.records[1]
    image = demo.val.image_uri(record)
    with served(api.client.app) as url:
        out = _remote(url, "upload", image, "--labels", ",".join(record.labels), "--image-id", "cli-upload")
        assert out.returncode == 0, out.stderr
        accepted = json.loads(out.stdout)
        assert accepted["image_id"] == "cli-upload" and accepted["state"] == "queued"
        out = _remote(url, "status", accepted["job_id"], via_rib=True)  # `rib remote` runs the same program
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["counts"]["queued"] == 1
        out = _remote(url, "wait", accepted["job_id"], "--timeout", "0")
        assert out.returncode == 1 and "still queued" in out.stderr and "0/1" in out.stderr
        (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(2, ["nope"])))
        out = _remote(url, "job", "--images", str(tmp_path / "records.jsonl"))
        assert out.returncode == 3 and "422 POST /v1/jobs" in out.stderr and "unknown class" in out.stderr
        out = _remote(url, "results", accepted["job_id"], "--page-size", "1")
        assert out.returncode == 0 and json.loads(out.stdout)["status"] == "queued"
        assert _remote(url, "cancel", accepted["job_id"]).returncode == 0
    out = _remote(url, "status", accepted["job_id"])  # the server is gone
    assert out.returncode == 1 and "error" in out.stderr


# ----------------------------------------------------------------------------- the real stack


@pytest.fixture(scope="module")
def stack(demo: DemoDataset, classifier_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(demo, classifier_path, tmp_path_factory.mktemp("client-logs")) as stack:
        yield stack


def test_an_upload_and_a_bulk_job_end_to_end(stack: Stack, tmp_path: Path) -> None:
    val = stack.val
    with RibClient(stack.url, API_KEY, timeout=120) as client:
        record = max(val.records, key=lambda r: len(r.labels))
        upload = client.submit_upload(val.image_uri(record), list(record.labels))
        shown = io.StringIO()
        status = client.wait(upload.job_id, timeout=240, interval=0.5, progress=shown)
        assert status.state == "done", status
        assert shown.getvalue().splitlines()[-1].startswith(f"job {upload.job_id[:8]} [{'#' * 24}] 1/1, done")
        manifest = upload_dataset(stack.s3, BUCKET, "client-inputs", val)
        images = [{"id": r.id, "image": manifest.rsplit("/", 1)[0] + "/" + r.image, "labels": list(r.labels)}
                  for r in val.records[:3]]
        bulk = client.submit_job(images=images)
        status = client.wait(bulk.job_id, timeout=300, interval=0.5, progress=shown)
        assert status.state == "done" and status.counts.done == 3, status
        items = list(client.results(bulk.job_id, page_size=2))
        assert [it.id for it in items] == [r.id for r in val.records[:3]]
        for it in items:
            assert it.mask is not None  # the presigned link downloads what the worker stored
            assert client_download(it.mask.url, tmp_path / it.id) == stack.get(it.mask.uri.split("/", 3)[3])
        archive = client.export(bulk.job_id, "coco", tmp_path)
    assert archive == tmp_path / f"{bulk.job_id}-coco.zip"
    with zipfile.ZipFile(archive) as z:
        coco = json.loads(z.read(next(n for n in z.namelist() if n.endswith(".json"))))
    assert len(coco["images"]) == 3 and {c["name"] for c in coco["categories"]} <= set(val.classes)


def client_download(url: str, dest: Path) -> bytes:
    download(url, dest)
    return dest.read_bytes()
