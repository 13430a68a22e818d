"""Typed run configs: checked alike from Python and from the command line, recorded as JSON, and
the only way the modules below the entry points learn their settings."""

import ast
import dataclasses
import importlib
import json
import pathlib

import pytest
from absl import flags

from pnpp_tf import config as config_module, flags as pnpp_flags
from pnpp_tf.catalogue_config import IndexConfig, SearchConfig, ServeConfig
from pnpp_tf.config import CheckDataConfig, EvaluateConfig, ExportConfig, TrainConfig
from pnpp_tf.errors import UserError

PACKAGE = pathlib.Path(config_module.__file__).resolve().parent
ENTRY_POINTS = ("train", "evaluate", "export", "index", "search", "serve", "check_data")
CONFIGS = (TrainConfig, EvaluateConfig, ExportConfig, IndexConfig, SearchConfig, ServeConfig, CheckDataConfig)
# Fields a config checks across fields; a valid value for each config.
REQUIRED = {TrainConfig: {"model_dir": "run"}, CheckDataConfig: {"dataset": "folder", "data_dir": "data"}}


def out_of_bounds(config_class):
    """(field name, a value its bounds refuse) for every bounded number field."""
    for field in dataclasses.fields(config_class):
        meta = field.metadata
        if meta["lower"] is not None:
            yield field.name, meta["lower"] - 1
        if meta["upper"] is not None:
            yield field.name, meta["upper"] + 1
        if meta["positive"]:
            yield field.name, 0.0


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_python_and_the_command_line_refuse_the_same_values(config_class):
    cases = list(out_of_bounds(config_class))
    for name, value in cases:
        with pytest.raises(UserError, match=f"^--{name}="):
            config_class(**REQUIRED.get(config_class, {}), **{name: value})
        with pytest.raises(flags.IllegalFlagValueError, match=f"flag --{name}="):
            pnpp_flags.parse(config_class, ["program", f"--{name}={value}"])


def test_every_bound_of_the_training_flags_is_tested():
    names = {name for name, _ in out_of_bounds(TrainConfig)}
    assert {"lr", "proxy_lr", "temperature", "lr_decay", "epochs", "batch_size", "image_size", "verbose",
            "max_pixels", "clip_value"} <= names


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_the_flags_default_to_the_config_defaults(config_class):
    required = REQUIRED.get(config_class, {})
    parsed = pnpp_flags.parse(config_class, ["program", *(f"--{k}={v}" for k, v in required.items())])
    assert parsed == config_class(**required)


def test_choices_and_lists_are_checked_and_converted():
    with pytest.raises(UserError, match=r"^--backbone=nope: choose one of .*resnet50"):
        TrainConfig(model_dir="run", backbone="nope")
    with pytest.raises(UserError, match=r"^--eval_ks must be positive integers, got 1,0\.$"):
        TrainConfig(model_dir="run", eval_ks=[1, 0])
    with pytest.raises(UserError, match=r"^--lr_drop_epochs must be integers, got 3,x\.$"):
        TrainConfig(model_dir="run", lr_drop_epochs=["3", "x"])
    config = TrainConfig(model_dir="run", eval_ks=["8", "1", "2", "1"], lr_drop_epochs="30,45")
    assert config.eval_ks == (1, 2, 8) and config.lr_drop_epochs == (30, 45)


def test_values_of_another_type_are_refused():
    with pytest.raises(UserError, match=r"^--epochs='5': must be an integer\.$"):
        TrainConfig(model_dir="run", epochs="5")
    with pytest.raises(UserError, match=r"^--flip=1: must be true or false\.$"):
        TrainConfig(model_dir="run", flip=1)
    assert TrainConfig(model_dir="run", lr=1).lr == 1  # an int is a number


def test_cross_field_checks():
    with pytest.raises(UserError, match=r"^--model_dir is required"):
        TrainConfig()
    with pytest.raises(UserError, match=r"^--lr_drop_epochs and --lr_schedule_from are for --mode=trainval"):
        TrainConfig(model_dir="run", mode="train", lr_drop_epochs=(3,))
    with pytest.raises(UserError, match=r"^--batch_size=10 is not divisible by --classes_per_batch=4\.$"):
        CheckDataConfig(dataset="folder", data_dir="data", batch_size=10, classes_per_batch=4)


def test_a_config_is_frozen_and_its_record_rebuilds_it():
    config = TrainConfig(model_dir="run", eval_ks=(1, 4), lr_drop_epochs=(3,), cache_dir="/c")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0
    record = json.loads(json.dumps(config.to_dict()))
    assert TrainConfig(**record) == config
    assert config.changed_from(record) == []


def test_entry_points_import_together_in_any_order_and_define_no_flags():
    for name in (*reversed(ENTRY_POINTS), *ENTRY_POINTS):
        importlib.import_module(f"pnpp_tf.{name}")
    defined = {field.name for config_class in CONFIGS for field in dataclasses.fields(config_class)}
    assert not defined & set(flags.FLAGS), "importing an entry point defined flags"


def absl_imports(path):
    """The absl modules `path` imports (flags, app, logging, ...)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "absl":
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("absl."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("absl."))
    return names


def test_only_the_entry_points_use_absl_flags():
    command_line = {PACKAGE / f"{name}.py" for name in ENTRY_POINTS} | {PACKAGE / "flags.py"}
    offenders = [str(path.relative_to(PACKAGE)) for path in sorted(PACKAGE.rglob("*.py"))
                 if path not in command_line and absl_imports(path) & {"flags", "app"}]
    assert offenders == []
    assert absl_imports(PACKAGE / "flags.py") & {"flags", "app"}  # the check sees an import
