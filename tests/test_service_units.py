"""Job bookkeeping on a real (private) redis-server, input validation and settings, without workers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from contract.job_kinds import IMAGE
from contract.job_requests import ImageJobSpec, JobItem
from contract.pipelines import PipelineStore
from contract.settings import Settings
from contract.stages import PipelineSpec, Send
from contract.worker_reports import stats
from rib_core.config.network_configs import DEEPLAB_CRF
from rib_core.config.rib_config import RibConfig
from rib_core.io.artifacts import image_key, index_key
from rib_core.io.storage import LocalStorage
from service.validation import (
    InputError,
    Locations,
    deeplab_params,
    default_image_id,
    manifest_items,
    parse_labels,
    refine_params,
    rib_params,
)
from tests.service_stack import redis_server

CLASSES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PipelineStore]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield PipelineStore.from_url(f"{url}/0", ttl_s=600, kind=IMAGE)


def items(*ids: str) -> list[JobItem]:
    return [JobItem(i, f"s3://b/{i}.png", ("cat",)) for i in ids]


def job(store: PipelineStore, n: int, chunk_size: int = 8) -> tuple[str, ImageJobSpec]:
    job_id = f"{n:032x}"
    spec = ImageJobSpec("bulk", items(*[f"img{i}" for i in range(n)]), {"iterations": 2}, {}, chunk_size)
    store.create(job_id, spec)
    return job_id, spec


def test_counts_stay_exact_when_a_chunk_runs_twice(store: PipelineStore, tmp_path: Path) -> None:
    job_id, spec = job(store, 3)
    assert store.status(job_id)["state"] == "queued"
    assert store.begin(job_id, "img0", 3) == "run"
    store.mark_done(job_id, "img0", ["meta.json", "map.npz"], 1.5)
    assert store.begin(job_id, "img1", 3) == "run"  # ... and its worker dies here
    assert store.status(job_id)["counts"] == {"running": 1, "done": 1, "failed": 0, "skipped": 0, "queued": 1}
    # The chunk is delivered again: img0 is not redone, img1 is, img2 runs for the first time.
    assert store.begin(job_id, "img0", 3) == "finished"
    assert store.begin(job_id, "img1", 3) == "run"
    store.mark_done(job_id, "img1", ["meta.json"], None)  # its results were already written
    assert store.begin(job_id, "img2", 3) == "run"
    store.mark_failed(job_id, "img2", "cannot read s3://b/img2.png")
    store.mark_failed(job_id, "img2", "cannot read s3://b/img2.png")  # a rerun reports it again
    status = store.status(job_id)
    assert status["counts"] == {"running": 0, "done": 2, "failed": 1, "skipped": 0, "queued": 0}
    assert status["state"] == "done" and status["timing"]["mean_image_s"] == 0.75
    assert status["errors"] == [{"id": "img2", "error": "cannot read s3://b/img2.png"}]
    assert [(i["id"], i["status"], i["attempts"]) for i in store.items(job_id)] == [
        ("img0", "done", 1), ("img1", "done", 2), ("img2", "failed", 1)]
    assert [i["id"] for i in store.items(job_id, 1, 1)] == ["img1"]
    storage = LocalStorage(tmp_path)
    assert store.count_chunk(job_id, spec, Send("images", 0), {}, storage) == 1  # the chunk completes the job
    assert store.stage_state(job_id, "images") == "done"
    index = json.loads(storage.get(f"jobs/{job_id}/index.json"))
    assert index["counts"] == status["counts"] and index["rib"] == {"iterations": 2}
    assert index["images"][0]["artifacts"] == {"map.npz": image_key(job_id, "img0", "map.npz"),
                                               "meta.json": image_key(job_id, "img0", "meta.json")}


def test_cancel_skips_only_images_not_started(store: PipelineStore, tmp_path: Path) -> None:
    job_id, spec = job(store, 4, chunk_size=2)  # chunks [img0, img1] and [img2, img3]
    storage = LocalStorage(tmp_path)
    assert store.begin(job_id, "img0", 3) == "run"
    assert store.begin(job_id, "img1", 3) == "run"
    store.mark_done(job_id, "img1", ["meta.json"], 1.0)
    store.cancel(job_id, storage)
    assert store.status(job_id)["counts"]["skipped"] == 2
    assert store.status(job_id)["state"] == "cancelling"  # img0 is still running
    assert not storage.exists(index_key(job_id))          # not finished: no index yet
    assert store.begin(job_id, "img2", 3) == "finished"      # skipped already: the worker does nothing
    assert store.begin(job_id, "img0", 3) == "run"           # started before the cancel: finished whole
    store.mark_done(job_id, "img0", ["meta.json"], 1.0)
    status = store.status(job_id)
    assert status["state"] == "cancelled"
    assert status["counts"] == {"running": 0, "done": 2, "failed": 0, "skipped": 2, "queued": 0}
    assert not storage.exists(index_key(job_id))  # img0's chunk has not counted itself yet
    assert store.count_chunk(job_id, spec, Send("images", 0), {}, storage) == 1  # img0's chunk ends the job
    assert store.count_chunk(job_id, spec, Send("images", 1), {}, storage) == 0  # counted by the cancel
    assert json.loads(storage.get(index_key(job_id)))["state"] == "cancelled"
    store.cancel(job_id, storage)  # idempotent
    assert store.status(job_id)["counts"] == status["counts"]
    assert store.begin("f" * 32, "img0", 3) == "missing"
    store.cancel("f" * 32, storage)  # a job Redis does not have is not recreated
    assert not store.exists("f" * 32)


def test_a_cancel_with_nothing_running_ends_the_job_itself(store: PipelineStore, tmp_path: Path) -> None:
    job_id, spec = job(store, 5, chunk_size=2)
    storage = LocalStorage(tmp_path)
    assert store.begin(job_id, "img0", 3) == "run"
    store.mark_done(job_id, "img0", ["meta.json"], 1.0)
    store.cancel(job_id, storage)  # every chunk is accounted for: the cancel completes the stage
    assert store.stage_state(job_id, "images") == "done"
    assert json.loads(storage.get(index_key(job_id)))["counts"] == {
        "running": 0, "done": 1, "failed": 0, "skipped": 4, "queued": 0}
    assert store.advance(job_id, spec, 60) == []  # terminal: nothing more is sent
    assert job_id not in store.r.smembers(IMAGE.active_key)


def test_the_job_ends_with_its_last_image_though_a_chunk_died_uncounted(store: PipelineStore, tmp_path: Path) -> None:
    job_id, spec = job(store, 6, chunk_size=2)  # chunks [img0, img1], [img2, img3], [img4, img5]
    storage = LocalStorage(tmp_path)
    for n in range(6):
        assert store.begin(job_id, f"img{n}", 3) == "run"
        store.mark_done(job_id, f"img{n}", ["meta.json"], 1.0)
        if n == 3:  # chunk 0's worker died after its last image, before counting it
            assert store.count_chunk(job_id, spec, Send("images", 1), {}, storage) == 0
    assert store.count_chunk(job_id, spec, Send("images", 2), {}, storage) == 1  # it counts chunk 0 too
    assert json.loads(storage.get(index_key(job_id)))["state"] == "done"
    assert store.count_chunk(job_id, spec, Send("images", 0), {}, storage) == 0  # its redelivery: nothing more


def test_all_failed_is_a_failed_job(store: PipelineStore) -> None:
    job_id, _ = job(store, 1)
    store.begin(job_id, "img0", 3)
    store.mark_failed(job_id, "img0", "bad")
    assert store.status(job_id)["state"] == "failed"
    assert stats(store.r)["images_failed"] >= 1


def test_manifest_lines_and_service_rules() -> None:
    header = json.dumps({"format": "rib-manifest", "version": 1, "classes": ["cat", "dog", "bird", "fish"]})
    text = "\n".join([header, "", json.dumps({"id": "a", "image": "a.png", "labels": ["cat"]}), "",
                      json.dumps({"id": "b", "image": "b.png", "labels": ["fish"]}),
                      json.dumps({"id": "c", "image": "/tmp/c.png", "labels": ["dog"]})])
    with pytest.raises(InputError) as e:
        manifest_items(text, "s3://bucket/data", CLASSES, Locations(["s3://bucket/"]), 100)
    assert e.value.status == 422
    assert [(x["line"], x["error"].split()[0]) for x in e.value.errors] == [(5, "'b'"), (6, "'/tmp/c.png'")]
    good = manifest_items("\n".join(text.splitlines()[:4]), "s3://bucket/data", CLASSES,
                          Locations(["s3://bucket/"]), 100)
    assert good == [JobItem("a", "s3://bucket/data/a.png", ("cat",))]
    # Without a header line the model's classes apply.
    plain = json.dumps({"id": "x", "image": "x.png", "labels": ["dog"]})
    assert manifest_items(plain, "s3://bucket", CLASSES, Locations(["s3://"]), 100)[0].labels == ("dog",)


def test_rib_parameters_override_the_defaults_within_bounds() -> None:
    defaults = RibConfig(iterations=3, companions=4)
    cfg = rib_params('{"tau": 0.5}', defaults, 1024)
    assert (cfg.iterations, cfg.companions, cfg.tau) == (3, 4, 0.5)
    assert rib_params(None, defaults, 1024) == defaults
    # A request's preset fills what the service's defaults leave to the preset; they keep the rest.
    coco = rib_params({"preset": "coco"}, defaults, 1024)
    assert (coco.lr, coco.companions, coco.tau, coco.iterations) == (5e-6, 4, 0.5, 3)
    for bad, message in (({"pooling": "max"}, "invalid RIB"), ({"map_scales": [1.0, 9.0]}, "scales"),
                         ({"loss_scales": [3.0]}, "loss scale"), ([1, 2], "JSON object"),
                         ({"resize_long": [320, 4096]}, "invalid RIB"),
                         ({"crop_size": 100_000}, "invalid RIB"), ({"unknown": 1}, "invalid RIB")):
        with pytest.raises(InputError, match=message):
            rib_params(bad, defaults, 1024)


def test_a_nested_section_given_in_part_keeps_the_rest_of_its_default() -> None:
    """DeepLab's CRF defaults are not CrfConfig's: a request that changes one CRF field keeps DeepLab's others."""
    cfg = deeplab_params({"crf": {"iterations": 5}})
    assert cfg.crf == DEEPLAB_CRF.model_copy(update={"iterations": 5})
    assert deeplab_params({}).crf == DEEPLAB_CRF


def test_small_helpers() -> None:
    assert parse_labels(["cat, dog", "bird", "cat", " "]) == ["cat", "dog", "bird"]
    assert default_image_id("../../My Photo (1).JPG") == "My_Photo__1_"
    assert default_image_id(".hidden") == "hidden"


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RIB_API_KEYS", "a, b ,")
    monkeypatch.setenv("RIB_INPUT_PREFIXES", "s3://data/,/mnt/data/")
    monkeypatch.setenv("RIB_RIB_DEFAULTS", '{"iterations": 4}')
    monkeypatch.setenv("RIB_RIB_DEFAULTS__CROP_SIZE", "256")
    s = Settings()
    assert s.api_keys == ["a", "b"] and s.input_prefixes == ["s3://data/", "/mnt/data/"]
    assert (s.rib_defaults.iterations, s.rib_defaults.crop_size, s.rib_defaults.tau) == (4, 256, 0.4)
    assert s.state_redis_url == s.broker_url
    monkeypatch.setenv("RIB_VISIBILITY_TIMEOUT_S", "60")
    monkeypatch.setenv("RIB_CHUNK_TIME_LIMIT_S", "120")
    with pytest.raises(ValidationError, match="below RIB_VISIBILITY_TIMEOUT_S"):
        Settings()
    monkeypatch.setenv("RIB_CHUNK_TIME_LIMIT_S", "30")
    monkeypatch.setenv("RIB_DEVICE", "gpu")
    with pytest.raises(ValidationError, match="device"):
        Settings()


def test_refine_defaults_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RIB_REFINE_DEFAULTS", '{"seed_threshold": 0.2, "crf": {"iterations": 5}}')
    monkeypatch.setenv("RIB_REFINE_DEFAULTS__WALK__BETA", "8")
    s = Settings()
    assert (s.refine_defaults.seed_threshold, s.refine_defaults.crf.iterations) == (0.2, 5)
    assert s.refine_defaults.walk.beta == 8 and s.refine_defaults.crf.gt_prob == 0.7  # the rest stays IRN's
    cfg = refine_params({"crf": {"gt_prob": 0.8}}, s.refine_defaults)
    assert (cfg.seed_threshold, cfg.crf.iterations, cfg.crf.gt_prob, cfg.walk.beta) == (0.2, 5, 0.8, 8)
    assert refine_params(None, s.refine_defaults) == s.refine_defaults
    with pytest.raises(InputError, match="invalid refinement parameters"):
        refine_params({"crf": {"unary": "softmax"}}, s.refine_defaults)


def test_the_maps_stage_is_completed_once_by_the_chunk_that_completes_it(store: PipelineStore) -> None:
    """A chunk delivered twice counts once; exactly one call decides the maps stage is done."""
    pipelines = PipelineStore(store.r, ttl_s=600)
    job_id = "e" * 32
    spec = PipelineSpec(manifest="s3://b/m.jsonl", image_ids=["a", "b", "c"], chunks=[["a", "b"], ["c"]], owner="o")
    pipelines.create(job_id, spec)
    assert pipelines.chunk_done(job_id, Send("maps", 0), {}, 2) == 0
    assert pipelines.chunk_done(job_id, Send("maps", 0), {}, 2) == 0  # delivered again after its count
    assert pipelines.stage_state(job_id, "maps") == "pending"  # chunk 1 has not run
    assert pipelines.chunk_done(job_id, Send("maps", 1), {"c": "no map written"}, 2) == 1  # the one decision
    assert pipelines.chunk_done(job_id, Send("maps", 1), {}, 2) == 0 and pipelines.stage_state(job_id, "maps") == "done"
    assert pipelines.status(job_id)["stages"]["maps"]["progress"] == {"chunks_done": 2, "chunks": 2,
                                                                      "images_failed": 1}
