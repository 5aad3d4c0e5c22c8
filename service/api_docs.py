"""The interactive API docs (``/docs``: Swagger UI, ``/redoc``: ReDoc) with their JavaScript and CSS
served by the API itself from ``service/static`` (see its README), so that they render on a machine
without internet; FastAPI's defaults load them from a CDN and show a blank page offline."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).with_name("static")
ASSETS = "/docs-assets"


def install(app: FastAPI) -> None:
    """Serve the docs pages and their assets; ``app`` must be made with ``docs_url=None, redoc_url=None``."""
    app.mount(ASSETS, StaticFiles(directory=STATIC), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    favicon = f"{ASSETS}/swagger-ui/favicon-32x32.png"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=openapi_url, title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{ASSETS}/swagger-ui/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS}/swagger-ui/swagger-ui.css",
                                   swagger_favicon_url=favicon, oauth2_redirect_url=None)  # API keys, no OAuth2

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{ASSETS}/redoc/redoc.standalone.js", redoc_favicon_url=favicon,
                              with_google_fonts=False)
