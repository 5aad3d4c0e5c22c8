"""The HTTP API's factory (:func:`create_app`; ``service.main:app`` is its app for the environment):
validate, schedule, report.

Every ``/v1`` route needs an API key in the ``X-API-Key`` header, and so does the Label Studio ML
backend under ``/ls`` (there also as the password of HTTP basic auth); ``/healthz``, ``/readyz``,
``/metrics`` and the OpenAPI docs (``/docs``, ``/redoc``: their assets served from here, so they work
offline) do not. Input is checked here and refused with a 4xx that says what to fix, so that nothing
invalid is stored or reaches a worker. The science runs in the workers: this process imports neither
``worker`` nor torch (``contract`` is what both share).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI
from prometheus_client import CollectorRegistry

from contract.settings import Settings, get_settings
from rib_core import __version__
from service import api_docs, middleware
from service.deps import Clients, require_api_key
from service.errors import error_responses
from service.metrics import RedisStatsCollector
from service.routes import health, images, jobs, label_studio, pipelines, training, webhooks


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API for ``settings`` (default: the ``RIB_*`` environment), with its own clients."""
    settings = settings or get_settings()
    app = FastAPI(
        title="RIB pseudo-mask service",
        version=__version__,
        description="Pixel-level pseudo-masks from image-level class labels with RIB (NeurIPS 2021). "
                    "Send the API key in the `X-API-Key` header.",
        docs_url=None, redoc_url=None,  # served with local assets by api_docs.install
    )
    clients = Clients.connect(settings)
    app.state.clients = clients
    app.state.redis_metrics = CollectorRegistry()
    app.state.redis_metrics.register(RedisStatsCollector(clients.store.stats, clients.broker,
                                                         [settings.image_queue, settings.training_queue]))
    middleware.install(app, settings.max_upload_bytes)
    api_docs.install(app)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=error_responses(401))
    for resource in (images, jobs, pipelines, training, webhooks):
        v1.include_router(resource.router)
    app.include_router(health.router)
    app.include_router(v1)
    app.include_router(label_studio.router)
    return app
