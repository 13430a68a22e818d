"""pnpp_tf.plots, tools/plot_training.py and tools/retrieval_grid.py: PNGs of the expected size."""

import importlib.util
import json
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import make_folder_dataset
from full_disk import fill_leaving, listing, small_disk  # noqa: F401 - small_disk is a fixture
from pnpp_tf import plots
from pnpp_tf.plots import curves
from pnpp_tf.modeling.model import build_embedder

TOOLS = pathlib.Path(__file__).resolve().parents[2] / "tools"
HISTORY = {  # 1 warm-up + 5 epochs, an LR drop after epoch 4
    "loss": [6.0, 4.7, 4.1, 3.8, 3.5, 3.3],
    "test_recall@1": [0.45, 0.58, 0.61, 0.62, 0.63, 0.66],
    "test_recall@2": [0.6, 0.73, 0.75, 0.77, 0.78, 0.81],
    "test_map@r": [0.11, 0.19, 0.2, 0.24, 0.29, 0.32],
    "lr": [4e-3] * 4 + [4e-4] * 2,
    "proxy_lr": [400.0] * 4 + [40.0] * 2,
}


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # the whole file decodes
        return image.size


def test_training_curves(tmp_path):
    path = plots.save_training_curves(HISTORY, str(tmp_path / "curves.png"), warmup_epochs=1,
                                      title="run")
    assert _png_size(path) == plots.CURVES_SIZE
    # Evaluated every 2nd epoch; a validation split (stage 1); nothing at all: still a figure.
    sparse = dict(HISTORY, **{"val_recall@1": [0.5, 0.6, 0.7]})
    del sparse["test_recall@1"], sparse["test_recall@2"], sparse["test_map@r"]
    assert _png_size(plots.save_training_curves(sparse, str(tmp_path / "a.png"), eval_every=2)) \
        == plots.CURVES_SIZE
    assert _png_size(plots.save_training_curves({}, str(tmp_path / "b.png"))) == plots.CURVES_SIZE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "curves.png"]


def test_series_places_sparse_evaluations_at_their_epochs():
    history = {"loss": [1, 2, 3, 4], "test_recall@1": [0.1, 0.2]}
    series = curves._series(history, 2, {})  # pylint: disable=protected-access
    np.testing.assert_array_equal(series["test_recall@1"][0], [2, 4])
    np.testing.assert_array_equal(series["loss"][0], [1, 2, 3, 4])


def _write_tensorboard(log_dir, history, first_step=0):
    writer = tf.summary.create_file_writer(str(log_dir / "train"))
    with writer.as_default():
        for name, values in history.items():
            for step, value in enumerate(values, start=first_step):
                tf.summary.scalar(f"epoch_{name}", value, step=step)
    writer.close()


def test_plot_training_tool_from_results_and_from_logs(tmp_path):
    tool = _tool("plot_training")
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(
        {"history": HISTORY, "flags": {"warmup_epochs": 1, "eval_every": 1, "dataset": "glyphs"}}))
    assert tool.main([f"--model_dir={run}"]) == 0
    assert _png_size(run / "curves.png") == plots.CURVES_SIZE

    # An interrupted run: TensorBoard logs only, from two fit() calls as the trainer writes them.
    partial = tmp_path / "partial"
    _write_tensorboard(partial / "logs", {k: v[:1] for k, v in HISTORY.items()})
    _write_tensorboard(partial / "logs", {k: v[1:4] for k, v in HISTORY.items()}, first_step=1)
    history, epochs = plots.read_tensorboard_history(str(partial / "logs"))
    assert epochs["loss"] == [1, 2, 3, 4]
    np.testing.assert_allclose(history["test_recall@1"], HISTORY["test_recall@1"][:4], rtol=1e-6)
    out = tmp_path / "partial.png"
    assert tool.main([f"--model_dir={partial}", f"--output={out}"]) == 0
    assert _png_size(out) == plots.CURVES_SIZE

    assert tool.main([f"--model_dir={tmp_path / 'missing'}"]) == 2
    (tmp_path / "empty").mkdir()
    assert tool.main([f"--model_dir={tmp_path / 'empty'}"]) == 2


def test_search_grid_wraps_rows_and_marks_unreadable_images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (30 + 10 * i, 40, 3), np.uint8)).save(paths[-1])
    (tmp_path / "bad.png").write_bytes(b"nope")
    neighbours = paths[1:] + [str(tmp_path / "bad.png"), str(tmp_path / "gone.png")]
    out = plots.save_search_grid(paths[0], neighbours, np.linspace(0, 1, 6),
                                 str(tmp_path / "grid.png"), max_columns=4, title="t")
    expected = (4 * plots.CELL_WIDTH, 2 * plots.CELL_HEIGHT + plots.GRID_HEADER)
    assert _png_size(out) == plots.grid_size(2, 4, title=True) == expected
    assert plots.load_thumbnail(str(tmp_path / "bad.png")) is None
    assert plots.load_thumbnail(paths[4]).shape == (plots.CELL_WIDTH - 14,) * 2 + (3,)


def test_embedding_scatter(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(25), 4)
    embeddings = rng.normal(size=(100, 8)) + labels[:, None]
    names = [f"class_{i}" for i in range(25)]
    out = plots.save_embedding_scatter(embeddings, labels, names, str(tmp_path / "pca.png"))
    assert _png_size(out) == plots.SCATTER_SIZE
    with pytest.raises(ValueError, match="N >= 3"):
        plots.save_embedding_scatter(embeddings[:2], labels[:2], names, str(tmp_path / "x.png"))


@pytest.mark.slow
def test_retrieval_grid_tool(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data", train_classes=2, test_classes=3,
                                   images_per_class=4)
    run = tmp_path / "run"
    run.mkdir()
    keras.utils.set_random_seed(0)
    build_embedder("small_cnn", 32, 16).save(run / "embedder.keras")
    (run / "results.json").write_text(json.dumps(
        {"flags": {"dataset": "folder", "data_dir": data_dir, "image_size": 32}}))
    tool = _tool("retrieval_grid")
    grid, scatter = tmp_path / "grid.png", tmp_path / "pca.png"
    summary = tool.make_pictures(str(run), str(grid), str(scatter), queries=2, k=3, verbose=0)
    assert _png_size(grid) == plots.grid_size(2, 4, title=True)
    assert _png_size(scatter) == plots.SCATTER_SIZE
    assert summary["shown"] == 6 and 0 <= summary["correct"] <= 6
    # More queries than classes: one row per class.
    assert tool.main([f"--model={run}", f"--output={grid}", "--queries=10", "--k=2",
                      "--quiet"]) == 0
    assert _png_size(grid) == plots.grid_size(3, 3, title=True)
    assert tool.main([f"--model={run}", f"--output={grid}", "--split=nope", "--quiet"]) == 2
    assert tool.main([f"--model={tmp_path}", f"--output={grid}", "--quiet"]) == 2


@pytest.mark.parametrize("tool_name, args, results, problem", [
    ("plot_training", [], "[1]", "holds a JSON list, not an object"),
    ("plot_training", [], '{"history": {"loss": [6.0, 4.', "is not valid JSON"),
    ("retrieval_grid", ["--output=grid.png"], '{"flags": {"data', "is not valid JSON"),
    ("retrieval_grid", ["--output=grid.png"], "[1]", "holds a JSON list, not an object"),
])
def test_tools_name_an_unreadable_results_json(tmp_path, capsys, tool_name, args, results, problem):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(results)
    flag = "--model_dir" if tool_name == "plot_training" else "--model"
    assert _tool(tool_name).main([f"{flag}={run}", *args]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"{tool_name}.py: error: {run / 'results.json'}: this results.json")
    assert problem in error and "\n" not in error
    assert not list(tmp_path.glob("**/*.png"))


def test_plot_training_on_a_full_disk_is_one_line_and_leaves_no_png(tmp_path, capsys, small_disk):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"history": HISTORY}))
    fill_leaving(small_disk, 4096)
    output = small_disk / "curves.png"
    assert _tool("plot_training").main([f"--model_dir={run}", f"--output={output}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"plot_training.py: error: {output}: no space left on the device:")
    assert "\n" not in error and listing(small_disk) == []
