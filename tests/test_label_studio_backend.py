"""The Label Studio ML backend (/ls) on the real stack: uvicorn + a Celery worker + redis-server + moto's
S3, with the requests of Label Studio's ML backend protocol (/health, /setup, /predict with the body
Label Studio sends: tasks, project, label_config, params) and Basic Authentication. Task images come
from S3 and from files "Label Studio" serves: a local HTTP server that, like Label Studio, serves
``/data/upload/...`` only with the project's token. The returned brush RLE is decoded and compared
with the pseudo-mask the job stored, pixel for pixel.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

from rib_core.classifier.cam import LocalizationMap
from rib_core.data.datasets import decode_mask
from rib_core.data.demo_data import DemoDataset
from rib_core.io.artifacts import MAP_NPZ, MARKER, final_files
from tests.service_stack import free_port
from tests.test_service import API_KEY, BUCKET, Stack, running_stack

TOKEN = "label-studio-token"
PROJECT = "1.1733400000"  # Label Studio's project uid: <id>.<created_at>


class LabelStudioFiles:
    """Files served as Label Studio serves uploads: ``/data/upload/<project>/<name>``, with its token only."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        files = self.files

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.headers.get("Authorization") != f"Token {TOKEN}":
                    self.send_response(401)
                    self.end_headers()
                    return
                data = files.get(self.path)
                self.send_response(200 if data is not None else 404)
                self.end_headers()
                self.wfile.write(data or b"")

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def label_studio() -> Iterator[LabelStudioFiles]:
    files = LabelStudioFiles()
    yield files
    files.close()


@pytest.fixture(scope="module")
def stack(demo: DemoDataset, classifier_path: Path, label_studio: LabelStudioFiles,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(demo, classifier_path, tmp_path_factory.mktemp("ls-logs"),
                       RIB_LABEL_STUDIO_URL=label_studio.url, RIB_LABEL_STUDIO_TOKEN=TOKEN,
                       RIB_LABEL_STUDIO_WAIT_S="600") as stack:  # 2 shared CPU cores: a slow first model load
        yield stack


def ls_client(stack: Stack, password: str = API_KEY) -> httpx.Client:
    """A client as Label Studio connects to an ML backend with Basic Authentication."""
    return httpx.Client(base_url=f"{stack.url}/ls", auth=("label-studio", password), timeout=660)


def config(classes: list[str]) -> str:
    """A project's labelling config: image-level Choices and BrushLabels on one image, named as a user would."""
    choices = "".join(f'<Choice value="{c}"/>' for c in classes)
    labels = "".join(f'<Label value="{c}"/>' for c in classes)
    return (f'<View><Image name="img" value="$picture"/>'
            f'<Choices name="classes" toName="img" choice="multiple">{choices}</Choices>'
            f'<BrushLabels name="masks" toName="img">{labels}</BrushLabels></View>')


def predict_body(tasks: list[dict[str, Any]], label_config: str) -> dict[str, Any]:
    """The body Label Studio POSTs to /predict."""
    return {"tasks": tasks, "model_version": None, "project": PROJECT, "label_config": label_config,
            "params": {"login": None, "password": None, "context": None}}


def stored(stack: Stack, image_id: str) -> tuple[np.ndarray, LocalizationMap, dict[str, Any]]:
    """The final pseudo-mask, the map and meta.json the (only) job with this image id stored."""
    keys = [k for k in stack.objects("results/jobs/") if f"/images/{image_id}/" in k]
    folders = {k.rsplit("/", 1)[0] for k in keys}
    assert len(folders) == 1, folders
    (folder,) = folders
    files = final_files(k.rsplit("/", 1)[1] for k in keys)
    lmap = LocalizationMap.from_bytes(stack.get(f"{folder}/{MAP_NPZ}"))
    return decode_mask(stack.get(f"{folder}/{files['mask']}")), lmap, json.loads(stack.get(f"{folder}/{MARKER}"))


def test_health_and_setup_speak_the_protocol_with_basic_auth(stack: Stack) -> None:
    with ls_client(stack) as c:
        health = c.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "UP", health.text
        setup = c.post("/setup", json={"project": PROJECT, "schema": config(stack.train.classes),
                                       "hostname": "http://localhost:8080", "access_token": "abc"})
        assert setup.status_code == 200 and setup.json()["model_version"] == health.json()["model_version"], setup.text
        no_brush = c.post("/setup", json={"project": PROJECT, "schema": '<View><Image name="i" value="$i"/></View>'})
        assert no_brush.status_code == 422 and "no BrushLabels tag" in no_brush.json()["detail"], no_brush.text
        other = c.post("/setup", json={"schema": '<View><Image name="i" value="$i"/><BrushLabels name="b" '
                                                 'toName="i"><Label value="cat"/></BrushLabels></View>'})
        assert other.status_code == 422 and "is a class of the model" in other.json()["detail"], other.text
    for client in (ls_client(stack, "wrong"), httpx.Client(base_url=f"{stack.url}/ls")):
        with client as c:
            assert c.get("/health").status_code == 401 and c.post("/predict", json={"tasks": []}).status_code == 401
    # The service's own API key header works too.
    assert httpx.get(f"{stack.url}/ls/health", headers={"X-API-Key": API_KEY}).status_code == 200


def test_predict_returns_brush_masks_equal_to_the_stored_ones(stack: Stack, label_studio: LabelStudioFiles) -> None:
    classes = stack.train.classes
    a, b, c = sorted(stack.val.records, key=lambda r: -len(r.labels))[:3]
    stack.s3.put_object(Bucket=BUCKET, Key="ls/a.png", Body=Path(stack.val.image_uri(a)).read_bytes())
    label_studio.files["/data/upload/1/b.png"] = Path(stack.val.image_uri(b)).read_bytes()
    tasks = [
        # labels in the task's data; the image on S3
        {"id": 11, "data": {"picture": f"s3://{BUCKET}/ls/a.png", "labels": ",".join(a.labels)},
         "annotations": [], "predictions": []},
        # labels chosen by an annotator (Choices); the image uploaded to Label Studio
        {"id": 12, "data": {"picture": "/data/upload/1/b.png"}, "predictions": [],
         "annotations": [{"id": 5, "result": [{"id": "x", "from_name": "classes", "to_name": "img", "type": "choices",
                                               "value": {"choices": list(b.labels)}}]}]},
        # no labels: the classifier's
        {"id": 13, "data": {"picture": f"s3://{BUCKET}/ls/c.png"}},
    ]
    stack.s3.put_object(Bucket=BUCKET, Key="ls/c.png", Body=Path(stack.val.image_uri(c)).read_bytes())
    with ls_client(stack) as client:
        r = client.post("/predict", json=predict_body(tasks, config(classes)))
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 3
    for task, record, prediction in zip(tasks, (a, b, c), body["results"], strict=True):
        assert prediction["model_version"] == body["model_version"]
        mask, lmap, meta = stored(stack, f"task-{task['id']}")
        if task["id"] == 13:
            assert meta["stats"]["labels_from"] == "classifier" and set(meta["classes"]) <= set(classes)
        else:
            assert meta["stats"]["labels_from"] == "request" and set(meta["classes"]) == set(record.labels)
        present = {int(v) for v in np.unique(mask) if 0 < v < 255}
        assert present and present <= {classes.index(name) + 1 for name in meta["classes"]}
        regions = prediction["result"]
        assert {r["value"]["brushlabels"][0] for r in regions} == {classes[v - 1] for v in present}
        for region in regions:
            assert (region["from_name"], region["to_name"], region["type"]) == ("masks", "img", "brushlabels")
            height, width = region["original_height"], region["original_width"]
            assert (height, width) == mask.shape
            painted = np.reshape(decode_rle(region["value"]["rle"]), (height, width, 4))[:, :, 3] == 255
            value = classes.index(region["value"]["brushlabels"][0]) + 1
            assert np.array_equal(painted, mask == value)
            channel = lmap.high_res[lmap.keys.tolist().index(value - 1)]
            assert region["score"] == pytest.approx(float(channel[mask == value].mean()), rel=1e-6)
        assert 0 < prediction["score"] <= 1
        assert prediction["score"] == pytest.approx(np.mean([region["score"] for region in regions]))


@pytest.mark.parametrize(("task", "message"), [
    ({"id": 22, "data": {"picture": "s3://rib/ls/a.png", "labels": "digit0,cat"}}, "cat"),
    ({"id": 23, "data": {"picture": "s3://elsewhere/a.png", "labels": "digit1"}}, "outside the allowed locations"),
    ({"id": 24, "data": {"picture": "https://example.com/a.png", "labels": "digit1"}}, "RIB_LABEL_STUDIO_URL"),
    ({"id": 25, "data": {"picture": "/data/upload/1/missing.png", "labels": "digit1"}}, "Label Studio answered 404"),
    ({"id": 26, "data": {"labels": "digit1"}}, "no image in data.picture"),
])
def test_predict_refuses_tasks_it_cannot_run_with_what_to_fix(stack: Stack, task: dict[str, Any], message: str) -> None:
    with ls_client(stack) as c:
        r = c.post("/predict", json=predict_body([task], config(stack.train.classes)))
    assert r.status_code == 422 and message in r.json()["detail"] and f"task {task['id']}" in r.json()["detail"], r.text
