"""An export directory (--export_dir, TF Serving's --model_base_path): the files it holds.

    <export_dir>/<version>/                                 a SavedModel (TF Serving's layout)
    <export_dir>/tflite/<version>/embedder_<variant>.tflite the TFLite variants
    <export_dir>/parity/<version>.json and .md              their parity report

Versions are positive integers. As TF Serving does, a reader uses the highest version directory
that holds a complete SavedModel (its saved_model.pb), passing over any other.
"""

import os

from absl import logging

from pnpp_tf.artifacts.errors import MissingArtifactError
from pnpp_tf.errors import UserError

SAVED_MODEL_FILE = "saved_model.pb"
FORMATS = ("saved_model", "tflite")
TFLITE_VARIANTS = ("float32", "float16", "dynamic_int8", "full_int8")
TFLITE_DIR = "tflite"
PARITY_DIR = "parity"


def is_saved_model(path):
    """True if `path` is a SavedModel directory (it holds saved_model.pb)."""
    return os.path.isfile(os.path.join(path, SAVED_MODEL_FILE))


class ExportDir:
    """The files of an export directory.

    Args:
        path: the directory (it need not exist yet).
        flag: how the user named it, for messages ("--export_dir", "--saved_model", "--model").
    """

    def __init__(self, path, flag="--export_dir"):
        self.path = path
        self.flag = flag

    def version_path(self, version):
        return os.path.join(self.path, str(version))

    def tflite_path(self, version, variant):
        return os.path.join(self.path, TFLITE_DIR, str(version), f"embedder_{variant}.tflite")

    def parity_stem(self, version):
        """`<export_dir>/parity/<version>`, to which the report adds .json and .md."""
        return os.path.join(self.path, PARITY_DIR, str(version))

    def saved_model_versions(self):
        """The versions holding a complete SavedModel, lowest first."""
        if not os.path.isdir(self.path):
            return []
        return sorted(int(name) for name in os.listdir(self.path)
                      if name.isdigit() and is_saved_model(os.path.join(self.path, name)))

    def served_path(self):
        """The SavedModel TF Serving would serve: `path` itself if it is one, else its highest
        complete version.

        Raises:
            MissingArtifactError: neither.
        """
        if is_saved_model(self.path):
            return self.path
        versions = self.saved_model_versions()
        if not versions:
            raise MissingArtifactError(
                f"{self.flag}={self.path} is not a SavedModel directory (no {SAVED_MODEL_FILE} in "
                "it or in a numbered version folder).")
        logging.info("Using version %d of the export %s", versions[-1], self.path)
        return self.version_path(versions[-1])

    def taken_versions(self):
        """Every version number in use by a SavedModel folder (whole or not), a TFLite folder or
        a parity report."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UserError(f"{self.flag}={self.path} is a file, not a directory.")
        taken = set()
        for folder, suffix in ((self.path, ""), (os.path.join(self.path, TFLITE_DIR), ""),
                               (os.path.join(self.path, PARITY_DIR), ".json")):
            if os.path.isdir(folder):
                names = [name[:len(name) - len(suffix)] for name in os.listdir(folder)
                         if name.endswith(suffix)]
                taken.update(int(name) for name in names if name.isdigit())
        return taken

    def new_version(self, version=None):
        """The version to write: `version` if it is free, else the next after those taken.

        Raises:
            UserError: `version` is not positive or is taken, or the directory is a file.
        """
        taken = self.taken_versions()
        if version is None:
            return max(taken, default=0) + 1
        if int(version) < 1:
            raise UserError(f"--version must be a positive integer, got {version}.")
        if int(version) in taken:
            raise UserError(f"Version {version} already exists in {self.flag}={self.path}; pass "
                            f"another --version, or none to write version {max(taken) + 1}.")
        return int(version)
