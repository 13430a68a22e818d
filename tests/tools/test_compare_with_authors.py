"""tools/compare_with_authors.py and tools/authors_patches.py: the patching of the authors' code,
the dataset layout their ImageFolder reads, their log's parsing and the curve aggregation.

Most tests need neither torch nor the authors' code. Those that patch the real code need a
checkout of github.com/euwern/proxynca_pp in $PNPP_AUTHORS_DIR (skipped without it); the one that
imports the patched copy also needs torch and torchvision (run in a fresh process of
$PNPP_TORCH_PYTHON, default this Python, so that TensorFlow is never imported beside torch).
"""

import json
import os
import subprocess
import sys

import pytest

from cli_helpers import REPO

sys.path.insert(0, str(REPO / "tools"))
import authors_patches  # noqa: E402 pylint: disable=wrong-import-position
import compare_with_authors  # noqa: E402 pylint: disable=wrong-import-position

AUTHORS_DIR = os.environ.get("PNPP_AUTHORS_DIR", "")
TORCH_PYTHON = os.environ.get("PNPP_TORCH_PYTHON", sys.executable)
needs_checkout = pytest.mark.skipif(not os.path.isfile(os.path.join(AUTHORS_DIR, "train.py")),
                                    reason="set PNPP_AUTHORS_DIR to a checkout of euwern/proxynca_pp")

FAKE_LOG = """2026-12-06 22:00:00,000 **warm up for 1 epochs.**
2026-12-06 22:00:01,000 warm up ends in 1 epochs
2026-12-06 22:00:01,500 **Evaluating after warm-up...**
2026-12-06 22:00:02,000 NMI: 100.000
2026-12-06 22:00:02,000 R@1 : 7.250
2026-12-06 22:00:02,000 R@2 : 11.000
2026-12-06 22:00:03,000 Epoch: 0, loss: 4.100, time (seconds): 10.00.
2026-12-06 22:00:04,000 R@1 : 9.750
2026-12-06 22:00:04,000 R@8 : 30.000
2026-12-06 22:00:05,000 Best val r1: 0.0975
"""


def test_parses_recall_at_1_in_order_from_their_log():
    assert authors_patches.parse_authors_log(FAKE_LOG) == pytest.approx([0.0725, 0.0975])


def test_aggregates_seeds_per_point_and_compares_with_the_authors_range():
    runs = [{"side": "authors", "label": "authors", "seed": s, "recall_at_1": curve}
            for s, curve in enumerate([[0.10, 0.20], [0.12, 0.26], [0.14, 0.23]])]
    runs += [{"side": "pnpp_tf", "label": "pnpp_tf", "seed": s, "recall_at_1": curve}
             for s, curve in enumerate([[0.11, 0.30], [0.13, 0.32], [0.12, 0.34]])]
    curves = compare_with_authors.aggregate(runs)
    assert curves["authors"]["seeds"] == [0, 1, 2]
    first, second = curves["authors"]["epochs"]
    assert (first["mean"], first["min"], first["max"], first["n"]) == pytest.approx((0.12, 0.10, 0.14, 3))
    assert first["std"] == pytest.approx(0.02)
    assert second["mean"] == pytest.approx(0.23) and second["std"] == pytest.approx(0.03)
    rows = compare_with_authors.compare(curves)["pnpp_tf"]
    assert [r["within_reference_range"] for r in rows] == [True, False]
    assert rows[1]["gap"] == pytest.approx(0.32 - 0.23)
    # Welch: (0.32 - 0.23) / sqrt(0.02² / 3 + 0.03² / 3).
    assert rows[1]["welch_t"] == pytest.approx(0.09 / (0.0013 / 3) ** 0.5)
    table = compare_with_authors.format_table(curves, compare_with_authors.compare(curves))
    assert "| warm-up | 12.0 ± 2.0 [10.0, 14.0] | 12.0 ± 1.0 [11.0, 13.0] |" in table
    assert "+0.0, +9.0*" in table
    assert "Welch's t (|t| > 2: a gap beyond the seeds' spread): +0.0, +4.3" in table


def test_refuses_to_aggregate_curves_of_different_lengths():
    runs = [{"label": "a", "seed": 0, "recall_at_1": [0.1]}, {"label": "a", "seed": 1, "recall_at_1": [0.1, 0.2]}]
    with pytest.raises(ValueError, match="different lengths"):
        compare_with_authors.aggregate(runs)


def test_from_json_reaggregates_earlier_runs(tmp_path, capsys):
    runs = [{"side": side, "label": side, "seed": s, "recall_at_1": [0.1 + s / 100, 0.2]}
            for side in ("authors", "pnpp_tf") for s in range(3)]
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"runs": runs}))
    out = tmp_path / "again.json"
    compare_with_authors.main([f"--from_json={earlier}", f"--work_dir={tmp_path}", f"--json={out}"])
    report = json.loads(out.read_text())
    assert report["curves"]["pnpp_tf"]["epochs"][0]["mean"] == pytest.approx(0.11)
    assert "| epoch 1 |" in capsys.readouterr().out


def test_a_patch_whose_text_is_missing_or_repeated_stops(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\nx = 1\n")
    missing = authors_patches.Patch("p", "a.py", "y = 2", "y = 3", "")
    with pytest.raises(authors_patches.AuthorsPatchError, match="found it 0 times"):
        authors_patches.apply_patches(str(tmp_path), [missing])
    twice = authors_patches.Patch("p", "a.py", "x = 1", "x = 2", "")
    with pytest.raises(authors_patches.AuthorsPatchError, match="found it 2 times"):
        authors_patches.apply_patches(str(tmp_path), [twice])
    assert (tmp_path / "a.py").read_text() == "x = 1\nx = 1\n"


def test_links_training_classes_first(tmp_path):
    for split, names in (("train", ["b", "a"]), ("test", ["z", "c", "y"])):
        for name in names:
            os.makedirs(tmp_path / "data" / split / name)
    train, test = authors_patches.link_folder_dataset(str(tmp_path / "data"), str(tmp_path / "images"))
    assert (train, test) == ((0, 2), (2, 5))
    linked = sorted(os.listdir(tmp_path / "images"))
    assert linked == ["0train_a", "0train_b", "1test_c", "1test_y", "1test_z"]
    assert os.path.realpath(tmp_path / "images" / "1test_c") == str((tmp_path / "data" / "test" / "c").resolve())


@needs_checkout
def test_every_patch_applies_to_their_code_and_the_configs_carry_the_recipe(tmp_path):
    data = tmp_path / "data"
    for split, names in (("train", ["a", "b"]), ("test", ["c"])):
        for name in names:
            os.makedirs(data / split / name)
    prepared = authors_patches.prepare_authors_copy(
        AUTHORS_DIR, str(tmp_path / "scratch"), str(data), epochs=2, warmup_epochs=1, batch_size=16,
        classes_per_batch=4, embedding_dim=64, lr=1e-3, proxy_lr=5.0, image_size=48)
    assert prepared["patches"] == [p.name for p in authors_patches.PATCHES]
    code = tmp_path / "scratch" / "code"
    train_py = (code / "train.py").read_text()
    assert train_py.startswith("\nimport _cpu_shim") or "import _cpu_shim" in train_py.split("import logging")[0]
    assert train_py.count("utils.evaluate(model, dl_val") == 2  # theirs per epoch, ours after the warm-up
    assert "pretrained=True" not in (code / "networks.py").read_text()
    for path in ("train.py", "networks.py", "dataset/utils.py", "dataset/base.py", "_cpu_shim.py"):
        compile((code / path).read_text(), path, "exec")
    config = json.loads((code / "config" / "compare.json").read_text())
    assert (config["nb_epochs"], config["warmup_k"], config["sz_batch"], config["sz_embedding"]) == \
        ("2", "1", "16", "64")
    assert (config["num_class_per_batch"], config["opt"]["args"]["base"]["lr"],
            config["opt"]["args"]["proxynca"]["lr"], config["opt"]["args"]["base"]["eps"]) == \
        ("4", "0.001", "5.0", "1.0")
    dataset = json.loads((code / "dataset" / "config.json").read_text())
    assert dataset["dataset"]["cub"]["classes"]["train"] == "range(0, 2)"
    assert dataset["dataset"]["cub"]["classes"]["val"] == "range(2, 3)"
    assert (dataset["transform_parameters"]["sz_crop"], dataset["transform_parameters"]["sz_resize"]) == ("48", "54")
    # The untouched checkout stays untouched.
    assert "import _cpu_shim" not in open(os.path.join(AUTHORS_DIR, "train.py"), encoding="utf-8").read()


@needs_checkout
def test_the_patched_copy_reads_the_folder_dataset_on_the_cpu(tmp_path):
    probe = subprocess.run([TORCH_PYTHON, "-c", "import torch, torchvision, sklearn, h5py, tqdm"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"{TORCH_PYTHON} lacks torch, torchvision, scikit-learn, h5py or tqdm")
    from conftest import make_folder_dataset

    data = make_folder_dataset(tmp_path / "data", train_classes=3, test_classes=2, images_per_class=4)
    prepared = authors_patches.prepare_authors_copy(
        AUTHORS_DIR, str(tmp_path / "scratch"), data, epochs=1, warmup_epochs=1, batch_size=4,
        classes_per_batch=2, embedding_dim=8, lr=1e-3, proxy_lr=1.0, image_size=32)
    script = """
import _cpu_shim, torch, utils, dataset, json
cfg = utils.load_config('dataset/config.json')
c = cfg['dataset']['cub']
tr = dataset.load('cub', c['root'], c['source'], c['classes']['train'],
                  dataset.utils.make_transform(**cfg['transform_parameters']))
ev = dataset.load('cub', c['root'], c['source'], c['classes']['val'],
                  dataset.utils.make_transform(**cfg['transform_parameters'], is_train=False))
x, y, _ = tr[0]
print(json.dumps({'train': sorted(set(tr.ys)), 'eval': sorted(set(ev.ys)), 'n': [len(tr), len(ev)],
                  'shape': list(x.shape), 'eval_shape': list(ev[0][0].shape),
                  'cuda_is_identity': torch.zeros(2).cuda().device.type}))
"""
    result = subprocess.run([TORCH_PYTHON, "-c", script], cwd=prepared["code_dir"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"train": [0, 1, 2], "eval": [3, 4], "n": [12, 8], "shape": [3, 32, 32],
                    "eval_shape": [3, 32, 32], "cuda_is_identity": "cpu"}


def test_runs_the_sides_seed_by_seed_and_keeps_finished_runs(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_pnpp_tf(args, recipe, seed):
        calls.append(seed)
        if seed == 2:
            raise SystemExit("interrupted")
        return [0.01 * seed, 0.1 + 0.01 * seed]

    monkeypatch.setattr(compare_with_authors, "run_pnpp_tf", fake_pnpp_tf)
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit, match="interrupted"):
        compare_with_authors.main(["--sides=pnpp_tf", "--seeds=0,1,2", "--epochs=1", f"--work_dir={tmp_path}",
                                   f"--json={out}"])
    assert calls == [0, 1, 2]
    kept = json.loads(out.read_text())
    assert kept["partial"] and [run["seed"] for run in kept["runs"]] == [0, 1]
    assert kept["runs"][1]["recall_at_1"] == [0.01, 0.11]
    with pytest.raises(SystemExit, match="--authors_dir"):
        compare_with_authors.main(["--sides=authors", f"--work_dir={tmp_path}"])


def test_a_subset_keeps_the_given_images_a_class_alternately_and_is_reproducible(tmp_path):
    data = tmp_path / "data"
    for split, classes in (("train", 3), ("test", 2)):
        for c in range(classes):
            (data / split / f"c{c}").mkdir(parents=True)
            for i in range(6 if c else 3):  # the first class has fewer images than asked
                (data / split / f"c{c}" / f"{i}.png").write_bytes(b"")
    out = compare_with_authors.link_subset(str(data), str(tmp_path / "subset"), [4, 5])
    kept = {split: {c: sorted(os.listdir(os.path.join(out, split, c))) for c in sorted(os.listdir(os.path.join(out, split)))}
            for split in ("train", "test")}
    assert {split: [len(v) for v in classes.values()] for split, classes in kept.items()} == {
        "train": [3, 5, 4], "test": [3, 5]}
    for split, classes in kept.items():
        for c, names in classes.items():
            for name in names:
                assert os.readlink(os.path.join(out, split, c, name)) == str(data / split / c / name)
    # The same call again finds the same links; a different subset in the same place is refused.
    assert compare_with_authors.link_subset(str(data), str(tmp_path / "subset"), [4, 5]) == out
    with pytest.raises(SystemExit, match="remove"):
        compare_with_authors.link_subset(str(data), str(tmp_path / "subset"), [5, 4])
