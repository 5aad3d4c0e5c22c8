"""The API's OpenAPI document is complete (issue 25, part 4): every request field has a description,
every schema an example, every route its error responses with the one error body; and the typed
request bodies carry the stage configs' own fields and bounds. Read from the real app's
``/openapi.json``; the error answers checked against the documented model are the real app's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from contract.settings import Settings
from rib_core.config.network_configs import ClassifierTrainConfig, DeepLabTrainConfig
from rib_core.config.rib_config import RibConfig
from rib_core.config.stage_configs import RefineConfig
from service.app import create_app
from service.errors import ErrorBody

REF = "#/components/schemas/"
KEY = "the-key"
MAX_UPLOAD = 4096
BOUNDS = {"Ge": ("minimum", "ge"), "Le": ("maximum", "le"), "Gt": ("exclusiveMinimum", "gt"),
          "Lt": ("exclusiveMaximum", "lt")}  # annotated_types' constraint -> JSON schema key, attribute


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The app with no Redis or S3 behind it: every call made here is answered before either is used."""
    settings = Settings(storage_uri=str(tmp_path_factory.mktemp("results")), api_keys=KEY,
                        max_upload_bytes=MAX_UPLOAD)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def spec(client: TestClient) -> dict[str, Any]:
    return client.get("/openapi.json").json()


def _refs(node: Any) -> Iterator[str]:
    """Every schema name ``node`` refers to, at any depth."""
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"].removeprefix(REF)
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _request_schemas(spec: dict[str, Any]) -> set[str]:
    """The schemas a request body is made of: those its body refers to, and theirs in turn."""
    schemas = spec["components"]["schemas"]
    todo = [name for ops in spec["paths"].values() for op in ops.values() for name in _refs(op.get("requestBody"))]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_refs(schemas[name]))
    return seen


def _operations(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            yield f"{method.upper()} {path}", op


def test_every_request_field_has_a_description(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    requests = _request_schemas(spec)
    assert {"JobRequest", "PipelineRequest", "UploadForm", "TrainingJobRequest", "RibConfigFields",
            "RefineConfigFields", "CrfConfigFields", "ClassifierTrainConfigFields", "DeepLabTrainConfigFields"
            } <= requests, requests
    bare = [f"{name}.{field}" for name in sorted(requests)
            for field, prop in schemas[name].get("properties", {}).items() if not prop.get("description")]
    assert not bare, bare


def test_every_schema_has_an_example(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    assert len(schemas) > 30
    assert not [name for name, schema in schemas.items() if not (schema.get("examples") or schema.get("example"))]


def test_every_route_documents_its_errors_with_the_error_body(spec: dict[str, Any]) -> None:
    """What a route can answer follows from what it takes: an API key (every /v1 and /ls route: 401),
    a job id in the path (404), a body (413, 422), any parameter (422). Each error answer is the one
    error body, except /readyz's 503, which is its readiness report."""
    missing, other_body = [], []
    for name, op in _operations(spec):
        params = op.get("parameters", [])
        expected = {"401"} if name.split()[1].startswith(("/v1/", "/ls/")) else set()
        expected |= {"404"} if any(p["in"] == "path" for p in params) else set()
        expected |= {"413", "422"} if "requestBody" in op else set()
        expected |= {"422"} if params else set()
        if not expected <= set(op["responses"]):
            missing.append((name, sorted(expected - set(op["responses"]))))
        for code, response in op["responses"].items():
            schema = response.get("content", {}).get("application/json", {}).get("schema", {})
            if code >= "400" and schema.get("$ref") != REF + "ErrorBody" and name != "GET /readyz":
                other_body.append((name, code, schema))
    assert not missing, missing
    assert not other_body, other_body
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # FastAPI's own 422 shape is never answered


@pytest.mark.parametrize(("section", "config"), [("rib", RibConfig), ("refine", RefineConfig),
                                                 ("classifier", ClassifierTrainConfig),
                                                 ("deeplab", DeepLabTrainConfig)])
def test_a_stage_section_shows_its_configs_fields_and_bounds(spec: dict[str, Any], section: str,
                                                             config: type) -> None:
    """The pipeline request's stage settings are the config's fields, none required, with its bounds
    and descriptions (one spelling: a field added to the config is in the API)."""
    schemas = spec["components"]["schemas"]
    ref = next(_refs(schemas["PipelineRequest"]["properties"][section]))
    body = schemas[ref]
    assert set(body["properties"]) == set(config.model_fields) and not body.get("required")
    assert body["additionalProperties"] is False
    checked = set()
    for name, field in config.model_fields.items():
        prop = body["properties"][name]
        assert prop["description"] == field.description, name
        assert "default" not in prop, name  # a field left out takes the service's default, not the config's
        for m in field.metadata:
            key, attr = BOUNDS.get(type(m).__name__, (None, None))
            if key is not None:
                shown = prop.get(key, next((s[key] for s in prop.get("anyOf", []) if key in s), None))
                assert shown == getattr(m, attr), (name, key, prop)
                checked.add(name)
    assert checked  # the configs' bounds were compared


def test_the_error_answers_are_the_documented_body(client: TestClient) -> None:
    """A missing key, an oversized body and a bad stage field each answer with ErrorBody; a field of
    a stage's settings is named relative to them, the detail names the settings."""
    answers = {
        401: client.post("/v1/pipelines", json={}),
        413: client.post("/v1/pipelines", content=b"{" + b" " * MAX_UPLOAD * 20 + b"}",
                         headers={"X-API-Key": KEY, "Content-Type": "application/json"}),
        422: client.post("/v1/pipelines", headers={"X-API-Key": KEY},
                         json={"manifest_uri": "s3://data/m.jsonl", "refine": {"crf": {"iterations": 0}}}),
    }
    for status, r in answers.items():
        assert r.status_code == status, (status, r.text)
        ErrorBody.model_validate(r.json())
    bad = answers[422].json()
    assert bad["detail"].startswith("invalid refinement parameters: crf.iterations")
    assert [e["field"] for e in bad["errors"]] == ["crf.iterations"]


def test_the_checks_that_moved_into_the_rib_config_hold(client: TestClient) -> None:
    """Scales within (0, 4] and loss scales among the map scales are RibConfig's rules now: a request
    breaking them is refused by the typed body or the merged config, with the field named."""
    cases = [({"map_scales": [1.0, 9.0]}, "map_scales.1"), ({"map_scales": [1.0, 0]}, "map_scales.1"),
             ({"loss_scales": []}, "loss_scales"), ({"loss_scales": [1.5], "map_scales": [1.0]}, "")]
    for rib, field in cases:
        r = client.post("/v1/pipelines", headers={"X-API-Key": KEY}, json={"manifest_uri": "s3://data/m.jsonl",
                                                                          "rib": rib})
        assert r.status_code == 422 and r.json()["detail"].startswith("invalid RIB parameters"), (rib, r.text)
        assert [e["field"] for e in r.json()["errors"]] == [field], (rib, r.text)
