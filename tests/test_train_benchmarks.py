"""The CLI on each benchmark miniature (the dataset's own metric names), and the two-stage schedule."""

import json

import pytest

import miniatures
from cli_helpers import TINY_RUN, run_module
from conftest import make_folder_dataset

pytestmark = pytest.mark.slow  # end-to-end runs of the programs


BUILDERS = {
    "cub": (miniatures.make_cub, ("recall@1", "recall@2", "recall@4", "recall@8", "nmi")),
    "cars196": (miniatures.make_cars196, ("recall@1", "recall@2", "recall@4", "recall@8", "nmi")),
    # 1,200 test images: enough candidates for Recall@1000.
    "sop": (miniatures.make_sop, ("recall@1", "recall@10", "recall@100", "recall@1000")),
    "inshop": (miniatures.make_inshop, ("recall@1", "recall@10", "recall@20", "recall@30", "recall@40", "recall@50")),
}


@pytest.mark.parametrize("dataset", sorted(BUILDERS))
def test_one_epoch_on_each_benchmark_miniature(tmp_path, dataset):
    build, metric_names = BUILDERS[dataset]
    data_dir = build(tmp_path / "data")
    model_dir = tmp_path / "run"
    result = run_module("pnpp_tf.train", *TINY_RUN, f"--dataset={dataset}", f"--data_dir={data_dir}",
                        f"--model_dir={model_dir}", "--epochs=1", "--warmup_epochs=0", "--eval_every=0")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((model_dir / "results.json").read_text())
    expected = set(metric_names) | {"map@r", "r_precision"}
    assert set(results["metrics"]) - {"num_queries", "num_queries_without_positives"} == expected
    assert results["evaluated_on"] == ("query_gallery" if dataset == "inshop" else "test")


def test_stage_one_records_the_schedule_that_stage_two_replays(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data", train_classes=6, images_per_class=4)
    stage_one = tmp_path / "stage1"
    result = run_module("pnpp_tf.train", *TINY_RUN, "--dataset=folder", f"--data_dir={data_dir}",
                        f"--model_dir={stage_one}", "--mode=train", "--epochs=4", "--warmup_epochs=1",
                        "--plateau_patience=0", "--eval_ks=1")
    assert result.returncode == 0, result.stderr[-3000:]
    schedule = json.loads((stage_one / "schedule.json").read_text())
    history = json.loads((stage_one / "results.json").read_text())["history"]
    val_recall = history["val_recall@1"][1:]  # main epochs, after the warm-up epoch
    assert schedule["best_epoch"] == 1 + val_recall.index(max(val_recall))
    assert schedule["best_value"] == pytest.approx(max(val_recall))
    # Patience 0: every main epoch that does not improve drops both rates tenfold for the next.
    best, expected_drops = None, []
    for epoch, value in enumerate(val_recall, start=1):
        if best is None or value > best * (1 + 1e-4):
            best = value
        else:
            expected_drops.append(epoch)
    assert schedule["lr_drop_epochs"] == expected_drops
    assert history["lr"][1] == pytest.approx(1e-3)
    for epoch in [e for e in expected_drops if e < len(val_recall)]:  # a rate used after the drop
        assert history["lr"][1 + epoch] == pytest.approx(history["lr"][epoch] * 0.1)
        assert history["proxy_lr"][1 + epoch] == pytest.approx(history["proxy_lr"][epoch] * 0.1)

    stage_two = tmp_path / "stage2"
    result = run_module("pnpp_tf.train", *TINY_RUN, "--dataset=folder", f"--data_dir={data_dir}",
                        f"--model_dir={stage_two}", f"--lr_schedule_from={stage_one}", "--eval_ks=1",
                        "--warmup_epochs=0")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((stage_two / "results.json").read_text())
    assert len(results["history"]["loss"]) == schedule["best_epoch"]
    assert results["lr_drop_epochs"] == schedule["lr_drop_epochs"]
    drops_so_far = [sum(d <= e for d in schedule["lr_drop_epochs"]) for e in range(schedule["best_epoch"])]
    assert results["history"]["lr"] == pytest.approx([1e-3 * 0.1 ** n for n in drops_so_far])
