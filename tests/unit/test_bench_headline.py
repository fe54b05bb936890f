"""The headline benchmark's arithmetic on given figures: medians over rounds, ratios taken round by round."""

from __future__ import annotations

from bench.headline import summarize, table


def measured_round(standin: tuple[float, float], float32: tuple[float, float], bfloat16: tuple[float, float]) -> dict[str, dict[str, float]]:
    """One round's (img/s, one-client p50 ms) per column."""
    columns = {"stand-in": standin, "float32": float32, "bfloat16": bfloat16}
    return {column: {"e2e_img_s": img_s, "low_load_p50_ms": p50} for column, (img_s, p50) in columns.items()}


ROUNDS = [
    measured_round((10.0, 100.0), (13.0, 90.0), (22.0, 60.0)),
    measured_round((12.0, 96.0), (13.2, 94.0), (24.0, 58.0)),
    measured_round((8.0, 110.0), (12.0, 88.0), (20.0, 65.0)),
]


def test_medians_and_ratios_round_by_round() -> None:
    summary = summarize(ROUNDS)
    assert summary["stand-in"]["img_s_median"] == 10.0
    assert summary["float32"]["img_s_median"] == 13.0
    assert summary["float32"]["p50_ms_median"] == 90.0
    assert summary["stand-in"]["p50_ms_median"] == 100.0
    # Each round's service against the same round's stand-in.
    assert summary["float32"]["ratio_to_standin"] == [1.3, 1.1, 1.5]
    assert summary["float32"]["ratio_to_standin_median"] == 1.3
    assert summary["bfloat16"]["ratio_to_standin"] == [2.2, 2.0, 2.5]
    assert summary["bfloat16"]["ratio_to_standin_median"] == 2.2
    assert summary["stand-in"]["ratio_to_standin"] == [1.0, 1.0, 1.0]


def test_ratio_median_is_not_the_ratio_of_medians() -> None:
    rounds = [measured_round((10.0, 1.0), (30.0, 1.0), (1.0, 1.0)), measured_round((20.0, 1.0), (10.0, 1.0), (1.0, 1.0))]
    rounds.append(measured_round((30.0, 1.0), (20.0, 1.0), (1.0, 1.0)))
    summary = summarize(rounds)
    assert summary["float32"]["ratio_to_standin"] == [3.0, 0.5, 0.667]
    assert summary["float32"]["ratio_to_standin_median"] == 0.667  # the medians' ratio would be 20 / 20 = 1.0


def test_table_has_issue_13s_rows_with_each_rounds_figure() -> None:
    lines = table(summarize(ROUNDS), clients=16, batch_sizes=[1, 8, 16]).splitlines()
    assert lines[0] == "| load | stand-in: torch fp32 loop, best of batch 1/8/16 | Imbeddings fp32 | Imbeddings bf16 |"
    assert lines[2] == "| 16 clients × 1 image, img/s | 10.0 (10.0, 12.0, 8.0) | 13.0 (13.0, 13.2, 12.0) | 22.0 (22.0, 24.0, 20.0) |"
    assert lines[3] == "| 1 client, p50 ms | 100 (100, 96, 110) | 90 (90, 94, 88) | 60 (60, 58, 65) |"
    assert lines[4] == "| img/s ÷ stand-in, median of the rounds' ratios | 1.00 (1.00, 1.00, 1.00) | 1.30 (1.30, 1.10, 1.50) | 2.20 (2.20, 2.00, 2.50) |"
