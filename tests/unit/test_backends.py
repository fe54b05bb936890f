"""Both forward-pass backends give Transformers' float32 vectors, for every family, on real photos.

The service's own end-to-end check (``test_vectors_match_transformers``) runs the default backend;
here each backend is loaded in-process, the way a worker loads it, so both are held to 1e-5.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel

from devtools.photos import decoding_variants
from tests.support.reference import reference_vectors
from tests.support.stack import SERVED
from worker.images.decode import DecodeLimits, decode_image
from worker.model.embedder import BackendUnavailable, resolve_backend
from worker.model.loader import load_model, probe_image
from worker.model.preprocess import choose_preprocessor

VARIANTS = decoding_variants()
LIMITS = DecodeLimits(max_bytes=2**30, max_pixels=10**9, max_side=100_000)
TOLERANCE = 1e-5


@pytest.mark.parametrize("backend", ["torch", "openvino"])
@pytest.mark.parametrize("family", SERVED)
def test_backend_vectors_equal_transformers_reference(tiny_models: dict[str, Path], openvino_cache: Path, family: str, backend: str) -> None:
    # Two threads and the default streams, as on the team's 2-core workers: OpenVINO splits a batch over
    # its two one-thread streams and runs a single image on the model compiled as one two-thread stream.
    loaded = load_model(
        str(tiny_models[family]), torch.device("cpu"), torch.float32, None, warmup_batch=2, backend=backend, threads=2, openvino_cache_dir=openvino_cache
    )
    assert loaded.info.backend == backend
    preprocess = choose_preprocessor(loaded.processor, "fast", probe_image())
    pixels = torch.stack([preprocess(decode_image(v.data, LIMITS)) for v in VARIANTS])
    cls, mean = loaded.embedder.embed(pixels)
    alone = [loaded.embedder.embed(pixels[row : row + 1]) for row in range(len(VARIANTS))]
    worst = 0.0
    for row, variant in enumerate(VARIANTS):
        ref_cls, ref_mean = reference_vectors(tiny_models[family], variant.reference)
        for got_cls, got_mean in ((cls[row], mean[row]), (alone[row][0][0], alone[row][1][0])):
            diff = max(np.abs(got_cls.numpy() - ref_cls).max(), np.abs(got_mean.numpy() - ref_mean).max())
            worst = max(worst, float(diff))
    print(f"{family} on {backend}: largest difference to Transformers {worst:.2e} over {len(VARIANTS)} images, in a batch and alone")
    assert worst <= TOLERANCE


def test_openvino_bfloat16_stays_close(tiny_models: dict[str, Path], openvino_cache: Path) -> None:
    reference = load_model(str(tiny_models["dinov2-tiny"]), torch.device("cpu"), torch.float32, None, warmup_batch=1)
    reduced = load_model(
        str(tiny_models["dinov2-tiny"]), torch.device("cpu"), torch.bfloat16, None, warmup_batch=1, backend="openvino", openvino_cache_dir=openvino_cache
    )
    pixels = torch.stack([choose_preprocessor(reference.processor, "fast", probe_image())(decode_image(v.data, LIMITS)) for v in VARIANTS])
    cosines = [float((a * b).sum(-1).min()) for a, b in zip(reference.embedder.embed(pixels), reduced.embedder.embed(pixels))]
    print(f"openvino bfloat16 vs float32: smallest cosine CLS {cosines[0]:.6f}, MEAN {cosines[1]:.6f}")
    assert min(cosines) > 0.99


def test_converted_models_are_cached_by_weights(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = str(tiny_models["vit-tiny"])
    tmp_path = tmp_path / "cache"
    load_model(model, torch.device("cpu"), torch.float32, None, warmup_batch=1, backend="openvino", openvino_cache_dir=tmp_path)
    converted = sorted(p.name for p in tmp_path.iterdir() if p.name != "compiled")  # OpenVINO's own cache of compiled blobs
    assert len(converted) == 1 and (tmp_path / converted[0] / "model.xml").exists() and (tmp_path / converted[0] / "model.bin").exists()
    load_model(model, torch.device("cpu"), torch.float32, None, warmup_batch=1, backend="openvino", openvino_cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "compiled") == converted  # read back, not converted again
    # The same directory with other weights (a model re-saved after fine-tuning) is another model:
    # the cache never serves stale vectors.
    retrained = tmp_path.parent / "retrained"
    shutil.copytree(model, retrained)
    module = AutoModel.from_pretrained(retrained)
    with torch.no_grad():
        next(module.parameters()).add_(0.01)
    module.save_pretrained(retrained)
    load_model(str(retrained), torch.device("cpu"), torch.float32, None, warmup_batch=1, backend="openvino", openvino_cache_dir=tmp_path)
    assert len([p for p in tmp_path.iterdir() if p.name != "compiled"]) == 2


def test_backend_choice() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "openvino"
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    with pytest.raises(BackendUnavailable, match="IMBEDDINGS_BACKEND=openvino runs on the CPU"):
        resolve_backend("openvino", torch.device("cuda"))
