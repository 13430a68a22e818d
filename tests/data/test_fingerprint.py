"""The data fingerprint: what a resumed run compares, and how it names the changes."""

import os
import shutil

from conftest import make_folder_dataset
from pnpp_tf.data.fingerprint import DataFingerprint
from pnpp_tf.data.folder import read_folder_dataset


def _fingerprint(data_dir):
    return DataFingerprint.of_splits(read_folder_dataset(str(data_dir)), str(data_dir))


def test_a_dataset_moved_whole_has_the_same_digest(tmp_path):
    data = make_folder_dataset(tmp_path / "data")
    before = _fingerprint(data)
    shutil.move(data, tmp_path / "moved")  # a rename keeps sizes and modification times
    assert _fingerprint(tmp_path / "moved").digest == before.digest
    assert not before.changes_to(_fingerprint(tmp_path / "moved"))


def test_each_kind_of_change_is_named(tmp_path):
    data = tmp_path / "data"
    make_folder_dataset(data, train_classes=3, test_classes=2, images_per_class=4)
    before = _fingerprint(data)
    os.rename(data / "train" / "train_class_01", data / "train" / "renamed")
    shutil.rmtree(data / "train" / "train_class_02")
    os.remove(data / "test" / "test_class_00" / "img_1.jpg")
    with open(data / "test" / "test_class_01" / "img_0.png", "ab") as file:
        file.write(b"x")
    shutil.copy(data / "test" / "test_class_01" / "img_2.png", data / "test" / "test_class_01" / "new.png")
    after = _fingerprint(data)
    assert after.digest != before.digest
    test, train = before.changes_to(after)
    assert test.describe() == ("test: 1 file added (test/test_class_01/new.png), 1 file removed "
                               "(test/test_class_00/img_1.jpg), 1 file modified (test/test_class_01/img_0.png)")
    assert not test.classes_changed and train.classes_changed
    assert train.classes_renamed == (("train_class_01", "renamed"),)
    assert train.classes_removed == ("train_class_02",) and not train.classes_added
    assert train.describe().startswith("train: 1 class removed (train_class_02), 1 class renamed "
                                       "(train_class_01 -> renamed), 4 files added (train/renamed/img_0.png, "
                                       "train/renamed/img_1.jpg, train/renamed/img_2.png and 1 more)")
    # Files the run skipped itself are known changes.
    ignored = [str(data / "test" / "test_class_00" / "img_1.jpg")]
    assert before.changes_to(after, ignored)[0].files_removed == ()


def test_it_round_trips_through_the_model_dir(tmp_path):
    data = make_folder_dataset(tmp_path / "data")
    fingerprint = _fingerprint(data)
    path = fingerprint.save(str(tmp_path / "run"))
    assert os.path.basename(path) == f"{fingerprint.digest}.json"
    loaded = DataFingerprint.load(str(tmp_path / "run"), fingerprint.digest, str(data))
    assert loaded.digest == fingerprint.digest and not loaded.changes_to(fingerprint)
    assert DataFingerprint.load(str(tmp_path / "run"), "0" * 16) is None


def test_changed_files_are_found_by_size_and_time(tmp_path):
    data = tmp_path / "data"
    make_folder_dataset(data)
    split = read_folder_dataset(str(data))["train"]
    fingerprint = _fingerprint(data).splits["train"]
    os.remove(split.paths[0])
    open(split.paths[1], "wb").close()  # pylint: disable=consider-using-with
    assert fingerprint.changed_files(split.paths) == [(split.paths[0], "removed"), (split.paths[1], "modified")]
