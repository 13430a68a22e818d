"""tools/bench_ann.py on tiny data: every backend x dtype row, exact's recall, the metrics it computes."""

import importlib.util
import json

import numpy as np
import pytest

from cli_helpers import REPO, run_python
from pnpp_tf.retrieval.metrics import retrieval_metrics

BACKENDS = ("exact", "hnsw", "ivfpq")
DTYPES = ("float32", "float16", "int8")
TINY = ("--num_items=2000", "--dim=32", "--num_queries=100", "--single_queries=10", "--noise=1.5")

pytest.importorskip("usearch")
pytest.importorskip("faiss")

_SPEC = importlib.util.spec_from_file_location("bench_ann", REPO / "tools" / "bench_ann.py")


def _tool():
    import sys  # pylint: disable=import-outside-toplevel

    sys.path.insert(0, str(REPO / "tools"))  # its `from machine import ...`
    module = importlib.util.module_from_spec(_SPEC)
    _SPEC.loader.exec_module(module)
    return module


def test_every_backend_and_dtype_is_a_row_and_exact_finds_the_exact_lists(tmp_path):
    output = tmp_path / "ann.json"
    result = run_python(str(REPO / "tools" / "bench_ann.py"), *TINY, "--memory=none", f"--work_dir={tmp_path / 'work'}",
                        f"--output={output}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert [(row["backend"], row["dtype"]) for row in report["rows"]] == [(b, d) for b in BACKENDS for d in DTYPES]
    exact = report["rows"][0]
    assert exact["metrics"]["recall@10"] == 1.0
    assert exact["delta"] == {"recall@1": 0.0, "map@r": 0.0}
    for row in report["rows"]:
        assert 0.9 <= row["metrics"]["recall@10"] <= 1.0, row
        assert row["single"]["queries"] == 10 and row["single"]["queries_per_second"] > 0
        assert row["batch"]["queries"] == 100 and row["batch"]["batch_size"] == 64
        assert row["disk_bytes"] > 0 and row["build"]["seconds"] > 0
        assert row["repeatable"]
    assert [row["structure_bytes"] > 0 for row in report["rows"]] == [False] * 3 + [True] * 6
    assert report["data"]["classes"] == 40 and report["data"]["r_max"] == 50
    assert report["machine"]["cpu"] and report["machine"]["usearch"] and report["machine"]["faiss"]
    assert len(report["targets"]) == 2 + 3 * 2
    assert "| exact | float32 |" in result.stdout and "Machine: " in result.stdout
    # The data and ground truth are made once: a second run reuses them.
    again = run_python(str(REPO / "tools" / "bench_ann.py"), *TINY, "--memory=none", "--backends=hnsw",
                       "--dtypes=int8", f"--work_dir={tmp_path / 'work'}", timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Wrote " not in again.stderr and "cached" in again.stderr


@pytest.mark.slow  # fresh processes, each importing TensorFlow
def test_memory_is_measured_in_fresh_processes(tmp_path):
    output = tmp_path / "ann.json"
    result = run_python(str(REPO / "tools" / "bench_ann.py"), *TINY, "--backends=hnsw", "--dtypes=float16",
                        f"--work_dir={tmp_path / 'work'}", f"--output={output}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(output.read_text())["rows"]
    for mode in ("mmap", "loaded"):
        assert row["memory"][mode]["peak_rss_bytes"] > 0
    assert row["build"]["peak_rss_bytes"] is not None


def test_recall_at_1_and_map_at_r_from_lists_agree_with_the_metrics_module():
    tool = _tool()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, 300)
    x = rng.standard_normal((12, 16))[labels] + 1.5 * rng.standard_normal((300, 16))
    data = {"query_labels": labels, "gallery_labels": labels, "r": np.bincount(labels)[labels] - 1}
    depth = int(data["r"].max())
    from pnpp_tf.retrieval import neighbours  # pylint: disable=import-outside-toplevel

    _, ids = neighbours.nearest(x, x, depth, exclude=np.arange(300))
    ours = tool.list_metrics(ids[:, :10], ids, data)
    theirs = retrieval_metrics(x, labels, ks=(1,))
    assert ours["recall@1"] == pytest.approx(theirs["recall@1"], abs=1e-12)
    assert ours["map@r"] == pytest.approx(theirs["map@r"], abs=1e-12)


def test_map_at_r_by_hand():
    tool = _tool()
    labels = np.array([0, 0, 1, 1, 0])  # gallery items 0..4
    # A query of class 0 (R = 3): relevant at positions 1 and 3 of its first 3 -> (1/1 + 2/3) / 3.
    ids = np.array([[0, 2, 1, 4, 3], [2, -1, 3, 0, 1]])
    assert tool.map_at_r(ids, np.array([0, 1]), labels, np.array([3, 2])) == pytest.approx(
        ((1 + 2 / 3) / 3 + (1 / 1) / 2) / 2)
    assert tool.recall_at_1(ids, np.array([0, 1]), labels) == 1.0
    assert tool.recall_against(ids[:, :2], np.array([[0, 2], [3, 2]])) == 0.75
