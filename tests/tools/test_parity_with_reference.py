"""tools/torch_reference.py (the authors' loop in PyTorch) and tools/parity_with_reference.py, small.

Skipped where torch is not installed (`pip install -e ".[convert]"`).
"""

import json
import sys

import numpy as np
import pytest

from cli_helpers import REPO, run_python

torch = pytest.importorskip("torch")
sys.path.insert(0, str(REPO / "tools"))
import torch_reference  # noqa: E402 pylint: disable=wrong-import-position


def batch(rng, size=32, n=4, classes=2):
    images = rng.uniform(0, 255, (n, size, size, 3)).astype(np.float32)
    return images, np.repeat(np.arange(classes), n // classes)


def test_reference_state_has_the_converters_keys():
    from pnpp_tf.modeling.torchvision_resnet import build_resnet50_torchvision, expected_state_dict_shapes

    reference = torch_reference.build_reference(num_classes=3, embedding_dim=8)
    state = reference.state()
    expected = {k: tuple(shape) for k, (_, shape) in
                expected_state_dict_shapes(build_resnet50_torchvision((32, 32, 3))).items()}
    assert {k: v.shape for k, v in state.items() if k not in ("embedding.weight", "embedding.bias", "proxies")} == expected
    assert state["embedding.weight"].shape == (8, 2048) and state["proxies"].shape == (3, 8)


def test_warmup_moves_batch_norm_statistics_but_no_backbone_weight():
    rng = np.random.default_rng(0)
    reference = torch_reference.build_reference(num_classes=2, embedding_dim=8, lr=1e-2, proxy_lr=1.0)
    before = reference.state()
    reference.start_warmup()
    loss = reference.step(*batch(rng))
    after = reference.state()
    assert np.isfinite(loss)
    for key in ("conv1.weight", "layer4.2.bn3.weight", "layer4.2.bn3.bias"):
        np.testing.assert_array_equal(after[key], before[key])
    for key in ("bn1.running_mean", "bn1.running_var", "embedding.weight", "proxies"):
        assert np.any(after[key] != before[key]), key
    # The last gradients are the unclipped ones; the backbone has them even in the warm-up.
    assert reference.last_gradients["conv1.weight"].shape == before["conv1.weight"].shape
    reference.start_main()
    reference.step(*batch(rng))
    assert np.any(reference.state()["conv1.weight"] != after["conv1.weight"])


def test_reference_clips_backbone_and_embedding_but_not_the_proxies():
    rng = np.random.default_rng(1)
    reference = torch_reference.build_reference(num_classes=2, embedding_dim=8, lr=1.0, proxy_lr=1.0,
                                                clip_value=1e-6)
    reference.start_main()
    before = reference.state()
    reference.step(*batch(rng))
    after = reference.state()
    # Adam's first step is lr * g / (|g| + 1): at most 1e-6 for a clipped gradient.
    assert np.abs(after["embedding.weight"] - before["embedding.weight"]).max() <= 1.1e-6
    assert np.abs(after["proxies"] - before["proxies"]).max() > 1e-4


def test_reference_module_does_not_import_tensorflow():
    result = run_python("-c", "import sys; sys.path.insert(0, 'tools'); import torch_reference; "
                              "print('tensorflow' in sys.modules)", cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


@pytest.mark.slow
def test_harness_agrees_with_the_reference_before_the_loop_turns_chaotic(tmp_path):
    """The warm-up step and the first main step, float32, at the recipe's learning rates.

    These two steps are computed from (nearly) the same weights on both sides, so they agree to
    float32 rounding amplified through 50 layers (measured 2e-6 to 2e-5 and 1e-5 to 1.1e-4 on the
    loss, the spread being kernels' summation orders; PyTorch's float32 loop against its float64
    self: 4e-5 and 2e-5; issue 17's bar is 1e-3), 1.4e-4 to 2e-4 on
    the weights after the warm-up: the proxies, which move by up to 400 x their gradient). From
    the second main step on, the loop amplifies any difference (PyTorch's float32 loop against its
    float64 self included, `--control`), so later steps are the README's table, not a test.
    """
    output = tmp_path / "parity.json"
    result = run_python(str(REPO / "tools" / "parity_with_reference.py"), "--warmup_steps=1", "--steps=1",
                        "--batch_size=8", "--image_size=64", "--embedding_dim=64", "--control",
                        f"--json={output}", timeout=900)
    assert output.exists(), result.stderr[-3000:]  # exit 1: the later weights miss the bar
    saved = json.loads(output.read_text())
    rows = saved["rows"]
    assert [(row["phase"], row["step"]) for row in rows] == [("warm-up", 1), ("main", 2)], result.stderr[-3000:]
    assert all(row["loss_rel_diff"] <= 1e-3 for row in rows)
    assert rows[0]["weight_rel_diff"] <= 1e-3
    assert "control_loss_rel_diff" in rows[1] and saved["machine"]["cpu"]
    assert "| warm-up | 1 |" in result.stdout
