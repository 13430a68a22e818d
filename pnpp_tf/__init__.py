"""pnpp_tf: ProxyNCA++ deep metric learning for zero-shot image retrieval, in TensorFlow/Keras 3."""

from pnpp_tf import cpu_kernels, tf_log

# Before any module of the package imports TensorFlow, which reads both switches as it loads.
cpu_kernels.choose()
tf_log.prepare()

__version__ = "0.1.0"
