"""Readers of CUB-200-2011, Cars196, SOP and In-Shop on miniatures of their official layouts."""

import os

import numpy as np
import pytest

import miniatures
from pnpp_tf.data import load_split, load_splits, protocol


def check_zero_shot(splits, train_classes, eval_classes):
    train = splits["train"]
    assert train.num_classes == train_classes
    np.testing.assert_array_equal(np.unique(train.labels), np.arange(train_classes))
    eval_names = set()
    for name in set(splits) - {"train"}:
        assert splits[name].labels.min() >= 0 and splits[name].labels.max() < eval_classes
        eval_names |= {splits[name].class_names[label] for label in splits[name].labels}
    assert len(eval_names) == eval_classes
    assert not eval_names & set(train.class_names)
    for split in splits.values():
        assert len(split.paths) == len(split.labels) and all(os.path.isfile(p) for p in split.paths)


def test_cub_splits_by_class_id(tmp_path):
    root = miniatures.make_cub(tmp_path)
    for data_dir in (root, os.path.join(root, "CUB_200_2011")):
        splits = load_splits("cub", data_dir)
        check_zero_shot(splits, 4, 3)
        assert len(splits["train"]) == 16 and len(splits["test"]) == 12
        assert splits["train"].class_names[0] == "1" and splits["test"].class_names[0] == "101"


def test_cars196_reads_the_mat_file(tmp_path):
    root = miniatures.make_cars196(tmp_path)
    splits = load_splits("cars196", root)
    check_zero_shot(splits, 4, 3)
    assert splits["test"].class_names == ["99", "100", "101"]


def test_sop_reads_both_lists(tmp_path):
    root = miniatures.make_sop(tmp_path, test_classes=5)
    splits = load_splits("sop", root)
    check_zero_shot(splits, 4, 5)
    assert len(splits["test"]) == 30


def test_inshop_query_and_gallery_share_labels(tmp_path):
    root = miniatures.make_inshop(tmp_path)
    splits = load_splits("inshop", root)
    assert set(splits) == {"train", "query", "gallery"}
    check_zero_shot(splits, 4, 12)
    assert (len(splits["query"]), len(splits["gallery"])) == (24, 60)
    query, gallery = splits["query"], splits["gallery"]
    for path, label in zip(query.paths, query.labels):
        item = path.split(os.sep)[-2]
        gallery_items = {p.split(os.sep)[-2] for p, l in zip(gallery.paths, gallery.labels) if l == label}
        assert gallery_items == {item}


def test_stage_one_halves_the_training_classes(tmp_path):
    root = miniatures.make_cub(tmp_path, train_ids=(1, 2, 3, 4, 5), test_ids=(150,))
    train_paths, train_labels = load_split("cub", root, "train_half")
    val_paths, val_labels = load_split("cub", root, "val_half")
    assert sorted(set(train_labels)) == [0, 1] and sorted(set(val_labels)) == [0, 1, 2]
    assert all("/001." in p or "/002." in p for p in train_paths)
    assert not set(train_paths) & set(val_paths)


def test_protocols_follow_the_paper():
    assert protocol("cub").ks == (1, 2, 4, 8) and protocol("cub").nmi
    assert protocol("sop").ks == (1, 10, 100, 1000) and not protocol("sop").nmi
    assert protocol("inshop").ks == (1, 10, 20, 30, 40, 50)


def rewrite_line(path, number, transform):
    with open(path, encoding="utf-8") as file:
        lines = file.read().splitlines()
    lines[number - 1] = transform(lines[number - 1])
    with open(path, "w", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")


def test_sop_line_with_a_missing_column(tmp_path):
    root = miniatures.make_sop(tmp_path, test_classes=2)
    rewrite_line(os.path.join(root, "Ebay_train.txt"), 3, lambda line: " ".join(line.split()[:3]))
    with pytest.raises(ValueError, match=r"Ebay_train.txt:3: expected 4 columns, got 3"):
        load_splits("sop", root)


def test_sop_missing_image(tmp_path):
    root = miniatures.make_sop(tmp_path, test_classes=2)
    os.remove(os.path.join(root, "bicycle_final", "6_1.JPG"))
    with pytest.raises(ValueError, match=r"Ebay_test.txt:9: image .*6_1.JPG does not exist"):
        load_splits("sop", root)


def test_sop_missing_list_file(tmp_path):
    root = miniatures.make_sop(tmp_path, test_classes=2)
    os.remove(os.path.join(root, "Ebay_test.txt"))
    with pytest.raises(ValueError, match=r"Ebay_test.txt is missing"):
        load_splits("sop", root)


def test_sop_non_integer_class(tmp_path):
    root = miniatures.make_sop(tmp_path, test_classes=2)
    rewrite_line(os.path.join(root, "Ebay_train.txt"), 2, lambda line: line.replace(" 1 1 ", " one 1 ", 1))
    with pytest.raises(ValueError, match=r"Ebay_train.txt:2: class_id must be an integer, got 'one'"):
        load_splits("sop", root)


def test_cars_class_out_of_range(tmp_path):
    root = miniatures.make_cars196(tmp_path)
    miniatures.make_cars196(tmp_path, annotations=[("car_ims/000001.jpg", 1), ("car_ims/000002.jpg", 197)])
    with pytest.raises(ValueError, match=r"cars_annos.mat, annotation 2: class 197 is outside 1..196"):
        load_splits("cars196", root)


def test_cars_missing_annotations(tmp_path):
    with pytest.raises(ValueError, match=r"cars_annos.mat is missing"):
        load_splits("cars196", str(tmp_path))


def test_inshop_bad_status_and_truncated_list(tmp_path):
    root = miniatures.make_inshop(tmp_path)
    list_file = os.path.join(root, "Eval", "list_eval_partition.txt")
    rewrite_line(list_file, 5, lambda line: line.replace(" train", " trian"))
    with pytest.raises(ValueError, match=r"list_eval_partition.txt:5: evaluation_status .* 'trian'"):
        load_splits("inshop", root)
    rewrite_line(list_file, 1, lambda line: "99999")
    with pytest.raises(ValueError, match=r"line 1 declares 99999 entries but 100 follow"):
        load_splits("inshop", root)


def test_cub_bad_folder_name(tmp_path):
    root = miniatures.make_cub(tmp_path)
    os.makedirs(os.path.join(root, "CUB_200_2011", "images", "albatross"))
    with pytest.raises(ValueError, match=r"albatross.*<id>.<name>"):
        load_splits("cub", root)
