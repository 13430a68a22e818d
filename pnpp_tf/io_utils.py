"""Files written whole or not at all: a reader (or a crash) never sees half of one."""

import json
import os


def write_text_atomic(path, text):
    """Writes `text` to `path` through a temporary sibling and a rename."""
    partial = f"{path}.partial-{os.getpid()}"
    with open(partial, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(partial, path)


def write_json(path, payload):
    """Writes `payload` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True))
