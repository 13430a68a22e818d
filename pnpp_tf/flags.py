"""The command line of the entry points: absl flags made from a config's fields, parsed into it.

    def main(config):                     # a pnpp_tf.config.TrainConfig
        ...                               # returns the exit status (None: 0)

    if __name__ == "__main__":
        flags.run(main, TrainConfig, "pnpp_tf.train")

Flags exist only in the process of the program that runs: importing an entry point defines none,
so entry points can be imported together and used from Python without absl. Every flag also
works in a --flagfile (one `--name=value` per line); configs/ holds one per dataset.

Only the entry points (`python -m pnpp_tf.<name>`) import this module; the modules below them
take configs or plain arguments.
"""

import dataclasses
import sys

from absl import app, flags, logging

import pnpp_tf
from pnpp_tf import cpu_kernels, tf_log
from pnpp_tf.config import base_type
from pnpp_tf.errors import UserError
from pnpp_tf.io_utils import OutOfSpaceError


def define_flags(config_class, flag_values=flags.FLAGS, module_name=None):
    """Defines one flag per field of `config_class`, with the field's default, help and bounds.

    Args:
        config_class: a `pnpp_tf.config.Config` dataclass.
        flag_values: where to define them (tests pass a fresh `flags.FlagValues()`).
        module_name: the module absl files them under; `run` gives the program's, so that
            `--help` lists them (absl lists only the main module's flags there).
    """
    for field in dataclasses.fields(config_class):
        meta, kind = field.metadata, base_type(field.type)
        common = {"name": field.name, "help": meta["help"], "flag_values": flag_values}
        if module_name:
            common["module_name"] = module_name
        choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
        bounds = {"lower_bound": meta["lower"], "upper_bound": meta["upper"]}
        if choices is not None:
            flags.DEFINE_enum(default=field.default, enum_values=list(choices), **common)
        elif kind is bool:
            flags.DEFINE_boolean(default=field.default, **common)
        elif kind is int:
            flags.DEFINE_integer(default=field.default, **bounds, **common)
        elif kind is float:
            flags.DEFINE_float(default=field.default, **bounds, **common)
        elif kind is tuple:
            flags.DEFINE_list(default=[str(item) for item in field.default], **common)
        elif kind is str:
            flags.DEFINE_string(default=field.default, **common)
        else:
            raise TypeError(f"{config_class.__name__}.{field.name}: no flag for type {field.type}.")
        if meta["positive"]:
            flags.register_validator(field.name, lambda value: value is not None and value > 0,
                                     message="must be greater than 0", flag_values=flag_values)


def config_from_flags(config_class, flag_values=flags.FLAGS):
    """The config of the parsed flags.

    Raises:
        UserError: the values break a check of the config.
    """
    return config_class(**{field.name: flag_values[field.name].value for field in dataclasses.fields(config_class)})


def parse(config_class, argv):
    """The config of a command line, parsed in a fresh set of flags (for tests and workers).

    Args:
        config_class: a `pnpp_tf.config.Config` dataclass.
        argv: the program name, then the flags.

    Raises:
        flags.Error: a flag is unknown or out of range.
        UserError: the values break a check of the config.
    """
    flag_values = flags.FlagValues()
    define_flags(config_class, flag_values)
    flag_values(list(argv))
    return config_from_flags(config_class, flag_values)


def run(main, config_class, program):
    """Runs `main(config)` as a program: flags parsed into a `config_class`, user errors on one line.

    A bad flag, a `UserError` or an `OutOfSpaceError` prints `<program>: error: <message>` and
    exits with status 2; any other exception propagates with its traceback. The program's first
    lines name it, the versions, what of TensorFlow's log is shown (`pnpp_tf.tf_log`) and the CPU
    kernels.

    Args:
        main: `config -> exit status` (None: 0).
        config_class: a `pnpp_tf.config.Config` dataclass.
        program: the entry point's name, e.g. "pnpp_tf.train".
    """
    define_flags(config_class, module_name=sys.argv[0])
    tf_log.quiet_python_info()

    def parse_flags(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as error:
            _fail(program, f"{error} (see --helpfull)")

    def run_main(argv):
        if len(argv) > 1:
            _fail(program, f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
        logging.info("%s: pnpp_tf %s, %s. %s", program, pnpp_tf.__version__, _versions(), tf_log.describe())
        logging.info("%s", cpu_kernels.describe())
        try:
            return main(config_from_flags(config_class))
        except (UserError, OutOfSpaceError) as error:
            _fail(program, str(error))

    app.run(run_main, flags_parser=parse_flags)


def _versions():
    """The versions of TensorFlow and Keras as loaded, e.g. "TensorFlow 2.21.0, Keras 3.15.1"."""
    modules = (("TensorFlow", "tensorflow"), ("Keras", "keras"))
    return ", ".join(f"{name} {getattr(sys.modules[module], '__version__', '?')}"
                     for name, module in modules if module in sys.modules)


def _fail(program, message):
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(2)
