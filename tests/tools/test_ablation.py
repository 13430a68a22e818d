"""tools/ablation.py runs variants in their own model_dirs, resumes, and writes its table."""

import json

import pytest

from cli_helpers import REPO, TINY_RUN, run_python
from conftest import make_folder_dataset

pytestmark = pytest.mark.slow  # end-to-end runs of the programs


def run_ablation(*args):
    return run_python(str(REPO / "tools" / "ablation.py"), *args)


def test_runs_resumes_and_tabulates(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data")
    output = tmp_path / "ablation"
    args = ["--only=full,-fast_proxies,proxynca", f"--output_dir={output}", *TINY_RUN, "--dataset=folder",
            f"--data_dir={data_dir}", "--eval_ks=1,2", "--epochs=1", "--warmup_epochs=1", "--eval_every=0"]
    first = run_ablation(*args)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    table = json.loads((output / "ablation.json").read_text())
    assert [row["variant"] for row in table] == ["full", "-fast_proxies", "proxynca"]
    assert table[0]["delta_recall@1"] == 0.0
    # Fast proxies off: the proxies get the backbone's learning rate (TINY_RUN's --lr=1e-3).
    assert json.loads((output / "fast_proxies" / "results.json").read_text())["flags"]["proxy_lr"] == 1e-3
    original = json.loads((output / "proxynca" / "results.json").read_text())["flags"]
    assert (original["loss"], original["pooling"], original["layer_norm"], original["sampler"]) == \
        ("proxynca", "avg", False, "random")
    assert "| full |" in (output / "ablation.md").read_text()

    second = run_ablation(*args)
    assert second.returncode == 0
    assert second.stdout.count("done before") == 3


def test_an_unreadable_results_json_of_a_finished_variant_is_named(tmp_path):
    output = tmp_path / "ablation"
    (output / "full").mkdir(parents=True)
    results = output / "full" / "results.json"
    for contents, problem in (('{"metrics": {"recall', "is not valid JSON"),
                              ("[1]", "holds a JSON list, not an object"),
                              ('{"metrics": {}}', "lacks what a finished run records")):
        results.write_text(contents)
        result = run_ablation("--only=full", f"--output_dir={output}", *TINY_RUN)
        assert result.returncode == 2, result.stderr[-3000:]
        assert "done before" in result.stdout and "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("tools/ablation.py: error:")]
        assert len(errors) == 1 and errors[0].startswith(f"tools/ablation.py: error: {results}")
        assert problem in errors[0]
        assert sorted(p.name for p in output.iterdir()) == ["full"]  # no table written


def test_pooling_variants_on_a_keras_hub_transformer(tmp_path):
    pytest.importorskip("keras_hub", reason='keras-hub is not installed: pip install -e ".[hub]"',
                        exc_type=ImportError)
    import hub_presets  # pylint: disable=import-outside-toplevel - needs keras_hub

    preset, _ = hub_presets.save_preset(tmp_path / "preset", "dinov2")
    data_dir = make_folder_dataset(tmp_path / "data")
    output = tmp_path / "ablation"
    run = [arg for arg in TINY_RUN if not arg.startswith(("--backbone", "--weights", "--image_size"))]
    result = run_ablation("--only=full,-global_max_pooling,cls_token", f"--output_dir={output}", *run,
                          "--backbone=keras_hub", f"--backbone_preset={preset}",
                          f"--image_size={hub_presets.IMAGE_SIZE}",
                          "--dataset=folder", f"--data_dir={data_dir}", "--eval_ks=1", "--epochs=1",
                          "--warmup_epochs=0", "--eval_every=0")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    table = json.loads((output / "ablation.json").read_text())
    assert [row["variant"] for row in table] == ["full", "-global_max_pooling", "cls_token"]
    poolings = [json.loads((output / name / "results.json").read_text())["flags"]["pooling"]
                for name in ("full", "global_max_pooling", "cls_token")]
    assert poolings == ["max", "avg", "cls"]


def test_the_cls_token_variant_is_only_offered_for_transformers(tmp_path):
    result = run_ablation("--only=cls_token", f"--output_dir={tmp_path}", *TINY_RUN)
    assert result.returncode == 2 and "unknown variants ['cls_token']" in result.stderr
