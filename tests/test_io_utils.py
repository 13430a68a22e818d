"""pnpp_tf.io_utils: a file is replaced whole or left as it was, with no temporary left behind."""

import concurrent.futures
import os
import re

import keras
import pytest

from full_disk import fill_leaving, listing, small_disk  # noqa: F401 - small_disk is a fixture
from pnpp_tf.io_utils import (OutOfSpaceError, Staged, _temporary_name, is_temporary_name, read_json_object,
                              replacing, replacing_dir, save_keras_atomic, variables_bytes, write_atomic,
                              write_json)


def test_a_file_is_written_whole_in_a_new_folder(tmp_path):
    path = tmp_path / "new" / "folder" / "out.json"
    write_json(str(path), {"b": 1, "a": "\u00e9"})
    assert path.read_text(encoding="utf-8") == '{\n  "a": "\\u00e9",\n  "b": 1\n}'
    write_atomic(str(path), b"replaced")
    assert path.read_bytes() == b"replaced"
    assert os.listdir(path.parent) == ["out.json"]


def test_a_failed_block_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with replacing(str(path)) as partial:
            with open(partial, "w", encoding="utf-8") as file:
                file.write("half of the n")
            raise KeyboardInterrupt
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_tensorflow_errors_are_raised_as_os_errors(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError, match="a_file"):
        write_atomic(str(blocker / "below_a_file.txt"), "text")
    assert os.listdir(tmp_path) == ["a_file"]


def test_writers_of_the_same_files_at_once_all_succeed(tmp_path):
    # As several workers building one image cache: same process here, so a pid alone would clash.
    paths = [str(tmp_path / f"entry_{i}.bin") for i in range(100)]

    def write_all(writer):
        for path in paths:
            write_atomic(path, bytes([writer]) * 100_000)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(write_all, [1, 2, 3, 4]))  # re-raises any writer's error
    for path in paths:
        contents = open(path, "rb").read()
        assert len(contents) == 100_000 and len(set(contents)) == 1  # one writer's whole copy
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(path) for path in paths)


def test_a_directory_appears_whole_or_not_at_all(tmp_path):
    path = tmp_path / "export" / "3"
    with replacing_dir(str(path)) as partial:
        os.makedirs(partial)
        (tmp_path / "export" / os.path.basename(partial) / "saved_model.pb").write_bytes(b"graph")
        assert not path.exists()  # a watcher sees nothing until the directory is complete
    assert (path / "saved_model.pb").read_bytes() == b"graph"
    assert os.listdir(tmp_path / "export") == ["3"]

    with pytest.raises(KeyboardInterrupt):
        with replacing_dir(str(tmp_path / "export" / "4")) as partial:
            os.makedirs(os.path.join(partial, "variables"))
            raise KeyboardInterrupt
    assert os.listdir(tmp_path / "export") == ["3"]


def test_a_directory_is_not_renamed_over_an_existing_one(tmp_path):
    (tmp_path / "3").mkdir()
    with pytest.raises(OSError, match="3"):
        with replacing_dir(str(tmp_path / "3")) as partial:
            os.makedirs(partial)
    assert os.listdir(tmp_path) == ["3"] and os.listdir(tmp_path / "3") == []


def test_a_full_disk_is_one_line_naming_the_path_and_the_space(small_disk):
    fill_leaving(small_disk, 20_000)
    path = small_disk / "out" / "big.bin"
    with pytest.raises(OutOfSpaceError) as raised:
        write_atomic(str(path), b"x" * 1_000_000)
    assert re.fullmatch(rf"{re.escape(str(path))}: no space left on the device: needs about 1\.0 MB, "
                        r"\d+\.\d MB free\. Free some space, or write elsewhere\.", str(raised.value))
    assert isinstance(raised.value, OSError) and raised.value.needed_bytes == 1_000_000
    with pytest.raises(OutOfSpaceError, match="big_dir: no space left on the device: needs about 1.0 MB"):
        with replacing_dir(str(small_disk / "big_dir"), needed_bytes=1_000_000) as partial:
            os.makedirs(partial)
            write_atomic(os.path.join(partial, "part"), b"x" * 1_000_000)
    assert listing(small_disk) == ["out"]


def test_a_keras_model_is_saved_through_a_temporary_keras_name(tmp_path):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    save_keras_atomic(model, str(tmp_path / "model.keras"))
    assert os.listdir(tmp_path) == ["model.keras"]
    loaded = keras.saving.load_model(str(tmp_path / "model.keras"))
    assert [w.shape for w in loaded.get_weights()] == [(3, 2), (2,)]
    assert variables_bytes(model.weights) == (3 * 2 + 2) * 4
    with pytest.raises(ValueError, match="model.h5: a Keras model file's name must end in .keras"):
        save_keras_atomic(model, str(tmp_path / "model.h5"))


@pytest.mark.parametrize("contents, problem", [
    (None, "no such results.json"),
    ('{"flags": {"data', "is not valid JSON .*cut short"),
    ("[1]", "holds a JSON list, not an object"),
])
def test_a_json_object_reader_names_the_file(tmp_path, contents, problem):
    path = tmp_path / "results.json"
    if contents is not None:
        path.write_text(contents)
    with pytest.raises(ValueError, match=f"^{path}: .*{problem}") as raised:
        read_json_object(str(path), "results.json")
    assert "\n" not in str(raised.value)


def test_staged_parts_appear_only_when_published(tmp_path):
    folder, report = Staged(str(tmp_path / "tflite" / "1"), directory=True), Staged(str(tmp_path / "1.json"))
    with folder.writing() as partial:
        os.makedirs(partial)
        write_atomic(os.path.join(partial, "model.tflite"), b"flatbuffer")
    with report.writing() as partial:
        write_atomic(partial, "{}")
    written = os.listdir(tmp_path / "tflite") + [os.path.basename(report.temporary)]
    assert len(written) == 2 and all(is_temporary_name(name) for name in written)
    assert not (tmp_path / "tflite" / "1").exists() and not (tmp_path / "1.json").exists()
    for part in (folder, report):
        part.publish()
        part.discard()  # nothing to discard once published
    assert (tmp_path / "tflite" / "1" / "model.tflite").read_bytes() == b"flatbuffer"
    assert sorted(os.listdir(tmp_path)) == ["1.json", "tflite"] and os.listdir(tmp_path / "tflite") == ["1"]


def test_a_discarded_part_leaves_nothing(tmp_path):
    part = Staged(str(tmp_path / "3"), directory=True)
    with part.writing() as partial:
        os.makedirs(os.path.join(partial, "variables"))
    part.discard()
    assert os.listdir(tmp_path) == []
    with pytest.raises(OSError, match="3"):
        part.publish()  # its temporary is gone


def test_a_staged_part_on_a_full_disk_names_its_final_path(small_disk):
    fill_leaving(small_disk, 20_000)
    part = Staged(str(small_disk / "tflite" / "1"), directory=True)
    with pytest.raises(OutOfSpaceError, match=r"tflite/1: no space left on the device: needs about 1\.0 MB"):
        with part.writing() as partial:
            os.makedirs(partial)
            write_atomic(os.path.join(partial, "model.tflite"), b"x" * 1_000_000)
    assert listing(small_disk) == ["tflite"]


def test_temporary_names_are_recognised():
    assert is_temporary_name(_temporary_name("export/3"))
    assert is_temporary_name(_temporary_name("run/embedder.keras", suffix=".keras"))
    assert is_temporary_name("1.partial-my-host.example-123-0a1b2c3d")
    assert not is_temporary_name("1.partial-notes") and not is_temporary_name("export/3")
