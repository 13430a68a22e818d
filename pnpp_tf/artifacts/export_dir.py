"""An export directory (--export_dir, TF Serving's --model_base_path): the files it holds.

    <export_dir>/<version>/                                 a SavedModel (TF Serving's layout)
    <export_dir>/tflite/<version>/embedder_<variant>.tflite the TFLite variants
    <export_dir>/onnx/<version>/embedder.onnx               the ONNX model (--format=onnx)
    <export_dir>/parity/<version>.json and .md              their parity report
    <export_dir>/parity/<version>.rejected.json and .md     the report of a version that failed
                                                            parity and was not published
    <export_dir>/export.lock                                locked by the export writing there

Versions are positive integers. `pnpp_tf.export` writes every part of a version under a
temporary name (`*.partial-<host>-<pid>-<hex>`, see `io_utils.is_temporary_name`), measures
parity on those, and only then publishes them, renaming in this order: tflite/<version>/,
onnx/<version>/, parity/<version>.md, parity/<version>.json and last <version>/, the directory TF Serving watches.

Which SavedModel versions are visible (`saved_model_versions`, `served_path`, so what
`pnpp_tf.evaluate --saved_model` and `pnpp_tf.index --model` read from a base directory): version
N when N/saved_model.pb is there, and parity/N.json is there too or the SavedModel is not one
`pnpp_tf.export` writes (it lacks the `serve_image_bytes` signature: another tool's, which has no
report to wait for). A pnpp_tf SavedModel without its report is passed over, with a log line: it
never passed parity (an export killed after its SavedModel and before its report, as exports
before this layout could be, or a report deleted since). As TF Serving does, a reader uses the
highest visible version. A version directory named directly is used as it is.

Leftovers (`remove_leftovers`, which an export runs while it holds export.lock, so that no writer
of them is alive): every temporary name; the passed-over SavedModels; tflite/N, onnx/N and
parity/N.md without parity/N.json; parity/N.json, tflite/N and onnx/N of a version with a SavedModel whose N/ is
missing while a temporary N.partial-* is there (an export killed between publishing its report
and its SavedModel). Published versions and rejected reports are never removed.
"""

import json
import os
import shutil

from absl import logging

from pnpp_tf.artifacts.errors import MissingArtifactError
from pnpp_tf.errors import UserError
from pnpp_tf.io_utils import is_temporary_name

SAVED_MODEL_FILE = "saved_model.pb"
# What --format exports by default: what needs no extra beyond tflite's.
FORMATS = ("saved_model", "tflite")
# What --format accepts: onnx needs the `onnx` extra (tf2onnx, onnx, onnxruntime).
FORMAT_CHOICES = FORMATS + ("onnx",)
TFLITE_VARIANTS = ("float32", "float16", "dynamic_int8", "full_int8")
TFLITE_DIR = "tflite"
ONNX_DIR = "onnx"
ONNX_FILE = "embedder.onnx"
PARITY_DIR = "parity"
LOCK_FILE = "export.lock"
REJECTED = ".rejected"


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

    def tflite_dir(self, version):
        return os.path.join(self.path, TFLITE_DIR, str(version))

    def tflite_path(self, version, variant):
        return os.path.join(self.tflite_dir(version), f"embedder_{variant}.tflite")

    def onnx_dir(self, version):
        return os.path.join(self.path, ONNX_DIR, str(version))

    def onnx_path(self, version):
        return os.path.join(self.onnx_dir(version), ONNX_FILE)

    def parity_stem(self, version):
        """`<export_dir>/parity/<version>`, to which the report adds .json and .md."""
        return os.path.join(self.path, PARITY_DIR, str(version))

    def rejected_stem(self, version):
        """`<export_dir>/parity/<version>.rejected`: the report of a version not published."""
        return self.parity_stem(version) + REJECTED

    def has_report(self, version):
        return os.path.isfile(self.parity_stem(version) + ".json")

    def saved_model_dirs(self):
        """Every version holding a complete SavedModel, visible or not, lowest first."""
        return sorted(v for v in _numbered(self.path) if is_saved_model(self.version_path(v)))

    def passed_over(self):
        """{version: why it is not visible} for the SavedModels readers pass over (see the module)."""
        return {version: (f"its SavedModel has no parity report {PARITY_DIR}/{version}.json, so it never "
                          "passed the parity check")
                for version in self.saved_model_dirs()
                if not self.has_report(version) and _written_by_pnpp_tf(self.version_path(version))}

    def saved_model_versions(self):
        """The visible SavedModel versions (see the module), lowest first."""
        hidden = self.passed_over()
        return [version for version in self.saved_model_dirs() if version not in hidden]

    def served_path(self):
        """The SavedModel to read: `path` itself if it is one, else its highest visible version.

        Logs each higher version passed over, and why.

        Raises:
            MissingArtifactError: neither; the message names the versions passed over.
        """
        if is_saved_model(self.path):
            return self.path
        hidden = self.passed_over()
        visible = [version for version in self.saved_model_dirs() if version not in hidden]
        for version, reason in sorted(hidden.items()):
            if not visible or version > visible[-1]:
                logging.warning("Passing over version %d of the export %s: %s.", version, self.path, reason)
        if not visible:
            if hidden:
                raise MissingArtifactError(
                    f"{self.flag}={self.path} has no published version ("
                    + "; ".join(f"version {v}: {reason}" for v, reason in sorted(hidden.items()))
                    + "). Export again (pnpp_tf.export removes such leftovers), or name a version directory.")
            raise MissingArtifactError(
                f"{self.flag}={self.path} is not a SavedModel directory (no {SAVED_MODEL_FILE} in "
                "it or in a numbered version folder).")
        logging.info("Using version %d of the export %s", visible[-1], self.path)
        return self.version_path(visible[-1])

    def taken_versions(self):
        """Every version number in use by a SavedModel folder (whole or not), a TFLite or ONNX
        folder or a parity report (a rejected one too)."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UserError(f"{self.flag}={self.path} is a file, not a directory.")
        parity = os.path.join(self.path, PARITY_DIR)
        return (set(_numbered(self.path)) | set(_numbered(os.path.join(self.path, TFLITE_DIR)))
                | set(_numbered(os.path.join(self.path, ONNX_DIR))) | set(_numbered(parity, ".json")) | set(_numbered(parity, REJECTED + ".json")))

    def new_version(self, version=None, also_taken=()):
        """The version to write: `version` if it is free, else the next after those taken.

        Args:
            version: the version asked for, or None for the next.
            also_taken: numbers the next version must also pass (those of removed leftovers:
                TF Serving may have loaded one, and serves a number once).

        Raises:
            UserError: `version` is not positive or is taken, or the directory is a file.
        """
        taken = self.taken_versions()
        following = max(taken | set(also_taken), default=0) + 1
        if version is None:
            return following
        if int(version) < 1:
            raise UserError(f"--version must be a positive integer, got {version}.")
        if int(version) in taken:
            raise UserError(f"Version {version} already exists in {self.flag}={self.path}; pass "
                            f"another --version, or none to write version {following}.")
        return int(version)

    def remove_leftovers(self):
        """Removes what killed exports left (see the module); only call it holding export.lock.

        Returns:
            The numbers of the versions some of whose (unpublished) parts were removed.
        """
        if "://" in self.path or not os.path.isdir(self.path):
            return set()
        removed = set()
        parity = os.path.join(self.path, PARITY_DIR)
        partial_saved_models = {name.split(".", 1)[0] for name in _names(self.path) if is_temporary_name(name)}
        for version, reason in self.passed_over().items():
            removed.add(version)
            self._remove(version, reason, self.version_path(version), self.tflite_dir(version),
                         self.onnx_dir(version), self.parity_stem(version) + ".md")
        for version in _numbered(parity, ".json"):
            if (str(version) in partial_saved_models and not os.path.isdir(self.version_path(version))
                    and "saved_model" in _report_formats(self.parity_stem(version) + ".json")):
                removed.add(version)
                self._remove(version, "its export was killed before publishing its SavedModel",
                             self.tflite_dir(version), self.onnx_dir(version), self.parity_stem(version) + ".md",
                             self.parity_stem(version) + ".json")
        side_folders = [os.path.join(self.path, name) for name in (TFLITE_DIR, ONNX_DIR)]
        for folder, suffix in [(folder, "") for folder in side_folders] + [(parity, ".md")]:
            for version in _numbered(folder, suffix):
                if not self.has_report(version):
                    removed.add(version)
                    self._remove(version, f"it has no parity report {PARITY_DIR}/{version}.json",
                                 os.path.join(folder, f"{version}{suffix}"))
        for folder in (self.path, *side_folders, parity):
            for name in _names(folder):
                if is_temporary_name(name):
                    _delete(os.path.join(folder, name))
                    logging.info("Removed %s, left by an export that did not finish.", os.path.join(folder, name))
        return removed

    def _remove(self, version, reason, *paths):
        for path in paths:
            if os.path.lexists(path):
                _delete(path)
                logging.warning("Removed %s, a part of version %d, which was never published: %s.",
                                path, version, reason)


def _names(folder):
    return os.listdir(folder) if os.path.isdir(folder) else []


def _numbered(folder, suffix=""):
    """The integers N for which `<folder>/<N><suffix>` exists."""
    stems = [name[:len(name) - len(suffix)] for name in _names(folder) if name.endswith(suffix)]
    return [int(stem) for stem in stems if stem.isdigit()]


def _delete(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def _written_by_pnpp_tf(path):
    """True if the SavedModel in `path` has pnpp_tf.export's bytes signature. False for another
    tool's, and for a saved_model.pb that does not parse (its loader then names the problem)."""
    # pylint: disable=import-outside-toplevel - TensorFlow only for readers of export directories
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    from pnpp_tf.serving.signatures import BYTES_SIGNATURE

    proto = saved_model_pb2.SavedModel()
    try:
        with open(os.path.join(path, SAVED_MODEL_FILE), "rb") as file:
            proto.ParseFromString(file.read())
    except (OSError, DecodeError):
        return False
    return any(BYTES_SIGNATURE in graph.signature_def for graph in proto.meta_graphs)


def _report_formats(path):
    """The formats a parity report covers (its "formats", or those of its variants); () if unreadable."""
    try:
        with open(path, encoding="utf-8") as file:
            report = json.load(file)
        if "formats" in report:
            return tuple(report["formats"])
        names = [row["name"] for row in report["variants"]]
    except (OSError, ValueError, TypeError, KeyError):
        return ()
    return tuple(kind for kind in FORMAT_CHOICES if any(name.startswith(kind) for name in names))
