"""The token contract, checked when a model is loaded in process; pooler_output is never used."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from worker.model.loader import ModelRefused, load_model

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("name", "tokens", "registers"),
    [("vit-tiny", 17, 0), ("dinov2-tiny", 17, 0), ("dinov2-registers-tiny", 21, 4), ("dinov3-tiny", 21, 4), ("deit-tiny", 17, 0), ("webssl-tiny", 17, 0)],
)
def test_supported_families_load(tiny_models: dict[str, Path], name: str, tokens: int, registers: int) -> None:
    loaded = load_model(str(tiny_models[name]), CPU, torch.float32, None, warmup_batch=2)
    assert loaded.info.tokens_per_image == tokens and loaded.info.num_register_tokens == registers
    assert getattr(loaded.module, "pooler", None) is None


def test_distilled_deit_is_refused_with_counts(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ModelRefused) as refused:
        load_model(str(tiny_models["deit-distilled-tiny"]), CPU, torch.float32, None, warmup_batch=1)
    message = str(refused.value)
    assert str(tiny_models["deit-distilled-tiny"]) in message and "18 tokens" in message and "needs 17" in message


def test_model_without_token_sequence_is_refused(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ModelRefused, match="no token sequence"):
        load_model(str(tiny_models["convnext-tiny"]), CPU, torch.float32, None, warmup_batch=1)


def test_reduced_precision_converts_the_weights_and_logs_its_cost(tiny_models: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="worker.model.loader"):
        loaded = load_model(str(tiny_models["dinov2-tiny"]), CPU, torch.bfloat16, None, warmup_batch=1)
    assert {p.dtype for p in loaded.module.parameters()} == {torch.bfloat16}
    assert loaded.info.dtype == "bfloat16"
    record = next(r for r in caplog.records if r.getMessage() == "reduced precision checked")
    assert 0.99 < record.cosine_cls_vs_float32 <= 1.0 and 0.99 < record.cosine_mean_vs_float32 <= 1.0


@pytest.mark.parametrize("typo", ["/models/dinov2-smal", "./models/dinov2-smal", "~/dinov2-smal", "models/dinov2/small"])
def test_mistyped_model_directory_says_not_found(typo: str) -> None:
    with pytest.raises(ModelRefused, match="not found") as refused:
        load_model(typo, CPU, torch.float32, None, warmup_batch=1)
    assert typo in str(refused.value) and "Repo id" not in str(refused.value)


def test_directory_without_a_saved_model_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelRefused, match="holds no config.json"):
        load_model(str(tmp_path), CPU, torch.float32, None, warmup_batch=1)
