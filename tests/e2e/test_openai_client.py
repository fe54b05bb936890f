"""The official ``openai`` client works unchanged (it asks for base64 and decodes it itself)."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import openai
import pytest

from devtools.photos import EXAMPLES
from shared.settings import REPO_ROOT
from tests.support.images import data_uri
from tests.support.stack import Stack


def test_openai_client_embeddings(service: Stack) -> None:
    client = openai.OpenAI(base_url=f"{service.base_url}/v1", api_key="unused", max_retries=0)
    images = [data_uri((EXAMPLES / "cmp1.jpg").read_bytes()), data_uri((EXAMPLES / "cmp3.png").read_bytes(), "image/png")]
    response = client.embeddings.create(model=service.model("dinov2-tiny"), input=images)
    assert response.model == service.model("dinov2-tiny")
    assert [item.index for item in response.data] == [0, 1]
    assert response.usage.prompt_tokens == 34 and response.usage.total_tokens == 34
    with service.client() as http:
        plain = http.post("/v1/embeddings", json={"input": images, "encoding_format": "float"}).json()
    for item, expected in zip(response.data, plain["data"]):
        assert np.allclose(item.embedding, expected["embedding"], atol=1e-7)

    truncated = client.embeddings.create(model=service.model("dinov2-tiny"), input=images[0], dimensions=16)
    assert len(truncated.data[0].embedding) == 16
    assert np.linalg.norm(truncated.data[0].embedding) == pytest.approx(1.0, abs=1e-5)


def test_openai_client_sees_openai_errors(service: Stack) -> None:
    client = openai.OpenAI(base_url=f"{service.base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as not_found:
        client.embeddings.create(model="nobody/nothing", input=data_uri((EXAMPLES / "cmp1.jpg").read_bytes()))
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(model=service.model("dinov2-tiny"), input=["data:image/png;base64,AAAA"])
    assert bad.value.param == "input[0]"


def test_readme_openai_example_runs_as_written(service: Stack) -> None:
    """The README's client example, run from the repo root against the service (only the address changed)."""
    readme = (REPO_ROOT / "README.md").read_text()
    example = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "from openai import OpenAI" in block)
    assert "http://localhost:8000/v1" in example
    code = example.replace("http://localhost:8000/v1", f"{service.base_url}/v1") + "\nprint(len(vector))\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == 32
