"""oneDNN's CPU kernels on every x86 CPU, unless the user chose otherwise.

TensorFlow 2.21 turns its oneDNN kernels on by default only on CPUs with AVX-512; elsewhere (a
Zen 1 EPYC, say) it runs slower default kernels: the ResNet-50 train step measured about 2x
slower there (issue 15's table). The switch, the TF_ENABLE_ONEDNN_OPTS environment variable, is
read once, when TensorFlow loads, so `pnpp_tf/__init__.py` calls `choose()` before any module of
the package imports TensorFlow. A value the user set is kept, and nothing is changed once
TensorFlow is loaded.
"""

import os
import platform
import sys

VARIABLE = "TF_ENABLE_ONEDNN_OPTS"
_X86 = ("x86_64", "amd64", "i386", "i686")

# What `choose()` found, for `describe()`: "pnpp_tf", "user", "tensorflow already loaded" or
# "not x86".
decided_by = None


def choose():
    """Sets TF_ENABLE_ONEDNN_OPTS=1 on x86 if the user has not set it and TensorFlow is not loaded."""
    global decided_by  # pylint: disable=global-statement - one decision per process
    if VARIABLE in os.environ:
        decided_by = "user"
    elif "tensorflow" in sys.modules:
        decided_by = "tensorflow already loaded"
    elif platform.machine().lower() not in _X86:
        decided_by = "not x86"
    else:
        os.environ[VARIABLE] = "1"
        decided_by = "pnpp_tf"


def describe():
    """One line for the log: the kernels in use, who chose them, and the CPU's vector extensions."""
    value = os.environ.get(VARIABLE)
    state = {"1": "oneDNN", "0": "TensorFlow's default"}.get(value, "TensorFlow's choice")
    return (f"CPU kernels: {state} ({VARIABLE}={value if value is not None else 'unset'}, "
            f"chosen by {decided_by}); CPU: {_cpu_model()}, {' '.join(_vector_flags()) or 'flags unknown'}")


def _cpu_model():
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def _vector_flags():
    flags = set((_cpuinfo_field("flags") or "").split())
    return [flag for flag in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if flag in flags]


def _cpuinfo_field(name):
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        return None
    return None
