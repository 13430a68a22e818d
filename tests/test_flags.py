"""Flags are range-checked where they are defined; a bad value is one line from the entry point."""

import pytest
from absl import flags

from cli_helpers import run_module
from pnpp_tf import flags as pnpp_flags
from pnpp_tf.config import TrainConfig


@pytest.fixture
def parse():
    """Parses a command line against the training flags, defined in a fresh FlagValues."""
    flag_values = flags.FlagValues()
    pnpp_flags.define_flags(TrainConfig, flag_values)
    return lambda *args: flag_values(["train", *args])


@pytest.mark.parametrize("args, message", [
    (["--lr=-1"], "flag --lr=-1.0: must be greater than 0"),
    (["--lr=0", "--proxy_lr=0"], "flag --lr=0.0: must be greater than 0"),
    (["--proxy_lr=0"], "flag --proxy_lr=0.0: must be greater than 0"),
    (["--epochs=0"], "flag --epochs=0: 0 is not a positive integer"),
    (["--epochs=-3"], "flag --epochs=-3: -3 is not a positive integer"),
    (["--warmup_epochs=-1"], "flag --warmup_epochs=-1: -1 is not a non-negative integer"),
    (["--batch_size=0"], "flag --batch_size=0"),
    (["--temperature=0"], "flag --temperature=0.0: must be greater than 0"),
    (["--lr_decay=-0.1"], "flag --lr_decay=-0.1: must be greater than 0"),
    (["--clip_value=-1"], "flag --clip_value=-1: -1.0 is not a non-negative number"),
    (["--image_size=8"], "flag --image_size=8"),
    (["--embedding_dim=0"], "flag --embedding_dim=0"),
    (["--keep_checkpoints=0"], "flag --keep_checkpoints=0"),
    (["--max_pixels=0"], "flag --max_pixels=0"),
    (["--verbose=3"], "flag --verbose=3"),
])
def test_out_of_range_values_are_refused(parse, args, message):
    with pytest.raises(flags.IllegalFlagValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse(*args)


def test_the_recipe_defaults_and_edge_values_parse(parse):
    parse("--warmup_epochs=0", "--clip_value=0", "--eval_every=0", "--checkpoint_every_steps=0", "--epochs=1",
          "--lr=1e-9", "--verbose=2")


@pytest.mark.slow
def test_the_entry_point_prints_one_line_and_exits_2():
    result = run_module("pnpp_tf.train", "--epochs=0", "--model_dir=/nonexistent/never/written")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "pnpp_tf.train: error: flag --epochs=0: 0 is not a positive integer (see --helpfull)")
    assert "Traceback" not in result.stderr


def test_help_lists_the_programs_own_flags():
    result = run_module("pnpp_tf.export", "--help")  # absl's --help exits with status 1
    assert "--version: Version to write" in result.stdout and "--tflite_variants" in result.stdout
