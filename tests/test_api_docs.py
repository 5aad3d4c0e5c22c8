"""The API's own docs pages render offline (issue 26, item 5): Swagger UI at ``/docs`` and ReDoc at
``/redoc`` load their JavaScript and CSS from the API, not from a CDN. Checked in headless Chromium
with every host name but the API's unresolvable, on the real app served by uvicorn."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from contract.settings import Settings
from service.app import create_app
from tests.service_stack import served

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def docs_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app (no worker, no request reaches Redis or S3 here) under uvicorn in a thread."""
    with served(create_app(Settings(storage_uri=str(tmp_path_factory.mktemp("results"))))) as url:
        yield url


def test_the_docs_pages_name_no_other_host(docs_url: str) -> None:
    for page, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        html = httpx.get(docs_url + page).text
        sources = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
        assert any(s.endswith(asset) for s in sources), (page, sources)
        assert not [s for s in sources if "://" in s], (page, sources)  # everything from the API itself
        for source in sources:
            assert httpx.get(docs_url + source).status_code == 200, source


def _chromium(tmp_path: Path, *args: str) -> str:
    """Headless Chromium that can reach the API and nothing else: every other host name is unresolvable."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
             "--virtual-time-budget=20000", f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([CHROMIUM, *flags, *args], check=True, capture_output=True, text=True, timeout=180).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh installs it)")
def test_swagger_ui_and_redoc_render_the_operations_offline(docs_url: str, tmp_path: Path) -> None:
    spec = httpx.get(f"{docs_url}/openapi.json").json()
    paths = set(spec["paths"])
    swagger = _chromium(tmp_path, "--dump-dom", f"{docs_url}/docs")
    shown = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', swagger))
    assert shown == paths, paths ^ shown  # every operation's block, drawn by the served Swagger UI
    redoc = _chromium(tmp_path, "--dump-dom", f"{docs_url}/redoc")
    summaries = {op["summary"] for ops in spec["paths"].values() for op in ops.values()}
    assert all(f">{s}<" in redoc for s in summaries), [s for s in summaries if f">{s}<" not in redoc]
    shot = tmp_path / "docs.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", f"{docs_url}/docs")
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10  # a drawn page, not the blank one a missing bundle leaves
