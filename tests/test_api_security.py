"""Security and robustness of the API and the training jobs (issue 14): no unpickling of foreign files,
allowed input and output locations, tenancy, bounded validation and the shape of every error.

In-process (tests/api_inprocess.py): the app under Starlette's TestClient, a private redis-server
and moto's S3 server. No worker runs: these are the API's own decisions.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import numpy as np
import pytest
import redis
import torch
from PIL import Image

from contract.job_kinds import IMAGE
from contract.pipelines import PipelineStore
from contract.settings import Settings
from rib_core.config.network_configs import DeepLabTrainConfig
from rib_core.data.datasets import Manifest, ManifestRecord
from rib_core.data.importers import _voc_labels_from_npy
from rib_core.deeplab.job import train_deeplab
from rib_core.io.artifacts import image_key
from rib_core.io.storage import open_storage
from rib_core.training.checkpoints import CheckpointError
from service.deps import broker, job_store, result_storage
from tests.api_inprocess import BUCKET, Api, inprocess_api
from tests.planted import RunsCode
from tests.service_stack import free_port, s3, wait_for


def test_planted_training_state_is_refused_without_running_its_code(tmp_path: Path) -> None:
    """A checkpoint under a training output's checkpoints/ is read as tensors and plain data only."""
    marker = tmp_path / "code-ran"
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"config": {}, "model": {}, "step": 1, "payload": RunsCode(marker)},
               out / "checkpoints" / "step_00000001.pth")
    manifest = Manifest(["a"], [ManifestRecord("x", "x.png", ("a",), "x_mask.png")], str(tmp_path))
    cfg = DeepLabTrainConfig(arch="resnet18", batch_size=1, iterations=1, msc_scales=[], retrain=False)
    with pytest.raises(CheckpointError, match=r"refusing to resume from .*step_00000001\.pth"):
        train_deeplab(manifest, out, cfg, progress=False)
    assert not marker.exists()


# ----------------------------------------------------------------------------- the API in-process

API_KEY, OTHER_KEY = "key-of-alice", "key-of-bob"
CLASSES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """The app on a private redis-server and moto's S3 server, results in s3://rib/results."""
    with inprocess_api(tmp_path_factory.mktemp("redis"), CLASSES, [API_KEY, OTHER_KEY],
                       max_manifest_bytes=20000, max_job_images=100) as api:
        header = json.dumps({"format": "rib-manifest", "version": 1, "classes": CLASSES})
        line = json.dumps({"id": "a", "image": "a.png", "labels": ["cat"]})
        api.s3.put_object(Bucket=BUCKET, Key="data/m.jsonl", Body=f"{header}\n{line}\n".encode())
        yield api


def test_default_locations_are_the_configured_bucket_and_storage(tmp_path: Path) -> None:
    s3_settings = Settings(storage_uri="s3://data/results")
    assert s3_settings.input_prefixes == ["s3://data/"] and s3_settings.results_prefix == "s3://data/results/"
    local = Settings(storage_uri=str(tmp_path / "results"))
    assert local.input_prefixes == [] and local.results_prefix == f"{tmp_path}/results/"
    given = Settings(storage_uri="s3://data/results", input_prefixes="s3://a/,s3://b/x/")
    assert given.input_prefixes == ["s3://a/", "s3://b/x/"]


def test_training_locations_are_checked_and_the_output_is_the_services(api: Api) -> None:
    api.s3.put_object(Bucket=BUCKET, Key="data/c.pth", Body=b"a checkpoint")
    base = {"kind": "train", "manifest": f"s3://{BUCKET}/data/m.jsonl", "config": {"arch": "resnet18"}}
    cases = {
        "checkpoint in another bucket": ({"kind": "evaluate", "checkpoint": "s3://attacker/c.pth"}, "checkpoint",
                                         "RIB_INPUT_PREFIXES"),
        "checkpoint in the results": ({"kind": "evaluate", "checkpoint": f"s3://{BUCKET}/results/jobs/x/d.pth"},
                                      "checkpoint", "inside the service's results"),
        "checkpoint that does not exist": ({"kind": "evaluate", "checkpoint": f"s3://{BUCKET}/data/none.pth"},
                                           "checkpoint", "nothing at"),
        "worker-local init weights": ({"config": {"arch": "resnet18", "init_weights": "/root/.ssh/id_rsa"}},
                                      "config.init_weights", "RIB_INPUT_PREFIXES"),
    }
    for name, (change, field, message) in cases.items():
        r = api.post("/v1/training-jobs", json={**base, **change})
        assert r.status_code == 422, (name, r.text)
        errors = r.json()["errors"]
        assert [e["field"] for e in errors] == [field] and message in errors[0]["error"], (name, errors)
    r = api.post("/v1/training-jobs", json={**base, "output": "s3://attacker/run"})
    assert r.status_code == 422 and "output is chosen by the service" in r.text, r.text
    r = api.post("/v1/training-jobs", json={**base, "manifest": "s3://attacker/m.jsonl"})
    assert r.status_code == 422 and "RIB_INPUT_PREFIXES" in r.text, r.text
    # Inputs of image jobs too: the configured bucket only, not every bucket, and never the results.
    r = api.post("/v1/jobs", json={"images": [{"id": "a", "image": "s3://attacker/a.png", "labels": ["cat"]}]})
    assert r.status_code == 422 and "RIB_INPUT_PREFIXES" in r.json()["errors"][0]["error"], r.text
    r = api.post("/v1/jobs", json={"images": [{"id": "a", "image": f"s3://{BUCKET}/results/jobs/x/a.png",
                                               "labels": ["cat"]}]})
    assert r.status_code == 422 and "inside the service's results" in r.text, r.text


def png(size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((*size, 3), 120, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def upload(api: Api, key: str = API_KEY, **params: Any) -> httpx.Response:
    return api.post("/v1/images", key, params=params, files={"file": ("scene.png", png(), "image/png")},
                    data={"labels": "cat"})


def test_jobs_belong_to_the_key_that_made_them(api: Api) -> None:
    r = upload(api)
    assert r.status_code == 202, r.text
    image_job = r.json()["job_id"]
    r = api.post("/v1/jobs", json={"images": [{"id": "a", "image": f"s3://{BUCKET}/a.png", "labels": ["cat"]}]})
    assert r.status_code == 202, r.text
    bulk_job = r.json()["job_id"]
    r = api.post("/v1/training-jobs", json={"kind": "train", "manifest": f"s3://{BUCKET}/data/m.jsonl",
                                            "config": {"arch": "resnet18"}})
    assert r.status_code == 202, r.text
    training_job = r.json()["job_id"]
    for job_id in (image_job, bulk_job):
        for method, path in (("get", f"/v1/jobs/{job_id}"), ("get", f"/v1/jobs/{job_id}/results"),
                             ("delete", f"/v1/jobs/{job_id}")):
            theirs = getattr(api, method)(path, OTHER_KEY)
            assert theirs.status_code == 404 and "no job" in theirs.json()["detail"], (method, path, theirs.text)
        assert api.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"  # untouched by the other key
        assert api.get(f"/v1/jobs/{job_id}/results").status_code == 200
    assert api.get(f"/v1/training-jobs/{training_job}", OTHER_KEY).status_code == 404
    assert api.get(f"/v1/training-jobs/{training_job}").json()["state"] == "queued"
    assert api.delete(f"/v1/jobs/{bulk_job}").json()["state"] == "cancelled"  # the owner can cancel
    # Redis holds the key's digest, never the key.
    r = redis.Redis.from_url(f"{api.redis_url}/0", decode_responses=True)
    stored = [r.hgetall(f"rib:job:{image_job}"), r.hgetall(f"rib:training:{training_job}")]
    assert [d["owner"] for d in stored] == [hashlib.sha256(API_KEY.encode()).hexdigest()] * 2
    assert not [k for k in r.scan_iter() if r.type(k) == "hash" and API_KEY in json.dumps(r.hgetall(k))]


def test_upload_is_stored_only_once_its_job_is_recorded(api: Api) -> None:
    def uploads() -> list[str]:
        return [key for key in api.objects("results/jobs/") if "/uploads/" in key]

    before = uploads()
    nowhere = PipelineStore.from_url(f"redis://127.0.0.1:{free_port()}/0", kind=IMAGE)  # nothing listens
    with api.override(job_store, nowhere):
        r = upload(api)
    assert r.status_code == 503 and "job store is unavailable" in r.json()["detail"], r.text
    assert uploads() == before  # no orphan
    with api.override(result_storage, open_storage("s3://no-such-bucket/results", client=s3(api.endpoint))):
        r = upload(api)
    assert r.status_code == 503 and "results store is unreachable" in r.json()["detail"], r.text
    job_id = r.json()["detail"].split("job ")[1].split()[0]
    status = api.get(f"/v1/jobs/{job_id}").json()
    assert status["state"] == "failed" and "could not be stored" in status["errors"][0]["error"], status


@pytest.mark.parametrize("where", ["s3", "local"])
def test_listing_an_image_folder_lists_only_that_image(api: Api, tmp_path: Path, where: str) -> None:
    storage = (open_storage(f"s3://{BUCKET}/listing-{tmp_path.name}", client=s3(api.endpoint)) if where == "s3"
               else open_storage(str(tmp_path)))
    for image_id in ("d00", "d000", "d009"):
        storage.put(image_key("j" * 32, image_id, "meta.json"), b"{}")
    assert list(storage.list(image_key("j" * 32, "d00"))) == [f"jobs/{'j' * 32}/images/d00/meta.json"]


def test_waiting_uploads_hold_no_thread(api: Api) -> None:
    """With one worker thread for the whole API, /healthz still answers while an upload waits."""
    portal = api.client.portal
    assert portal is not None

    async def thread_tokens(n: float | None) -> float:
        limiter = anyio.to_thread.current_default_thread_limiter()
        old = limiter.total_tokens
        if n is not None:
            limiter.total_tokens = n
        return old

    jobs = redis.Redis.from_url(f"{api.redis_url}/0")
    before = len(list(jobs.scan_iter("rib:job:*:order")))
    old = portal.call(thread_tokens, 1)
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(upload, api, wait=6)  # no worker runs: it waits all 6 s
            wait_for(lambda: len(list(jobs.scan_iter("rib:job:*:order"))) > before, 30, "the upload's job")
            assert api.client.get("/healthz").json() == {"status": "ok"}
            assert not waiting.done()  # /healthz answered while the upload was still waiting
            assert waiting.result().status_code == 202
    finally:
        portal.call(thread_tokens, old)


def test_oversize_manifests_are_refused_before_parsing(api: Api) -> None:
    header = json.dumps({"format": "rib-manifest", "version": 1, "classes": CLASSES})
    api.s3.put_object(Bucket=BUCKET, Key="inputs/long.jsonl", Body="\n".join([header] + ["{not json"] * 101).encode())
    api.s3.put_object(Bucket=BUCKET, Key="inputs/big.jsonl", Body=(header + "\n" + " " * 20_000).encode())
    cases = [
        ({"manifest_uri": f"s3://{BUCKET}/inputs/long.jsonl"}, "RIB_MAX_JOB_IMAGES"),
        ({"manifest_uri": f"s3://{BUCKET}/inputs/big.jsonl"}, "RIB_MAX_MANIFEST_BYTES"),
        ({"images": [{"id": f"i{n}", "image": f"s3://{BUCKET}/i.png", "labels": ["cat"]} for n in range(101)]},
         "RIB_MAX_JOB_IMAGES"),
    ]
    for body, setting in cases:
        r = api.post("/v1/jobs", json=body)
        assert r.status_code == 422 and setting in r.json()["detail"], r.text
        assert not r.json()["errors"], r.text  # refused as a whole: no line was parsed


def test_results_offset_out_of_range_is_a_422(api: Api) -> None:
    job_id = upload(api).json()["job_id"]
    for offset in (10**30, "1e30", -1):
        r = api.get(f"/v1/jobs/{job_id}/results", params={"offset": offset})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "offset", (offset, r.text)
    assert api.get(f"/v1/jobs/{job_id}/results", params={"offset": 10**6}).json()["items"] == []


def test_training_jobs_check_arch_and_buckets(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"kind": "train", "manifest": f"s3://{BUCKET}/data/m.jsonl"}
    r = api.post("/v1/training-jobs", json={**base, "config": {"arch": "resnet9000"}})
    assert r.status_code == 422 and [e["field"] for e in r.json()["errors"]] == ["config.arch"], r.text
    assert "resnet101" in r.json()["errors"][0]["error"]
    monkeypatch.setattr(api.settings, "input_prefixes", [f"s3://{BUCKET}/", "s3://missing-data/"])
    r = api.post("/v1/training-jobs", json={**base, "manifest": "s3://missing-data/m.jsonl"})
    assert r.status_code == 422 and "no manifest at s3://missing-data/m.jsonl" in r.text, r.text


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds nothing: what a decompression bomb looks like to Image.open."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def test_messages_name_the_setting_and_the_media_type(api: Api) -> None:
    def send(data: bytes) -> httpx.Response:
        return api.post("/v1/images", files={"file": ("f.png", data, "image/png")}, data={"labels": "cat"})

    bomb = send(png_header(20_000, 20_000))  # over Pillow's own limit: Image.open refuses it
    assert bomb.status_code == 422 and "RIB_MAX_IMAGE_PIXELS" in bomb.json()["detail"], bomb.text
    assert "DOS" not in bomb.text and str(Image.MAX_IMAGE_PIXELS) not in bomb.text
    text = send(b"hello, I am text")
    assert text.status_code == 422 and "not a readable image" in text.json()["detail"], text.text
    assert "object at 0x" not in text.text
    r = api.post("/v1/images", json={"labels": ["cat"]})
    assert r.status_code == 422 and "multipart/form-data" in r.json()["detail"], r.text
    assert "application/json" in r.json()["detail"]
    r = api.post("/v1/jobs", data={"manifest_uri": f"s3://{BUCKET}/m.jsonl"})
    assert r.status_code == 422 and "reads a application/json body" in r.json()["detail"], r.text
    # FastAPI's own checks answer in the service's shape.
    r = api.post("/v1/training-jobs", json={"kind": "train", "manifest": f"s3://{BUCKET}/m",
                                            "config": {"lr": -1}})
    body = r.json()
    assert r.status_code == 422 and isinstance(body["detail"], str), r.text
    assert body["errors"] == [{"field": "config.lr", "error": "Input should be greater than 0"}]


def test_readyz_times_out_and_hides_internals_without_a_key(api: Api) -> None:
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        mute = PipelineStore.from_url(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", kind=IMAGE)
        with (api.override(job_store, mute),
              api.override(broker, redis.Redis(port=free_port()))):  # nothing listens
            anonymous = api.client.get("/readyz")
            detailed = api.client.get("/readyz", headers={"X-API-Key": API_KEY})
    finally:
        silent.close()
    assert anonymous.status_code == detailed.status_code == 503
    assert anonymous.json()["checks"] == {"redis": "failing", "broker": "failing", "storage": "ok",
                                          "classifier_uri": "failing", "companion_manifest_uri": "ok"}
    assert "127.0.0.1" not in anonymous.text and "s3://" not in anonymous.text
    checks = detailed.json()["checks"]
    assert checks["redis"].startswith("no answer within") and checks["broker"] not in ("ok", "failing"), checks
    assert checks["classifier_uri"] == "not found: None"


def test_irn_label_table_is_read_without_running_code(tmp_path: Path) -> None:
    """IRN's cls_labels.npy is a pickle: only numpy arrays and plain containers are taken from it."""
    eye = np.eye(20, dtype=np.float32)
    np.save(tmp_path / "cls_labels.npy", {2007000032: eye[0] + eye[14], 2008000123: eye[11]})
    assert _voc_labels_from_npy(tmp_path / "cls_labels.npy") == {"2007_000032": ["aeroplane", "person"],
                                                                 "2008_000123": ["dog"]}
    marker = tmp_path / "code-ran"
    np.save(tmp_path / "planted.npy", np.array({"x": RunsCode(marker)}, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not allowed"):
        _voc_labels_from_npy(tmp_path / "planted.npy")
    assert not marker.exists()
