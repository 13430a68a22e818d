"""Dataset readers and tf.data pipelines."""

from pnpp_tf.data.datasets import DATASETS, Protocol, load_split, load_splits, protocol
from pnpp_tf.data.split import Split

__all__ = ["DATASETS", "Protocol", "Split", "load_split", "load_splits", "protocol"]
