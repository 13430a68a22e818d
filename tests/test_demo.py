"""The README's demo command really learns: zero-shot Recall@1 rises by at least 0.15."""

import json

import pytest

from cli_helpers import REPO, run_module

pytestmark = pytest.mark.slow  # end-to-end runs of the programs


def test_demo_recipe_learns_unseen_letters(tmp_path):
    result = run_module(
        "pnpp_tf.train", f"--flagfile={REPO / 'configs' / 'demo.flags'}",
        f"--data_dir={tmp_path / 'glyphs'}", f"--model_dir={tmp_path / 'run'}", "--verbose=0",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    gain = results["metrics"]["recall@1"] - results["before_training"]["recall@1"]
    assert results["metrics"]["num_queries"] > 1000
    assert gain >= 0.15, (results["before_training"]["recall@1"], results["metrics"]["recall@1"])
