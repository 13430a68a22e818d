"""Dataset readers and tf.data pipelines."""

from pnpp_tf.data.datasets import DATASETS, Split, load_split, load_splits

__all__ = ["DATASETS", "Split", "load_split", "load_splits"]
