"""pnpp_tf: ProxyNCA++ deep metric learning for zero-shot image retrieval, in TensorFlow/Keras 3."""

__version__ = "0.1.0"
