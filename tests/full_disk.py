"""A disk that fills up: a size-limited tmpfs, for tests of what a full disk leaves behind.

    from full_disk import fill_leaving, small_disk  # noqa: F401 - small_disk is a fixture

    def test_something(small_disk):
        filler = fill_leaving(small_disk, 100_000)     # about 100 kB left free
"""

import os
import shutil
import subprocess

import pytest

SIZE = "48m"  # room for a small_cnn checkpoint (about 14 MB) and more


@pytest.fixture
def small_disk(tmp_path):
    """A directory on a fresh `SIZE` tmpfs, unmounted after the test.

    Skips unless the tests run as root and the mount works.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        # Lazily if something still holds a file open there: the mount must not outlive the test.
        if subprocess.run(["umount", str(mount_point)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, check=False)


def fill_leaving(folder, free_bytes):
    """Writes `<folder>/filler` so that about `free_bytes` stay free; returns its path."""
    path = os.path.join(folder, "filler")
    size = max(0, shutil.disk_usage(folder).free - int(free_bytes))
    with open(path, "wb") as file:
        for start in range(0, size, 1 << 20):
            file.write(b"\0" * min(1 << 20, size - start))
    return path


def listing(folder):
    """Every file and folder under `folder`, relative to it, sorted (the filler left out)."""
    found = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            found.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(name for name in found if name != "filler")
