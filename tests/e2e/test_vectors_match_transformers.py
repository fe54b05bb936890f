"""The service's vectors equal plain Transformers' (AutoImageProcessor -> AutoModel -> pooling).

Every family is tried on real photos, including every decoding rule: grayscale, RGBA and palette
transparency (composited on white), CMYK, 16-bit (scaled, not clipped) and EXIF rotation.
"""

from __future__ import annotations

import numpy as np
import pytest

from devtools.photos import decoding_variants
from tests.support.images import data_uri
from tests.support.reference import reference_vectors
from tests.support.stack import SERVED, Stack

VARIANTS = decoding_variants()
TOLERANCE = 1e-5


@pytest.mark.parametrize("family", SERVED)
def test_vectors_equal_transformers_reference(service: Stack, family: str) -> None:
    model = service.model(family)
    with service.client() as client:
        response = client.post("/v1/embeddings", json={"model": model, "input": [data_uri(v.data) for v in VARIANTS], "encoding_format": "float"})
    assert response.status_code == 200, response.text
    items = response.json()["data"]
    assert [item["index"] for item in items] == list(range(len(VARIANTS)))
    worst = 0.0
    for variant, item in zip(VARIANTS, items):
        ref_cls, ref_mean = reference_vectors(service.models[family], variant.reference)
        cls = np.asarray(item["embeddings"]["cls"], dtype=np.float64)
        mean = np.asarray(item["embeddings"]["mean"], dtype=np.float64)
        diff = max(np.abs(cls - ref_cls).max(), np.abs(mean - ref_mean).max())
        worst = max(worst, diff)
        assert diff <= TOLERANCE, f"{family} / {variant.name}: max |difference| {diff:.2e}"
        assert np.linalg.norm(cls) == pytest.approx(1, abs=1e-5) and np.linalg.norm(mean) == pytest.approx(1, abs=1e-5)
        assert item["embedding"] == item["embeddings"]["cls"]
    print(f"{family}: largest difference to Transformers {worst:.2e} over {len(VARIANTS)} images")


def test_registers_are_excluded_from_mean(service: Stack) -> None:
    """For a model with registers, MEAN is over patches only; a MEAN over [1:] would differ."""
    import torch
    from transformers import AutoImageProcessor, AutoModel

    family = "dinov3-tiny"
    variant = VARIANTS[0]
    with service.client() as client:
        item = client.post("/v1/embeddings", json={"model": service.model(family), "input": data_uri(variant.data), "pooling": "mean"}).json()["data"][0]
    model_dir = service.models[family]
    processor, model = AutoImageProcessor.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir)
    with torch.inference_mode():
        hidden = model(**processor(images=variant.reference, return_tensors="pt")).last_hidden_state[0]
    assert model.config.num_register_tokens == 4
    with_registers = hidden[1:].mean(0)
    with_registers = (with_registers / with_registers.norm()).numpy()
    assert np.abs(np.asarray(item["embedding"]) - with_registers).max() > 1e-3
    assert item["embedding"] == item["embeddings"]["mean"]
