"""Readers of TFDS-prepared CUB, Cars196 and SOP, on tiny copies prepared by TFDS itself.

Each copy is written by `download_and_prepare` of a subclass of the real TFDS builder that yields
a few made-up examples instead of downloading: same name, version, features and file layout as a
real `tfds build`. Labels span both halves of the classes in both TFDS splits, so the re-split by
class is visible. Needs tensorflow-datasets (the test extra); a missing install fails, not skips.
"""

import inspect
import io
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tensorflow_datasets.datasets.stanford_online_products import stanford_online_products_dataset_builder as sop
from tensorflow_datasets.image_classification import caltech_birds, cars196

from pnpp_tf.data import load_split, load_splits, protocol, tfds_prepared

# TFDS (0-based) labels of each TFDS split of the fakes.
CUB_LABELS = {"train": [0, 0, 57, 99, 100, 150, 199], "test": [0, 99, 100, 199]}
CARS_LABELS = {"train": [0, 97, 98, 195], "test": [1, 97, 195, 195]}
SOP_LABELS = {"train": [0, 5, 11317, 11317], "test": [11318, 22633, 22633]}


def encoded_image(seed, image_format="JPEG"):
    """A tiny image whose encoded bytes differ from every other seed's."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


def fake_examples(labels_by_split, make_example):
    """{split: examples} and {1-based class id: sorted encoded images}; every fifth image is a PNG."""
    examples, images_of_class, seed = {}, {}, 0
    for split, labels in labels_by_split.items():
        examples[split] = []
        for index, label in enumerate(labels):
            seed += 1
            image = encoded_image(seed, "PNG" if seed % 5 == 0 else "JPEG")
            examples[split].append((f"{split}_{index}", make_example(index, label, image)))
            images_of_class.setdefault(label + 1, []).append(image)
    return examples, {key: sorted(images) for key, images in images_of_class.items()}


def cub_example(index, label, image):
    return {"image": image, "image/filename": f"{label + 1:03d}.bird/img_{index}.jpg", "label": label,
            "label_name": "bird", "bbox": tfds.features.BBox(0.0, 0.0, 1.0, 1.0),
            "segmentation_mask": np.zeros((6, 5, 1), np.uint8)}


def cars_example(index, label, image):
    return {"image": image, "label": label, "bbox": tfds.features.BBox(0.1, 0.1, 0.9, 0.9), "id": f"{index:05d}"}


def sop_example(index, label, image):
    del index
    return {"image": image, "class_id": label, "super_class_id/num": 2, "super_class_id": "chair"}


def prepare(builder_class, tfds_name, labels_by_split, make_example, data_dir):
    """Prepares a fake `tfds_name` in `data_dir` with TFDS' own writer; returns the images per class."""
    examples, images_of_class = fake_examples(labels_by_split, make_example)

    class Fake(builder_class, skip_registration=True):
        name = tfds_name
        pkg_dir_path = epath.Path(inspect.getfile(builder_class)).parent  # SOP's README, CITATIONS.bib
        # No checksums file to look up: finding it needs importlib_resources, which
        # tensorflow-datasets 4.9.10 uses without declaring it on Python >= 3.9 (its issue #11212).
        code_path = None

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: iter(split_examples) for split, split_examples in examples.items()}

    Fake(data_dir=str(data_dir)).download_and_prepare()
    return images_of_class


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One TFDS data dir holding the three fakes; {dataset: images per class}."""
    root = tmp_path_factory.mktemp("tensorflow_datasets")
    return str(root), {
        "tfds_cub": prepare(caltech_birds.CaltechBirds2011, "caltech_birds2011", CUB_LABELS, cub_example, root),
        "tfds_cars196": prepare(cars196.Cars196, "cars196", CARS_LABELS, cars_example, root),
        "tfds_sop": prepare(sop.Builder, "stanford_online_products", SOP_LABELS, sop_example, root),
    }


EXPECTED_CLASSES = {
    "tfds_cub": (["1", "58", "100"], ["101", "151", "200"]),
    "tfds_cars196": (["1", "2", "98"], ["99", "196"]),
    "tfds_sop": (["1", "6", "11318"], ["11319", "22634"]),
}


def read_bytes(path):
    with open(path, "rb") as file:
        return file.read()


@pytest.mark.parametrize("dataset", sorted(EXPECTED_CLASSES))
def test_splits_by_class_like_the_official_reader(prepared, dataset):
    root, images_of_class = prepared
    splits = load_splits(dataset, root)
    assert set(splits) == {"train", "test"}
    (train_names, test_names), total = EXPECTED_CLASSES[dataset], 0
    for split, names in ((splits["train"], train_names), (splits["test"], test_names)):
        assert split.class_names == names
        np.testing.assert_array_equal(np.unique(split.labels), np.arange(len(names)))
        for label, name in enumerate(names):
            # Every image of the class, from both TFDS splits, with its bytes unchanged.
            paths = [p for p, l in zip(split.paths, split.labels) if l == label]
            assert sorted(read_bytes(p) for p in paths) == images_of_class[dataset][int(name)]
            total += len(paths)
    assert not set(splits["train"].class_names) & set(splits["test"].class_names)
    assert total == sum(len(images) for images in images_of_class[dataset].values())
    name = tfds_prepared.SOURCES[dataset].name
    cache = os.path.join(root, tfds_prepared.CACHE_FOLDER, name)
    for path in splits["train"].paths + splits["test"].paths:
        assert path.startswith(cache + os.sep)
        assert os.path.splitext(path)[1] == (".png" if read_bytes(path).startswith(b"\x89PNG") else ".jpg")


def test_protocols_match_the_official_readers():
    for dataset, official in (("tfds_cub", "cub"), ("tfds_cars196", "cars196"), ("tfds_sop", "sop")):
        assert protocol(dataset) == protocol(official)


def test_train_halves_and_data_dir_of_the_dataset_itself(prepared):
    root, _ = prepared
    paths, labels = load_split("tfds_cars196", os.path.join(root, "cars196"), "test")
    assert len(paths) == 4 and labels.tolist() == [0, 1, 1, 1]
    with pytest.raises(ValueError, match="too few"):  # three training classes cannot be halved
        load_split("tfds_cub", root, "train_half")


def test_second_read_reuses_the_extracted_images(prepared, monkeypatch):
    root, _ = prepared
    first = load_splits("tfds_sop", root)
    times = {path: os.stat(path).st_mtime_ns for path in first["train"].paths + first["test"].paths}

    def no_reading(*args, **kwargs):
        raise AssertionError("the TFRecords were read again")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "as_dataset", no_reading)
    second = load_splits("tfds_sop", root)
    for name in ("train", "test"):
        assert second[name].paths == first[name].paths and second[name].class_names == first[name].class_names
        np.testing.assert_array_equal(second[name].labels, first[name].labels)
    assert {path: os.stat(path).st_mtime_ns for path in times} == times


def test_interrupted_or_damaged_extraction_is_redone(tmp_path, monkeypatch):
    images_of_class = prepare(cars196.Cars196, "cars196", CARS_LABELS, cars_example, tmp_path)
    cache = os.path.join(tmp_path, tfds_prepared.CACHE_FOLDER, "cars196", "2.1.0")
    write = tfds_prepared.write_atomic
    written = []

    def failing_write(path, contents):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(path)
        write(path, contents)

    monkeypatch.setattr(tfds_prepared, "write_atomic", failing_write)
    with pytest.raises(KeyboardInterrupt):
        load_splits("tfds_cars196", str(tmp_path))
    monkeypatch.undo()
    assert len(written) == 3 and not os.path.exists(os.path.join(cache, tfds_prepared.MANIFEST))

    splits = load_splits("tfds_cars196", str(tmp_path))
    assert os.path.isfile(os.path.join(cache, tfds_prepared.MANIFEST))
    assert sorted(read_bytes(p) for p in splits["test"].paths) == sorted(images_of_class[99] + images_of_class[196])

    os.remove(splits["train"].paths[0])  # a file lost after a finished extraction
    again = load_splits("tfds_cars196", str(tmp_path))
    assert again["train"].paths == splits["train"].paths and os.path.isfile(splits["train"].paths[0])
    assert not [name for _, _, names in os.walk(cache) for name in names if ".partial" in name]


def test_unprepared_dataset_names_the_build_command(tmp_path):
    with pytest.raises(ValueError, match=(f"--data_dir={tmp_path} holds no prepared caltech_birds2011 .*"
                                          f"tfds build caltech_birds2011 --data_dir={tmp_path}")):
        load_splits("tfds_cub", str(tmp_path))


def test_other_prepared_version_is_named(prepared, tmp_path):
    root, _ = prepared
    old = tmp_path / "cars196" / "2.0.0"
    old.mkdir(parents=True)
    for name in ("dataset_info.json", "features.json"):
        (old / name).write_bytes(read_bytes(os.path.join(root, "cars196", "2.1.0", name)))
    with pytest.raises(ValueError, match=r"no prepared cars196 2\.1\.0 \(it holds version\(s\) 2\.0\.0"):
        load_splits("tfds_cars196", str(tmp_path))


def test_dataset_without_test_classes_is_refused(tmp_path):
    prepare(caltech_birds.CaltechBirds2011, "caltech_birds2011", {"train": [0, 1], "test": [2]}, cub_example,
            tmp_path)
    with pytest.raises(ValueError, match=r"classes \[1, 2, 3\]; .* needs classes 1-100 \(train\) and 101-200"):
        load_splits("tfds_cub", str(tmp_path))


def test_missing_tensorflow_datasets_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with pytest.raises(ValueError, match="pip install tensorflow-datasets"):
        load_splits("tfds_sop", str(tmp_path))
