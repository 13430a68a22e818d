"""What a run's data was, and what has changed in it since.

    recorded = DataFingerprint.of_splits(splits)        # at the start of a run
    changes = recorded.changes_to(DataFingerprint.of_splits(load_splits(...)))   # on resume

A fingerprint lists, for each split, its class names with their image counts and every file's
path, size and modification time: the key the image cache uses for "this file is unchanged". It
costs a `stat` per file and reads no image. A checkpoint records the fingerprint's digest; the
whole fingerprint is kept once per digest in `<model_dir>/data_fingerprints/<digest>.json`, so
that a resumed run can say which classes and files changed, not only that something did.
"""

import dataclasses
import hashlib
import json
import os

import tensorflow as tf

from pnpp_tf.io_utils import read_json_object, write_atomic

FINGERPRINTS_DIR = "data_fingerprints"
# Paths named in a one-line message before "and N more".
SHOWN_PATHS = 3


def file_state(path):
    """(size in bytes, modification time in ns) of `path`; None if it is gone or unreadable."""
    try:
        if "://" in path:
            stat = tf.io.gfile.stat(path)
            return stat.length, stat.mtime_nsec
        stat = os.stat(path)
        return stat.st_size, stat.st_mtime_ns
    except (OSError, tf.errors.OpError):
        return None


@dataclasses.dataclass(frozen=True)
class SplitFingerprint:
    """One split: `class_names`, the image count of each, and {path: [size, mtime_ns]}, with
    paths relative to the dataset's directory `root` (so a dataset moved whole is the same data).
    """

    class_names: tuple
    counts: tuple
    files: dict
    root: str = ""

    @classmethod
    def of_split(cls, split, root=""):
        counts = [0] * split.num_classes
        for label in split.labels.tolist():
            counts[label] += 1
        return cls(tuple(split.class_names), tuple(counts),
                   {_relative(path, root): list(file_state(path) or (None, None)) for path in split.paths}, root)

    def to_json(self):
        return {"class_names": list(self.class_names), "counts": list(self.counts), "files": self.files}

    @classmethod
    def from_json(cls, payload, root=""):
        return cls(tuple(payload["class_names"]), tuple(payload["counts"]), dict(payload["files"]), root)

    def changed_files(self, paths):
        """The files of `paths` whose size or modification time is no longer the recorded one,
        or that are gone: [(path, "removed" or "modified")]."""
        changed = []
        for path in paths:
            recorded, now = self.files.get(_relative(path, self.root)), file_state(path)
            if now is None:
                changed.append((path, "removed"))
            elif recorded is not None and list(now) != list(recorded):
                changed.append((path, "modified"))
        return changed


class DataFingerprint:
    """The fingerprints of a dataset's splits.

    Args:
        splits: {split name: `SplitFingerprint`}.
    """

    def __init__(self, splits):
        self.splits = dict(splits)

    @classmethod
    def of_splits(cls, splits, root=""):
        """The fingerprint of {name: `pnpp_tf.data.Split`} as the files are now; paths under
        `root` (the dataset's directory) are recorded relative to it."""
        return cls({name: SplitFingerprint.of_split(split, root) for name, split in splits.items()})

    def to_json(self):
        return {name: split.to_json() for name, split in sorted(self.splits.items())}

    @property
    def digest(self):
        """A short hex digest of the whole fingerprint (class names, counts, every file's state)."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def summary(self):
        """{split: {"classes", "images"}}: what a checkpoint record shows of the data."""
        return {name: {"classes": len(split.class_names), "images": len(split.files)}
                for name, split in sorted(self.splits.items())}

    def save(self, model_dir):
        """Writes `<model_dir>/data_fingerprints/<digest>.json` (once: the name is the content)."""
        path = fingerprint_path(model_dir, self.digest)
        if not tf.io.gfile.exists(path):
            write_atomic(path, json.dumps(self.to_json(), separators=(",", ":")))
        return path

    @classmethod
    def load(cls, model_dir, digest, root=""):
        """The fingerprint a run in `model_dir` recorded as `digest`; None if its file is gone."""
        path = fingerprint_path(model_dir, digest)
        if not tf.io.gfile.exists(path):
            return None
        payload = read_json_object(path, "data fingerprint")
        try:
            return cls({name: SplitFingerprint.from_json(split, root) for name, split in payload.items()})
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a data fingerprint ({error!r}).") from error

    def changes_to(self, other, ignored_paths=()):
        """What changed from this fingerprint to `other`, split by split.

        Args:
            other: the newer `DataFingerprint`.
            ignored_paths: files whose change is already known and accepted (e.g. images the run
                skipped because they stopped decoding).

        Returns:
            A list of `SplitChange`s, one per split that changed.
        """
        ignored = {_relative(path, root) for path in ignored_paths
                   for root in {split.root for split in other.splits.values()}}
        changes = []
        for name in sorted(set(self.splits) | set(other.splits)):
            before = self.splits.get(name) or SplitFingerprint((), (), {})
            after = other.splits.get(name) or SplitFingerprint((), (), {})
            change = SplitChange.between(name, before, after, ignored)
            if change:
                changes.append(change)
        return changes


def fingerprint_path(model_dir, digest):
    return os.path.join(model_dir, FINGERPRINTS_DIR, f"{digest}.json")


@dataclasses.dataclass(frozen=True)
class SplitChange:
    """How one split changed: classes added, removed and renamed, files added, removed, modified."""

    split: str
    classes_added: tuple = ()
    classes_removed: tuple = ()
    classes_renamed: tuple = ()  # (old name, new name)
    files_added: tuple = ()
    files_removed: tuple = ()
    files_modified: tuple = ()

    @classmethod
    def between(cls, name, before, after, ignored=frozenset()):
        """The change from `before` to `after` (two `SplitFingerprint`s of split `name`)."""
        old_classes, new_classes = set(before.class_names), set(after.class_names)
        added = sorted(new_classes - old_classes)
        removed = sorted(old_classes - new_classes)
        renamed = _renamed_classes(before, after, removed, added)
        added = [c for c in added if c not in {new for _, new in renamed}]
        removed = [c for c in removed if c not in {old for old, _ in renamed}]
        old_files, new_files = before.files, after.files
        return cls(
            name, tuple(added), tuple(removed), tuple(renamed),
            files_added=tuple(sorted(p for p in new_files if p not in old_files and p not in ignored)),
            files_removed=tuple(sorted(p for p in old_files if p not in new_files and p not in ignored)),
            files_modified=tuple(sorted(p for p in new_files if p in old_files and p not in ignored
                                        and list(new_files[p]) != list(old_files[p]))),
        )

    def __bool__(self):
        return any((self.classes_added, self.classes_removed, self.classes_renamed, self.files_added,
                    self.files_removed, self.files_modified))

    @property
    def classes_changed(self):
        return bool(self.classes_added or self.classes_removed or self.classes_renamed)

    def describe(self):
        """One clause: e.g. "train: class c9 added, 2 files removed (a.png, b.png)"."""
        parts = []
        for what, names in (("added", self.classes_added), ("removed", self.classes_removed)):
            if names:
                parts.append(f"{_count(len(names), 'class', 'classes')} {what} ({_first(names)})")
        if self.classes_renamed:
            renames = [f"{old} -> {new}" for old, new in self.classes_renamed]
            parts.append(f"{_count(len(renames), 'class', 'classes')} renamed ({_first(renames)})")
        for what, paths in (("added", self.files_added), ("removed", self.files_removed),
                            ("modified", self.files_modified)):
            if paths:
                parts.append(f"{_count(len(paths), 'file', 'files')} {what} ({_first(paths)})")
        return f"{self.split}: {', '.join(parts)}"


def _renamed_classes(before, after, removed, added):
    """Pairs (old, new) of a removed and an added class holding the same files (by file name,
    size and modification time): a class folder that was renamed."""
    def contents(fingerprint, name):
        prefix = f"/{name}/"
        return sorted((os.path.basename(p), tuple(state)) for p, state in fingerprint.files.items()
                      if prefix in "/" + p)

    by_contents = {}
    for new in added:
        by_contents.setdefault(tuple(contents(after, new)), new)
    pairs = []
    for old in removed:
        key = tuple(contents(before, old))
        if key and key in by_contents:
            pairs.append((old, by_contents.pop(key)))
    return pairs


def _relative(path, root):
    """`path` relative to `root` when it lies under it (with "/" separators), else as it is."""
    if root and "://" not in path:
        relative = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
        if not relative.startswith(".."):
            return relative.replace(os.sep, "/")
    return path


def _count(n, one, many):
    return f"{n} {one if n == 1 else many}"


def _first(items):
    shown = ", ".join(items[:SHOWN_PATHS])
    return shown + (f" and {len(items) - SHOWN_PATHS} more" if len(items) > SHOWN_PATHS else "")
