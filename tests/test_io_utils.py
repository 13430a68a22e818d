"""pnpp_tf.io_utils: a file is replaced whole or left as it was, with no temporary left behind."""

import concurrent.futures
import os

import pytest

from pnpp_tf.io_utils import replacing, write_atomic, write_json


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
