"""Pixel bombs (small files of huge images) written cheaply, and the peak memory of a command."""

import re
import struct
import sys
import zlib

from cli_helpers import run_python

# Runs the command given after it, passing its output through, then adds the peak resident set
# of that one child (Linux reports ru_maxrss in KiB) as the last line of stderr.
_MEASURE = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print(f"PEAK_RSS_KIB={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", file=sys.stderr)
sys.exit(code)
"""


def write_png(path, width, height):
    """A valid 1-bit greyscale PNG of width x height white pixels: 76 KB for 20000 x 20000,
    written in a fraction of a second without holding the image in memory."""
    row = b"\0" + b"\xff" * ((width + 7) // 8)  # filter type 0, then the row's bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    with open(path, "wb") as file:
        file.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    return str(path)


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def run_measured(*args, timeout=600):
    """Runs `python args...` in a subprocess; returns (CompletedProcess, its peak RSS in bytes)."""
    result = run_python("-c", _MEASURE, sys.executable, *args, timeout=timeout)
    found = re.search(r"PEAK_RSS_KIB=(\d+)\s*$", result.stderr)
    assert found, result.stderr[-2000:]
    result.stderr = result.stderr[:found.start()]
    return result, int(found.group(1)) * 1024
