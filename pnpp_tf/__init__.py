"""pnpp_tf: ProxyNCA++ deep metric learning for zero-shot image retrieval, in TensorFlow/Keras 3."""

from pnpp_tf import cpu_kernels

# Before any module of the package imports TensorFlow, which reads the switch as it loads.
cpu_kernels.choose()

__version__ = "0.1.0"
