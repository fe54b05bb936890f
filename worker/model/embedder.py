"""The forward pass behind one interface: pixels in, L2-normalised (CLS, MEAN) out.

The batcher, the benchmark and the load-time checks call ``VisionEmbedder.embed``; which engine runs
the Vision Transformer is the backend's business: PyTorch eager (any device) or OpenVINO (CPU). Both
pool in float32 with ``pool_cls_mean``, so a backend changes only the forward pass.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from transformers import PreTrainedModel

from worker.model.pooling import pool_cls_mean

log = logging.getLogger(__name__)

Backend = Literal["torch", "openvino"]

# IMBEDDINGS_DTYPE -> OpenVINO's inference precision on the CPU.
_OPENVINO_PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


class BackendUnavailable(RuntimeError):
    """The configured backend cannot run here (not installed, or not for this device)."""


# A batch: one ``(B, 3, H, W)`` tensor, or B ``(3, H, W)`` images of one shape (as the batcher,
# which never imports torch, hands them over).
Pixels = torch.Tensor | Sequence[torch.Tensor]


class VisionEmbedder(Protocol):
    backend: Backend

    def embed(self, pixels: Pixels) -> tuple[torch.Tensor, torch.Tensor]:
        """B float32 images -> CLS ``(B, D)`` and MEAN ``(B, D)``, float32 on the CPU."""
        ...


def _as_batch(pixels: Pixels) -> torch.Tensor:
    return pixels if isinstance(pixels, torch.Tensor) else torch.stack(list(pixels))


class TorchEmbedder:
    backend: Backend = "torch"

    def __init__(self, module: PreTrainedModel, device: torch.device, dtype: torch.dtype, num_register_tokens: int) -> None:
        self.module = module
        self.device = device
        self.dtype = dtype
        self.num_register_tokens = num_register_tokens

    def embed(self, pixels: Pixels) -> tuple[torch.Tensor, torch.Tensor]:
        batch = _as_batch(pixels).to(self.device, self.dtype, non_blocking=True)
        with torch.inference_mode():
            cls, mean = pool_cls_mean(self.module(pixel_values=batch).last_hidden_state, self.num_register_tokens)
        return cls.cpu(), mean.cpu()


class OpenVINOEmbedder:
    """A converted model compiled for the CPU as one or more streams; call ``embed`` from one thread.

    A batch is cut into one part per stream and the parts run at once, each stream on its own share
    of the threads: a stream whose core is taken by a decoder keeps the other going, where one stream
    over every thread waits for the slowest at each layer (README, Throughput). A batch smaller than the
    stream count would leave threads idle, so it runs on ``whole``: the model compiled as one stream
    over all the threads.
    """

    backend: Backend = "openvino"

    def __init__(self, streamed: object, whole: object | None, num_register_tokens: int) -> None:
        streams = int(streamed.get_property("NUM_STREAMS"))  # type: ignore[attr-defined]
        self._requests = [streamed.create_infer_request() for _ in range(streams)]  # type: ignore[attr-defined]
        self._whole = whole.create_infer_request() if whole is not None else self._requests[0]  # type: ignore[attr-defined]
        self.num_register_tokens = num_register_tokens

    def embed(self, pixels: Pixels) -> tuple[torch.Tensor, torch.Tensor]:
        batch = _as_batch(pixels).float().contiguous().numpy()
        if len(batch) < len(self._requests) or len(self._requests) == 1:
            hidden = self._whole.infer([batch])[0]
            # Pooling copies what it needs before the request's output buffer is reused by the next call.
            return pool_cls_mean(torch.from_numpy(hidden), self.num_register_tokens)
        parts = np.array_split(batch, len(self._requests))
        try:
            for request, part in zip(self._requests, parts):
                request.start_async([part])
        finally:
            _wait_all(self._requests)
        pooled = [pool_cls_mean(torch.from_numpy(request.get_output_tensor(0).data), self.num_register_tokens) for request in self._requests]
        return torch.cat([cls for cls, _ in pooled]), torch.cat([mean for _, mean in pooled])


def _wait_all(requests: Sequence[object]) -> None:
    """Wait for every started request before raising the first failure, so none is still running
    (and refuses to start) when the next batch comes."""
    failure: Exception | None = None
    for request in requests:
        try:
            request.wait()  # type: ignore[attr-defined]
        except RuntimeError as exc:
            failure = failure or exc
    if failure is not None:
        raise failure


def resolve_backend(setting: str, device: torch.device) -> Backend:
    """``auto`` is OpenVINO on the CPU when it is installed (faster there, same vectors; see README),
    PyTorch otherwise."""
    if setting == "torch":
        return "torch"
    if device.type != "cpu":
        if setting == "openvino":
            raise BackendUnavailable(
                f"IMBEDDINGS_BACKEND=openvino runs on the CPU, but the device is {device}; set IMBEDDINGS_DEVICE=cpu or IMBEDDINGS_BACKEND=torch"
            )
        return "torch"
    try:
        import openvino  # noqa: F401
    except ImportError:
        if setting == "openvino":
            raise BackendUnavailable("IMBEDDINGS_BACKEND=openvino, but the openvino package is not installed (pip install openvino)") from None
        return "torch"
    return "openvino"


class _LastHiddenState(torch.nn.Module):
    """The model with one tensor out, the way the converter traces it."""

    def __init__(self, module: PreTrainedModel) -> None:
        super().__init__()
        self.module = module

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.module(pixel_values=pixel_values).last_hidden_state


def _cache_key(module: PreTrainedModel, image_size: tuple[int, int]) -> str:
    """The weights themselves, the shapes and every converter version: a key that cannot go stale."""
    import openvino
    import transformers

    digest = hashlib.sha256()
    digest.update(f"{openvino.__version__}|{torch.__version__}|{transformers.__version__}|{type(module).__name__}|{image_size}".encode())
    digest.update(module.config.to_json_string().encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def converted_model(module: PreTrainedModel, image_size: tuple[int, int], cache_dir: Path) -> object:
    """The OpenVINO model for ``module``: read from the cache, or converted once and cached."""
    import openvino as ov

    path = cache_dir / f"{type(module).__name__}-{_cache_key(module, image_size)}" / "model.xml"
    core = ov.Core()
    if path.exists():
        log.info("openvino model read from cache", extra={"path": str(path.parent)})
        return core.read_model(path)
    height, width = image_size
    example = torch.zeros(1, 3, height, width)
    with torch.inference_mode():
        converted = ov.convert_model(_LastHiddenState(module).eval(), example_input=example, input=[(-1, 3, height, width)])
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Written beside its final place and renamed, so a worker that dies mid-write, or another worker
    # converting the same model at the same moment, never leaves a half-written model to be read.
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".converting-"))
    try:
        # Weights stay float32 on disk: compression to float16 would change the vectors.
        ov.save_model(converted, staging / "model.xml", compress_to_fp16=False)
        try:
            os.rename(staging, path.parent)
        except OSError:  # another worker got there first: its copy is the same model
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("openvino model converted and cached", extra={"path": str(path.parent)})
    return converted


def openvino_embedder(
    module: PreTrainedModel,
    image_size: tuple[int, int],
    dtype: torch.dtype,
    threads: int,
    streams: int,
    num_register_tokens: int,
    cache_dir: Path,
) -> OpenVINOEmbedder:
    """``streams`` is capped at ``threads`` (a stream needs a thread of its own)."""
    import openvino as ov

    if dtype not in _OPENVINO_PRECISION:
        raise BackendUnavailable(f"IMBEDDINGS_DTYPE={dtype} has no OpenVINO precision")
    streams = min(streams, threads)
    model = converted_model(module, image_size, cache_dir)
    core = ov.Core()

    def compiled(num_streams: int) -> object:
        config = {
            "INFERENCE_PRECISION_HINT": _OPENVINO_PRECISION[dtype],
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": num_streams,
            # OpenVINO's own cache of compiled models (keyed by the model and these settings): a worker
            # that starts again, or a second worker on the host, skips the compilation too.
            "CACHE_DIR": str(cache_dir / "compiled"),
        }
        return core.compile_model(model, "CPU", config)

    log.info("openvino compiled", extra={"streams": streams, "threads": threads, "precision": _OPENVINO_PRECISION[dtype]})
    return OpenVINOEmbedder(compiled(streams), compiled(1) if streams > 1 else None, num_register_tokens)
