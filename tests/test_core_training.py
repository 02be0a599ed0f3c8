"""A functional check of the whole loop: LTE trains a ViT from scratch on real digits to >= 90% test accuracy."""
import pytest

from lte.config import load_spec
from lte.train import train


@pytest.mark.timeout(900)
def test_short_lte_run_on_digits_reaches_90_percent():
    spec = load_spec("configs/digits.yaml", {"optim": {"steps": 800}, "eval_every": 400})
    result = train(spec, "lte", progress=False)
    assert result["merges"] == 800 // spec.lte.merge_every
    assert result["test_accuracy"] >= 0.90, result["eval_curve"]
    assert result["eval_curve"][0]["test_accuracy"] < result["test_accuracy"]
