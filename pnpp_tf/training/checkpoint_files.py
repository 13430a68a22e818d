"""The files of a run's checkpoints: which are there, which read back whole, and their records.

TensorFlow's `CheckpointManager` writes `ckpt-<N>.index` and `ckpt-<N>.data-*` and lists them in
the `checkpoint` index. Beside each, `ckpt-<N>.json` is the run's record at that point (finished
epochs, history, schedule state, config), written before the weights and read before any weight
is restored, so that a resumed run can be compared with the command that resumes it first. A
checkpoint without its record (older runs kept it inside the checkpoint, as a string variable)
is read from there.
"""

import contextlib
import json
import os
import re
import time

import tensorflow as tf
from absl import logging

from pnpp_tf.errors import UserError
from pnpp_tf.io_utils import write_atomic

INDEX_FILE = "checkpoint"  # TensorFlow's list of a directory's checkpoints, newest named first
PREFIX = "ckpt"  # tf.train.CheckpointManager's name for them: ckpt-<number>.index, .data-*
# Where checkpoints before the JSON record kept it: as variables of the checkpoint.
_LEGACY_RECORD = "record/.ATTRIBUTES/VARIABLE_VALUE"
_LEGACY_EPOCH = "epoch/.ATTRIBUTES/VARIABLE_VALUE"
# What reading a checkpoint raises: OpErrors, and the builtin exceptions TensorFlow translates
# some statuses into (IndexError for a file cut short, ValueError, RuntimeError).
READ_ERRORS = (tf.errors.OpError, IndexError, ValueError, RuntimeError)


def record_path(prefix):
    """The JSON record beside the checkpoint `prefix`."""
    return f"{prefix}.json"


def write_record(prefix, record):
    """Writes the record of the checkpoint `prefix` (whole or not at all)."""
    write_atomic(record_path(prefix), json.dumps(record, sort_keys=True) + "\n")


def read_record(prefix):
    """The record of the checkpoint `prefix`: its JSON record, else the one kept inside it.

    Returns:
        The record dict, with "finished_epochs".

    Raises:
        UserError: naming the file, if neither reads as a record.
    """
    path = record_path(prefix)
    if tf.io.gfile.exists(path):
        try:
            with tf.io.gfile.GFile(path) as file:
                record = json.loads(file.read())
        except (ValueError, tf.errors.OpError) as error:
            raise UserError(f"{path} is unreadable ({_reason(error)}).") from error
        if not isinstance(record, dict) or not isinstance(record.get("finished_epochs"), int):
            raise UserError(f"{path} is not a checkpoint record (no integer finished_epochs).")
        return record
    try:
        reader = tf.train.load_checkpoint(prefix)
        record = json.loads(reader.get_tensor(_LEGACY_RECORD).decode("utf-8"))
        return {**record, "finished_epochs": int(reader.get_tensor(_LEGACY_EPOCH))}
    except (*READ_ERRORS, KeyError) as error:
        raise UserError(f"{path} is missing (the checkpoint's record).") from error


def remove_orphan_records(directory):
    """Removes the records whose checkpoint the manager has deleted (it keeps only the last few)."""
    for path in tf.io.gfile.glob(os.path.join(directory, f"{PREFIX}-*.json")):
        if not tf.io.gfile.exists(path[:-len(".json")] + ".index"):
            with contextlib.suppress(tf.errors.OpError):
                tf.io.gfile.remove(path)


def newest_intact_checkpoint(directories):
    """The newest checkpoint in `directories` (searched in order) that reads back whole,
    logging a warning that names the bad file of each one passed over.

    Returns:
        Its path prefix; None when there is no checkpoint at all.

    Raises:
        UserError: one line: there are checkpoints, but none reads back whole.
    """
    problems = []
    for directory in directories:
        for prefix in checkpoints_in(directory):
            problem = checkpoint_problem(prefix)
            if problem is None:
                if problems:
                    logging.warning("Resuming from %s, the newest intact checkpoint; the training "
                                    "after it is done again.", prefix)
                return prefix
            logging.warning("Passing over an unreadable checkpoint: %s.", problem)
            problems.append(problem)
    if problems:
        where = " or ".join(directories)
        raise UserError(f"{where}: no intact checkpoint to resume from ({'; '.join(problems)}). "
                         f"Restore the checkpoints from a copy, or move {directories[0]} away to "
                         "start the run afresh.")
    return None


def checkpoints_in(directory):
    """The checkpoints (path prefixes ".../ckpt-N") of `directory`, newest first: those its
    `checkpoint` index lists, then any others found beside it (all when the index is unreadable).
    """
    found = _found_checkpoints(directory)
    listed = _listed_checkpoints(directory)
    if listed is None:
        listed = []
        if found:
            logging.warning("%s, the index of the checkpoints, is unreadable; using the %d "
                            "checkpoint(s) found beside it.", os.path.join(directory, INDEX_FILE),
                            len(found))
    return list(dict.fromkeys(listed + found))


def checkpoint_problem(prefix):
    """Why the checkpoint `prefix` cannot be restored, naming its bad file; None if it can.

    Every value and the record are read, so a data file cut short or corrupted (its checksums then
    fail) shows here, before anything is restored, rather than midway through a restore.
    """
    index = f"{prefix}.index"
    if not tf.io.gfile.exists(index):
        return f"{index} is missing (the checkpoint's files are gone)"
    try:
        reader = tf.train.load_checkpoint(prefix)
    except READ_ERRORS as error:
        return f"{index} is unreadable ({_reason(error)})"
    try:
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except READ_ERRORS as error:
        data = sorted(tf.io.gfile.glob(f"{prefix}.data-*")) or [f"{prefix}.data-*"]
        return f"{', '.join(data)} is unreadable ({_reason(error)})"
    try:
        read_record(prefix)
    except UserError as error:
        return str(error).rstrip(".")
    return None


def _listed_checkpoints(directory):
    """The checkpoints the `checkpoint` index of `directory` lists, newest first: [] without an
    index, None when it is unreadable."""
    if not tf.io.gfile.exists(os.path.join(directory, INDEX_FILE)):
        return []
    try:
        state = tf.train.get_checkpoint_state(directory)
    except ValueError:  # an empty index
        state = None
    if state is None or not state.model_checkpoint_path:
        return None
    return list(dict.fromkeys([state.model_checkpoint_path, *reversed(state.all_model_checkpoint_paths)]))


def _found_checkpoints(directory):
    """The checkpoints whose .index is in `directory`, newest (highest number) first."""
    indexes = [path for path in tf.io.gfile.glob(os.path.join(directory, f"{PREFIX}-*.index"))
               if _checkpoint_number(path) >= 0]
    return [path[:-len(".index")] for path in sorted(indexes, key=_checkpoint_number, reverse=True)]


def repair_index(directory):
    """Rewrites an unreadable `checkpoint` index to list the checkpoints beside it: TensorFlow's
    manager refuses an empty index, and forgets the checkpoints of a garbled one, which it would
    then never delete."""
    found = _found_checkpoints(directory)
    if not found or _listed_checkpoints(directory) is not None:
        return
    # The text form of TensorFlow's CheckpointState; every entry younger than the "preserved"
    # time, so that the manager deletes them in turn as it saves newer ones.
    now = time.time()
    lines = [f'model_checkpoint_path: "{os.path.basename(found[0])}"']
    lines += [f'all_model_checkpoint_paths: "{os.path.basename(p)}"' for p in reversed(found)]
    lines += [f"all_model_checkpoint_timestamps: {now}"] * len(found)
    lines.append(f"last_preserved_timestamp: {now - 1}")
    write_atomic(os.path.join(directory, INDEX_FILE), "\n".join(lines) + "\n")
    logging.warning("Rewrote the unreadable checkpoint index %s, listing %s.",
                    os.path.join(directory, INDEX_FILE), ", ".join(reversed(found)))


def remove_partial_save(directory, prefix, earlier):
    """Removes what a failed save of `prefix` left: TensorFlow's `<prefix>_temp` folder, the
    files of `prefix` that were not there before it (`earlier`), and a temporary of the index."""
    leftovers = [path for path in tf.io.gfile.glob(f"{prefix}.*") if path not in earlier]
    leftovers += tf.io.gfile.glob(os.path.join(directory, f"{INDEX_FILE}.tmp*"))
    for path in leftovers:
        with contextlib.suppress(tf.errors.OpError):
            tf.io.gfile.remove(path)
    with contextlib.suppress(tf.errors.OpError):
        if tf.io.gfile.isdir(f"{prefix}_temp"):
            tf.io.gfile.rmtree(f"{prefix}_temp")


def _checkpoint_number(path):
    match = re.search(rf"{PREFIX}-(\d+)\.index$", path)
    return int(match.group(1)) if match else -1


def _reason(error):
    """The gist of a TensorFlow error message, on one line."""
    message = getattr(error, "message", None) or str(error)
    message = re.sub(r"\{\{[^}]*\}\}\s*", "", message)  # TensorFlow's "{{function_node ...}}"
    return " ".join(message.split()) or type(error).__name__


