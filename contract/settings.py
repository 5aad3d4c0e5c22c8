"""Every setting of the API and the workers, in one place, read from ``RIB_*`` environment variables.

The API and both kinds of worker read the same variables, so one ``.env`` (or one compose
``environment:`` block) configures the whole service. ``docs/SERVICE.md`` has the table.
"""

from __future__ import annotations

import hashlib
import os
import re
from functools import cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from rib_core.config.rib_config import RibConfig
from rib_core.config.stage_configs import RefineConfig
from rib_core.io.storage import Storage, is_s3_uri, open_storage, s3_client, split_s3_uri

CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Service settings. Lists are comma-separated; ``rib_defaults`` and ``refine_defaults`` are JSON or
    ``RIB_RIB_DEFAULTS__<FIELD>`` / ``RIB_REFINE_DEFAULTS__<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="RIB_", env_nested_delimiter="__", extra="ignore")

    # Celery broker and result backend; job bookkeeping lives in ``state_url`` (the broker's Redis by default).
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/1"
    state_url: str | None = None
    # Results: s3://bucket/prefix, or a local folder for a single-machine setup.
    storage_uri: str = "rib-results"
    s3_endpoint_url: str | None = None         # MinIO / moto; unset = AWS
    s3_public_endpoint_url: str | None = None  # host users reach in presigned URLs; unset = s3_endpoint_url
    presign_expires_s: int = Field(3600, ge=60, le=7 * 24 * 3600)  # S3's SigV4 maximum is 7 days
    # The model every worker loads once: the shared classifier, the companion pool, optionally IRN.
    classifier_uri: str | None = None
    companion_manifest_uri: str | None = None
    irn_uri: str | None = None
    device: str = "auto"
    # The companion pool is an index; images are decoded on demand into a cache of this many bytes
    # per worker process (rib_core.rib.companions.DEFAULT_CACHE_BYTES: 512 MiB), and s3:// images are
    # kept in this folder once fetched (unset: fetched again after eviction).
    companion_cache_bytes: int = Field(512 * 2**20, ge=2**20)
    companion_disk_cache: str | None = None
    # Access and input limits.
    api_keys: CommaList = Field(default_factory=list)
    max_upload_bytes: int = Field(20 * 2**20, ge=1024)
    max_image_pixels: int = Field(4_000_000, ge=64 * 64)  # RIB runs the image at 2x scale: 16 M pixels
    max_crop_size: int = Field(1024, ge=16)               # bound on the per-request companion crop
    max_job_images: int = Field(100_000, ge=1)    # images per bulk job, and lines per manifest (+ its header)
    max_manifest_bytes: int = Field(50 * 2**20, ge=1024)  # a manifest's size, checked before it is read
    # Where job inputs may be read from (manifests, images, checkpoints, initial weights); empty: the
    # bucket of an s3:// storage_uri, and nothing for a local one. Never "every bucket" by default.
    input_prefixes: CommaList = Field(default_factory=list)
    # Initial weights (classifier, IRN, DeepLab) may name a path on the worker: off, so that no request
    # reads the worker's files. Outputs are never a request's choice: each job writes under its own
    # prefix in storage_uri (jobs/<id>/).
    allow_local_init_weights: bool = False
    # Key of the HMAC over every job record the service writes to storage (request.json,
    # pipeline.json, training.json): a record is adopted (a job Redis lost, rebuilt) only when the
    # service wrote it. Unset: derived from RIB_API_KEYS, which the API and the workers share.
    signing_secret: SecretStr | None = None
    # Queues and delivery.
    image_queue: str = "rib.images"
    training_queue: str = "rib.training"
    chunk_size: int = Field(8, ge=1, le=1000)
    visibility_timeout_s: int = Field(3600, ge=5)  # Redis redelivers a task unacked for this long
    chunk_time_limit_s: int = Field(1800, ge=1)    # hard limit of one chunk task; below the visibility timeout
    job_ttl_s: int = Field(7 * 24 * 3600, ge=60)   # job bookkeeping expires from Redis after this
    # delivery: every image ends done or failed, whatever happens to its worker, its chunk or Redis.
    # attempts of one image whose worker died on it (lost, time limit) before it fails alone with the reason
    max_attempts: int = Field(3, ge=1)
    # deliveries of one pipeline stage, map chunk or training job whose worker died (killed, out of
    # memory) before the stage fails with the reason: a message that kills workers is dead-lettered.
    max_stage_attempts: int = Field(3, ge=1, le=100)
    lease_s: int = Field(300, ge=2)  # a running unit (chunk, stage) whose lease is not renewed this long is sent again
    torch_threads: int | None = Field(None, ge=1)  # per worker; unset: OMP_NUM_THREADS, else cores / concurrency
    # Default RIB parameters of every request; a request overrides single fields.
    rib_defaults: RibConfig = Field(default_factory=RibConfig)
    # Default refinement (seed + CRF, IRN's random walk) of every request, the object ``rib refine``
    # reads; a request overrides single fields. Workers without RIB_IRN_URI stop at seed + CRF.
    refine_defaults: RefineConfig = Field(default_factory=RefineConfig)
    # Webhooks (contract.webhooks): a job's final state POSTed once to its callback_url, signed.
    webhook_secret: SecretStr | None = None  # unset: no callbacks (a callback_url is refused)
    webhook_allowed_hosts: CommaList = Field(default_factory=list)  # host names, IPs, CIDR ranges, "*": any public host
    webhook_retry_s: Annotated[list[float], NoDecode] = Field(default_factory=lambda: [5, 30, 120, 600, 1800, 3600])
    webhook_timeout_s: float = Field(10, gt=0, le=120)
    # Label Studio ML backend (/ls): the Label Studio whose task images the API may download, and its token.
    label_studio_url: str | None = None
    label_studio_token: SecretStr | None = None
    label_studio_wait_s: float = Field(90, ge=1, le=3600)  # /ls/predict waits this long for its images

    @field_validator("api_keys", "input_prefixes", "webhook_allowed_hosts", "webhook_retry_s", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return value

    @model_validator(mode="after")
    def _limits(self) -> Settings:
        if self.chunk_time_limit_s >= self.visibility_timeout_s:
            raise ValueError("RIB_CHUNK_TIME_LIMIT_S must be below RIB_VISIBILITY_TIMEOUT_S, or Redis "
                             "redelivers chunks that are still running")
        return self

    @model_validator(mode="after")
    def _default_locations(self) -> Settings:
        if not self.input_prefixes and is_s3_uri(self.storage_uri):
            self.input_prefixes = [f"s3://{split_s3_uri(self.storage_uri)[0]}/"]
        return self

    @property
    def results_prefix(self) -> str:
        """storage_uri as a prefix: no request names a location under it, except its own job's files."""
        root = self.storage_uri if is_s3_uri(self.storage_uri) else str(Path(self.storage_uri).resolve())
        return root.rstrip("/") + "/"

    def signing_key(self) -> bytes:
        if self.signing_secret is not None:
            return self.signing_secret.get_secret_value().encode()
        return hashlib.sha256(("rib-job-records\n" + "\n".join(sorted(self.api_keys))).encode()).digest()

    @property
    def state_redis_url(self) -> str:
        return self.state_url or self.broker_url

    def export_s3_endpoint(self) -> None:
        """Point rib_core's S3 reads (models, manifests, images) at the configured endpoint."""
        if self.s3_endpoint_url:
            os.environ.setdefault("AWS_ENDPOINT_URL", self.s3_endpoint_url)

    def storage(self) -> Storage:
        """The results store, with presigned URLs naming the public endpoint."""
        if not is_s3_uri(self.storage_uri):
            return open_storage(self.storage_uri)
        client = s3_client(self.s3_endpoint_url)
        public = s3_client(self.s3_public_endpoint_url) if self.s3_public_endpoint_url else client
        return open_storage(self.storage_uri, client=client, public_client=public)


@cache
def get_settings() -> Settings:
    return Settings()
