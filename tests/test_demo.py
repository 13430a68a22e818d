"""The README's demo command really learns: zero-shot Recall@1 rises by at least 0.15."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_demo_recipe_learns_unseen_letters(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-m", "pnpp_tf.train", f"--flagfile={REPO / 'configs' / 'demo.flags'}",
         f"--data_dir={tmp_path / 'glyphs'}", f"--model_dir={tmp_path / 'run'}", "--verbose=0"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    gain = results["metrics"]["recall@1"] - results["before_training"]["recall@1"]
    assert results["metrics"]["num_queries"] > 1000
    assert gain >= 0.15, (results["before_training"]["recall@1"], results["metrics"]["recall@1"])
