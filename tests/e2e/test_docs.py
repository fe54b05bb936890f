"""``/docs`` renders in a real browser with no network but the service: Swagger UI's files come from
the fastapi-offline package, not a CDN."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile

import pytest

from tests.support.stack import Stack

CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None)


def _render(url: str) -> str:
    """The page's DOM after its scripts ran, from headless Chromium that can resolve no host but
    127.0.0.1 (so a CDN reference would fail to load, and nothing leaves the machine)."""
    with tempfile.TemporaryDirectory() as profile:
        command = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
            "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-default-apps",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--virtual-time-budget=15000", "--dump-dom", url,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_docs_page_uses_only_local_assets(service: Stack) -> None:
    with service.client() as client:
        html = client.get("/docs").text
        sources = re.findall(r"""(?:src|href)=["']([^"']+)""", html) + re.findall(r"""url: *["']([^"']+)""", html)
        assert sources and all(source.startswith("/") for source in sources), sources
        for asset in ("/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"):
            response = client.get(asset)
            assert response.status_code == 200 and len(response.content) > 100_000
        assert client.get("/redoc").status_code == 200 and client.get("/docs-assets/redoc.standalone.js").status_code == 200


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (make test installs the Debian package where apt-get is available)")
def test_docs_render_offline_in_headless_chromium(service: Stack) -> None:
    dom = _render(f"{service.base_url}/docs")
    # Swagger UI built its page from /openapi.json: the title, and an operation block per route.
    assert 'class="swagger-ui"' in dom and "Imbeddings" in dom
    assert "/v1/embeddings" in dom and "/v1/jobs/{job_id}" in dom
    assert dom.count("opblock-summary-path") >= 8
