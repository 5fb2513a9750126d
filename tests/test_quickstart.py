"""The quick start's promise, checked end to end (slow: four ~2-4-minute CPU runs).

pytest -m slow tests/test_quickstart.py
"""

import math

import pytest

from tests.conftest import read_metrics, run_cli

pytestmark = pytest.mark.slow


def trend_in_standard_errors(records) -> float:
    """(mean reward of the last 3 epochs - first 3) / its standard error."""

    def mean_and_se(rows):
        mean = sum(r["reward_mean"] for r in rows) / len(rows)
        se = math.sqrt(sum((r["reward_std"] / math.sqrt(r["num_samples"])) ** 2 for r in rows)) / len(rows)
        return mean, se

    first, first_se = mean_and_se(records[:3])
    last, last_se = mean_and_se(records[-3:])
    return (last - first) / math.hypot(first_se, last_se)


@pytest.mark.parametrize(
    "overrides",
    [[], ["reward=jpeg_incompressibility"], ["algorithm=grpo", "algorithm.group_size=4"]],
    ids=["compressibility", "incompressibility", "grpo-compressibility"],
)
def test_tiny_preset_learns_its_reward(tmp_path, overrides):
    result = run_cli(tmp_path, ["experiment=tiny_compressibility", "logger=none", *overrides], timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    records = read_metrics(tmp_path)
    assert [r["epoch"] for r in records] == list(range(len(records)))
    assert trend_in_standard_errors(records) > 3


def test_tiny_preset_without_learning_has_no_trend(tmp_path):
    result = run_cli(tmp_path, ["experiment=tiny_compressibility", "logger=none", "train.learning_rate=0"], timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert abs(trend_in_standard_errors(read_metrics(tmp_path))) < 3
