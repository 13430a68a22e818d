"""Run-time patches that let the authors' ProxyNCA++ code (github.com/euwern/proxynca_pp) train on
the CPU, from scratch, on a folder dataset, for tools/compare_with_authors.py.

Nothing of the authors' code is kept in this repository: `prepare_authors_copy` copies a checkout
of it into a scratch directory and edits the copy. Each `Patch` replaces one exact piece of text
and says why; a patch whose text is not found exactly once stops with an error naming the file, so
a different version of their code cannot be patched silently into something else. Everything
that can be said with their own configuration files (the recipe, the class ranges, the crop
size) is said there rather than patched.

This module imports neither torch nor TensorFlow.
"""

import json
import os
import shutil
from typing import NamedTuple

# The module train.py imports first (patch "cpu"): on a machine without a GPU, `.cuda()` is the
# identity, so every `x.cuda()` / `module.cuda()` of their code keeps the tensor on the CPU.
CPU_SHIM = '''"""Written by tools/compare_with_authors.py: run the authors' CUDA code on the CPU."""
import torch

torch.Tensor.cuda = lambda self, *args, **kwargs: self
torch.nn.Module.cuda = lambda self, *args, **kwargs: self
'''
CPU_SHIM_NAME = "_cpu_shim.py"

# RECIPE (config/cub.json): Adam (eps 1) for three parameter groups, proxies at their own lr,
# ProxyNCA++ (scale 3 = sqrt(1/T), T = 1/9), GMP + LayerNorm trunk; ReduceLROnPlateau (patience 4)
# on the validation score in train mode.
EVAL_RESIZE_RATIO = 288 / 256


class Patch(NamedTuple):
    """Replace `old` by `new` in `path` (relative to the copy); `why` goes into the docs."""
    name: str
    path: str
    old: str
    new: str
    why: str


AFTER_WARMUP_EVAL = """        logging.info('warm up ends in %d epochs' % (args.warmup_k-e))
    with torch.no_grad():  # compare_with_authors: Recall@1 after the warm-up too
        logging.info("**Evaluating after warm-up...**")
        utils.evaluate(model, dl_val, args.eval_nmi, args.recall)
"""

PATCHES = (
    Patch("cpu", "train.py",
          "import logging\nimport dataset\n",
          "import _cpu_shim  # compare_with_authors: .cuda() is the identity (CPU)\nimport logging\nimport dataset\n",
          "CPU device: their code calls .cuda() on the model, loss and every batch; a shim imported "
          "first makes Tensor.cuda and Module.cuda return self. DataParallel without GPUs calls the "
          "module directly."),
    Patch("matplotlib", "train.py",
          "matplotlib.use('agg', warn=False, force=True)",
          "matplotlib.use('agg', force=True)",
          "matplotlib 3.3 removed the `warn` argument of matplotlib.use (matplotlib is not otherwise used)."),
    Patch("eval-after-warmup", "train.py",
          "        logging.info('warm up ends in %d epochs' % (args.warmup_k-e))\n",
          AFTER_WARMUP_EVAL,
          "Measurement only: their loop evaluates after each main epoch, not after the warm-up; this "
          "adds the same `utils.evaluate` call once after the warm-up (its DataLoader draws one seed "
          "from torch's generator, like every evaluation)."),
    Patch("no-pretrained", "networks.py",
          "self.base = models.__dict__[model](pretrained=True)",
          "self.base = models.__dict__[model](weights=None)",
          "From scratch (the recipe's --weights=none) and torchvision >= 0.13's argument: "
          "torchvision's own initialisation (Kaiming-normal convs, BatchNorm 1/0)."),
    Patch("torch-six", "dataset/utils.py",
          "from torch._six import int_classes as _int_classes",
          "_int_classes = int",
          "torch._six was removed in PyTorch 2.0; int_classes was `int`."),
    Patch("distutils", "dataset/base.py",
          "from distutils.dir_util import copy_tree",
          "from shutil import copytree as copy_tree",
          "distutils is gone from Python 3.12; copy_tree only copies a dataset that is not at its root "
          "yet, which never happens here."),
)


class AuthorsPatchError(RuntimeError):
    """The authors' code is not the version these patches were written for."""


def apply_patches(code_dir, patches=PATCHES):
    """Applies `patches` to the copy in `code_dir` (edits files in place); returns their names."""
    for patch in patches:
        path = os.path.join(code_dir, patch.path)
        if not os.path.isfile(path):
            raise AuthorsPatchError(f"patch {patch.name!r}: {patch.path} is missing from {code_dir}.")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        count = text.count(patch.old)
        if count != 1:
            raise AuthorsPatchError(f"patch {patch.name!r}: expected the text once in {patch.path}, found it "
                                    f"{count} times: {patch.old[:60]!r}")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text.replace(patch.old, patch.new))
    with open(os.path.join(code_dir, CPU_SHIM_NAME), "w", encoding="utf-8") as f:
        f.write(CPU_SHIM)
    return [patch.name for patch in patches]


def list_classes(split_dir):
    """Sorted class folder names of a folder-layout split, as pnpp_tf's folder reader sees them."""
    return sorted(name for name in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, name)))


def link_folder_dataset(data_dir, images_dir):
    """Lays `data_dir`'s train/ and test/ class folders side by side in `images_dir` as symlinks,
    training classes first, so that torchvision's ImageFolder (in their CUBirds class) numbers the
    training classes 0..n-1 (the loss binarises labels with range(nb_classes)) and the test
    classes after them.

    Returns:
        (train class range, test class range), as (start, stop) pairs.
    """
    train = list_classes(os.path.join(data_dir, "train"))
    test = list_classes(os.path.join(data_dir, "test"))
    if not train or not test:
        raise ValueError(f"{data_dir} needs train/<class>/ and test/<class>/ folders.")
    if os.path.isdir(images_dir):
        shutil.rmtree(images_dir)
    os.makedirs(images_dir)
    # ImageFolder sorts the folder names: "0train_" < "1test_", and within each the order of names.
    for prefix, split, names in (("0train_", "train", train), ("1test_", "test", test)):
        for name in names:
            os.symlink(os.path.abspath(os.path.join(data_dir, split, name)),
                       os.path.join(images_dir, prefix + name))
    return (0, len(train)), (len(train), len(train) + len(test))


def recipe_config(base_config, epochs, warmup_epochs, batch_size, classes_per_batch, embedding_dim, lr,
                  proxy_lr):
    """Their config json (their own `config/cub.json` as `base_config`, a dict of strings that
    they eval) with the recipe's numbers."""
    config = json.loads(json.dumps(base_config))
    config["nb_epochs"] = str(int(epochs))
    config["warmup_k"] = str(int(warmup_epochs))
    config["sz_batch"] = str(int(batch_size))
    config["num_class_per_batch"] = str(int(classes_per_batch))
    config["sz_embedding"] = str(int(embedding_dim))
    config["opt"]["args"]["base"]["lr"] = repr(float(lr))
    config["opt"]["args"]["proxynca"]["lr"] = repr(float(proxy_lr))
    return config


def dataset_config(base_config, root, train_range, test_range, image_size):
    """Their dataset/config.json with the "cub" entry reading `root` (ImageFolder over
    root/images) and the crop/resize of `image_size` (their 256/288 scaled)."""
    config = json.loads(json.dumps(base_config))
    rng = lambda r: f"range({r[0]}, {r[1]})"  # noqa: E731
    config["dataset"]["cub"] = {
        # train mode: train on "train", evaluate every epoch on "val"; both evaluation splits are
        # the test classes here.
        "classes": {"train": rng(train_range), "val": rng(test_range), "trainval": rng(train_range),
                    "eval": rng(test_range)},
        "source": repr(root), "root": repr(root),
    }
    config["transform_parameters"]["sz_crop"] = str(int(image_size))
    config["transform_parameters"]["sz_resize"] = str(int(round(image_size * EVAL_RESIZE_RATIO)))
    return config


def prepare_authors_copy(authors_dir, scratch_dir, data_dir, *, epochs, warmup_epochs, batch_size,
                         classes_per_batch, embedding_dim, lr, proxy_lr, image_size):
    """Copies the authors' checkout to `scratch_dir`/code, patches it, and writes the dataset
    layout and configs. Returns a dict: code_dir, config path, class ranges, patches applied."""
    code_dir = os.path.join(scratch_dir, "code")
    if os.path.isdir(code_dir):
        shutil.rmtree(code_dir)
    shutil.copytree(authors_dir, code_dir, ignore=shutil.ignore_patterns(".git", "log", "results"))
    applied = apply_patches(code_dir)
    root = os.path.join(scratch_dir, "dataset_root")
    train_range, test_range = link_folder_dataset(data_dir, os.path.join(root, "images"))
    with open(os.path.join(code_dir, "config", "cub.json"), encoding="utf-8") as f:
        base = json.load(f)
    config_path = os.path.join(code_dir, "config", "compare.json")
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(recipe_config(base, epochs, warmup_epochs, batch_size, classes_per_batch, embedding_dim, lr,
                                proxy_lr), f, indent=1)
    with open(os.path.join(code_dir, "dataset", "config.json"), encoding="utf-8") as f:
        base_dataset = json.load(f)
    with open(os.path.join(code_dir, "dataset", "config.json"), "w", encoding="utf-8") as f:
        json.dump(dataset_config(base_dataset, root, train_range, test_range, image_size), f, indent=1)
    return {"code_dir": code_dir, "config": config_path, "train_classes": train_range,
            "test_classes": test_range, "patches": applied}


def parse_authors_log(text):
    """Recall@1 values (fractions) in the order their log prints "R@1 : <percent>"."""
    values = []
    for line in text.splitlines():
        marker = line.find("R@1 : ")
        if marker >= 0:
            values.append(float(line[marker + len("R@1 : "):].split()[0]) / 100.0)
    return values
