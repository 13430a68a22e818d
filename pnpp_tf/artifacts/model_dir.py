"""A training run's directory (--model_dir): the files it holds, found, checked and read.

    <model_dir>/embedder.keras   the trained embedder (`load_keras_model`, or
                                 `pnpp_tf.artifacts.load_model_dir_embedder` to embed with it)
    <model_dir>/results.json     {"flags": ..., "metrics": ..., "history": ..., ...}, written by
                                 pnpp_tf.train at the end of a run (`ModelDir.read_results`)
    <model_dir>/curves.png       the history drawn by `pnpp_tf.plots.save_run_curves`

A results.json is optional to its readers (a run still training has none), so `read_results`
returns None for a missing one; every other problem raises one of `pnpp_tf.artifacts.errors`.
"""

import os
import zipfile

from pnpp_tf.artifacts.errors import (CorruptArtifactError, ForeignArtifactError,
                                      MissingArtifactError, UnloadableArtifactError)
from pnpp_tf.errors import UserError
from pnpp_tf.io_utils import read_json_object

EMBEDDER_FILE = "embedder.keras"
RESULTS_FILE = "results.json"
CURVES_FILE = "curves.png"
# The parts of results.json its readers use; each, when present, is a JSON object.
RESULTS_SECTIONS = ("flags", "metrics", "history")
_RESULTS_WHAT = "results.json of a training run"


class RunResults:
    """A training run's results.json, read and checked.

    Args:
        path: the file it was read from (for messages).
        data: its JSON object.

    Attributes:
        path, data: as given; `data` is what pnpp_tf.train wrote, whole.
        flags, metrics, history: its sections, {} where absent (or null).

    Raises:
        CorruptArtifactError: a section that is not a JSON object.
    """

    def __init__(self, path, data):
        for key in RESULTS_SECTIONS:
            if data.get(key) is not None and not isinstance(data[key], dict):
                raise CorruptArtifactError(
                    f"{path}: its {key!r} is a JSON {type(data[key]).__name__}, not an object; is "
                    "it a training run's results.json?")
        self.path = path
        self.data = data

    @property
    def flags(self):
        return self.data.get("flags") or {}

    @property
    def metrics(self):
        return self.data.get("metrics") or {}

    @property
    def history(self):
        return self.data.get("history") or {}

    def check_image_size(self, image_size, model_path):
        """Refuses results whose run trained at another image size than the model takes.

        Raises:
            ForeignArtifactError: naming both files.
        """
        recorded = self.flags.get("image_size")
        if recorded not in (None, image_size):
            raise ForeignArtifactError(
                f"{self.path} says image_size={recorded} but {model_path} takes {image_size}-pixel "
                "images; is results.json from another run?")


class ModelDir:
    """The files of a training run's directory.

    Args:
        path: the directory (it need not exist: readers say what is missing).
        flag: how the user named it, for messages ("--model_dir", "--model").
    """

    def __init__(self, path, flag="--model_dir"):
        self.path = path or ""
        self.flag = flag

    @property
    def embedder_path(self):
        return os.path.join(self.path, EMBEDDER_FILE)

    @property
    def results_path(self):
        return os.path.join(self.path, RESULTS_FILE)

    @property
    def curves_path(self):
        return os.path.join(self.path, CURVES_FILE)

    def has_embedder(self):
        return os.path.isfile(self.embedder_path)

    def require_embedder(self, hint="train a model there first (python -m pnpp_tf.train)"):
        """The path of embedder.keras.

        Raises:
            MissingArtifactError: there is none; the message ends with `hint`.
        """
        if not self.has_embedder():
            raise MissingArtifactError(f"{self.flag}={self.path} has no {EMBEDDER_FILE}; {hint}.")
        return self.embedder_path

    def read_results(self, required=()):
        """The run's results.json, or None if it has none.

        Args:
            required: sections (of `RESULTS_SECTIONS`) the caller cannot do without.

        Returns:
            A `RunResults`, or None when the file does not exist.

        Raises:
            CorruptArtifactError: the file is cut short, not JSON, not an object, has a section
                that is not an object, or lacks a `required` one.
        """
        path = self.results_path
        if not os.path.isfile(path):
            return None
        try:
            data = read_json_object(path, _RESULTS_WHAT)
        except ValueError as error:  # its message already names the file and the problem
            raise CorruptArtifactError(str(error)) from error
        results = RunResults(path, data)
        for key in required:
            if not isinstance(data.get(key), dict):
                raise CorruptArtifactError(
                    f"{path}: no {key!r} object, which pnpp_tf.train writes; restore the file or "
                    f"choose another {self.flag}.")
        return results

    def dataset(self, dataset=None, data_dir=None):
        """(dataset, data_dir) to measure the run on: those given, else the run's own.

        Raises:
            CorruptArtifactError: an unreadable results.json (see `read_results`).
            UserError: no dataset known, an unknown one, or a data_dir that does not exist.
        """
        from pnpp_tf.data import DATASETS  # pylint: disable=import-outside-toplevel - needs TF

        if not dataset or not data_dir:
            results = self.read_results()
            run_flags = results.flags if results else {}
            dataset = dataset or run_flags.get("dataset")
            data_dir = data_dir or run_flags.get("data_dir")
        if not dataset or not data_dir:
            raise UserError(f"No dataset known for {self.flag}={self.path} (no {RESULTS_FILE} "
                            "with flags dataset and data_dir): pass --dataset and --data_dir.")
        if dataset not in DATASETS:
            raise UserError(f"Unknown --dataset={dataset!r}; choose one of {', '.join(DATASETS)}.")
        if not os.path.isdir(data_dir):
            raise UserError(f"--data_dir={data_dir} does not exist; pass the dataset's directory "
                            f"with --data_dir ({RESULTS_FILE} paths are relative to where "
                            "training ran).")
        return dataset, data_dir


def load_keras_model(path):
    """The Keras model in the .keras file `path` (uncompiled), pnpp_tf's custom layers known.

    Raises:
        MissingArtifactError: no such file.
        CorruptArtifactError: not a whole zip file (one cut short by a full disk, say, which
            Keras would report as "File not found").
        UnloadableArtifactError: Keras could not rebuild the model from it (its error is the
            `__cause__`).
    """
    # Here, not at the top: readers of results.json (tools/plot_training) need no Keras.
    import keras  # pylint: disable=import-outside-toplevel
    import pnpp_tf.modeling.model  # noqa: F401 pylint: disable=import-outside-toplevel - registers its layers

    if not os.path.isfile(path):
        raise MissingArtifactError(f"{path} does not exist.")
    if not zipfile.is_zipfile(path):
        raise CorruptArtifactError(f"{path} is not a whole .keras file ({os.path.getsize(path)} "
                                   "bytes): it may have been cut short. Save or train the model again.")
    try:
        return keras.saving.load_model(path, compile=False)
    # What Keras raises for a zip that is not a model it can rebuild: a missing member (KeyError),
    # an unknown class or bad config (ValueError, TypeError), unreadable weights (OSError).
    except (KeyError, OSError, TypeError, ValueError) as error:
        raise UnloadableArtifactError(
            f"{path} could not be loaded ({type(error).__name__}: {_first_line(error)}); was it "
            "saved by this version of pnpp_tf and Keras?") from error


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"
