"""Load a model the way users of Transformers do, then check it (``worker.model.contract``) and warm it up."""

from __future__ import annotations

import inspect
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, PretrainedConfig, PreTrainedModel
from transformers.image_processing_utils import BaseImageProcessor
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from shared.protocol import ModelInfo
from shared.settings import Settings
from worker.model.contract import ModelRefused, check_precision, check_token_contract, patch_size
from worker.model.embedder import Backend, TorchEmbedder, VisionEmbedder, openvino_embedder
from worker.model.pooling import pool_cls_mean

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model_id: str
    module: PreTrainedModel  # Transformers' own, in float32 unless the torch backend runs another dtype
    embedder: VisionEmbedder
    processor: BaseImageProcessor
    device: torch.device
    dtype: torch.dtype
    num_register_tokens: int
    info: ModelInfo
    load_seconds: float


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelRefused("IMBEDDINGS_DEVICE=cuda but PyTorch sees no CUDA device")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return DTYPES[setting]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_openvino_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imbeddings" / "openvino"


def probe_image() -> Image.Image:
    """A deterministic non-square photo stand-in, so resize and crop rules are exercised."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:240, 0:320]
    base = np.stack([x / 320 * 255, y / 240 * 255, (x + y) / 560 * 255], axis=-1)
    noisy = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy)


def _check_local_directory(model_id: str) -> None:
    """A mistyped local directory would otherwise reach the Hub client and fail with "Repo id must be
    in the form 'repo_name' or 'namespace/repo_name'": name the directory instead. Hub ids have at
    most one '/' and never start with '/', '.' or '~'."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelRefused(f"model directory {model_id!r} holds no config.json: not a saved model (save one with save_pretrained)")
        return
    if path.exists():
        raise ModelRefused(f"model {model_id!r} is a file, not a model directory")
    if model_id.startswith(("/", ".", "~")) or "\\" in model_id or model_id.count("/") > 1 or model_id.endswith("/"):
        raise ModelRefused(f"model directory {model_id!r} not found (resolved to {path.absolute()})")


def load_model(
    model_id: str,
    device: torch.device,
    dtype: torch.dtype,
    token: str | None,
    warmup_batch: int,
    backend: Backend = "torch",
    threads: int | None = None,
    openvino_cache_dir: Path | None = None,
    openvino_streams: int = Settings.model_fields["openvino_streams"].default,
) -> LoadedModel:
    """Load, check the token contract, build the backend, check its precision, warm up: each a step."""
    started = time.perf_counter()
    config, module, processor = load_pretrained(model_id, device, token)
    num_registers = int(getattr(config, "num_register_tokens", 0) or 0)
    patch = patch_size(config)
    pixel_values = processor(images=probe_image(), return_tensors="pt")["pixel_values"]
    hidden = float32_hidden_state(module, pixel_values, device)
    tokens = check_token_contract(model_id, hidden, pixel_values.shape[-2:], patch, num_registers)
    image_size = (int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))
    embedder = build_embedder(module, device, dtype, num_registers, image_size, backend, threads, openvino_cache_dir, openvino_streams)
    cosines = check_precision(model_id, embedder, pixel_values, pool_cls_mean(hidden, num_registers), dtype, max(warmup_batch, 2))
    if cosines is not None:
        extra = {"model": model_id, "backend": embedder.backend, "dtype": str(dtype)}
        extra |= {"cosine_cls_vs_float32": round(cosines[0], 6), "cosine_mean_vs_float32": round(cosines[1], 6)}
        log.info("reduced precision checked" if dtype != torch.float32 else "backend checked against float32", extra=extra)
    warm_up(embedder, pixel_values, warmup_batch, device)
    info = ModelInfo(
        id=model_id,
        model_type=config.model_type,
        dim=int(hidden.shape[-1]),
        patch_size=patch,
        image_size=image_size,
        num_register_tokens=num_registers,
        tokens_per_image=tokens,
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        backend=embedder.backend,
    )
    seconds = time.perf_counter() - started
    log.info("model loaded", extra={"model": model_id, "seconds": round(seconds, 2), **info.model_dump(exclude={"id"})})
    return LoadedModel(model_id, module, embedder, processor, device, dtype, num_registers, info, seconds)


def load_pretrained(model_id: str, device: torch.device, token: str | None) -> tuple[PretrainedConfig, PreTrainedModel, BaseImageProcessor]:
    """Config, float32 model (in eval mode, on ``device``) and image processor, as ``AutoModel``/``AutoImageProcessor`` give them."""
    _check_local_directory(model_id)
    config, module, processor = _from_pretrained(model_id, token)
    module.eval().to(device)
    return config, module, processor


def float32_hidden_state(module: PreTrainedModel, pixel_values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Transformers' own output for ``pixel_values``: the reference the checks compare against."""
    with torch.inference_mode():
        return module(pixel_values=pixel_values.to(device)).last_hidden_state


def build_embedder(
    module: PreTrainedModel,
    device: torch.device,
    dtype: torch.dtype,
    num_registers: int,
    image_size: tuple[int, int],
    backend: Backend,
    threads: int | None,
    openvino_cache_dir: Path | None,
    openvino_streams: int,
) -> VisionEmbedder:
    if backend == "openvino":
        threads = threads or torch.get_num_threads()
        return openvino_embedder(module, image_size, dtype, threads, openvino_streams, num_registers, openvino_cache_dir or default_openvino_cache())
    module.to(dtype)
    return TorchEmbedder(module, device, dtype, num_registers)


def warm_up(embedder: VisionEmbedder, pixel_values: torch.Tensor, batch: int, device: torch.device) -> None:
    """One full batch through the embedder, so the first request does not pay for allocations and kernel choices."""
    embedder.embed(pixel_values.expand(batch, -1, -1, -1))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _from_pretrained(model_id: str, token: str | None) -> tuple[PretrainedConfig, PreTrainedModel, BaseImageProcessor]:
    """Config, float32 model and image processor, as ``AutoModel``/``AutoImageProcessor`` give them."""
    try:
        config = AutoConfig.from_pretrained(model_id, token=token)
        model_class = MODEL_MAPPING[type(config)]
    except KeyError:
        raise ModelRefused(f"model {model_id!r}: Transformers has no AutoModel class for its config") from None
    except (OSError, ValueError) as exc:
        raise ModelRefused(f"model {model_id!r} cannot be loaded: {exc}") from None
    # ViT/DeiT add a dense+tanh pooler that is random when the checkpoint lacks it; it is never used.
    extra = {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters else {}
    try:
        module = model_class.from_pretrained(model_id, config=config, token=token, dtype=torch.float32, **extra)
        processor = AutoImageProcessor.from_pretrained(model_id, token=token)
    except (OSError, ValueError) as exc:
        raise ModelRefused(f"model {model_id!r} cannot be loaded: {exc}") from None
    return config, module, processor
