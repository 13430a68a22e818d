"""Keras callbacks for training: zero-shot Recall@K each epoch and learning-rate logging."""

import time

import keras
from absl import logging


class RecallAtK(keras.callbacks.Callback):
    """Embeds the evaluation split every `every_n_epochs` epochs and logs Recall@K.

    The values go into the epoch logs as "<prefix>recall@K" (and "<prefix>map@r"), so History,
    TensorBoard and any later callback see them.

    Args:
        evaluator: a `pnpp_tf.retrieval.RetrievalEvaluator`.
        every_n_epochs: evaluate after every n-th epoch (and never when n is 0).
        prefix: prefix of the logged names.
    """

    def __init__(self, evaluator, every_n_epochs=1, prefix="test_"):
        super().__init__()
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0, got {every_n_epochs}.")
        self.evaluator = evaluator
        self.every_n_epochs = every_n_epochs
        self.prefix = prefix

    def on_epoch_end(self, epoch, logs=None):
        if not self.every_n_epochs or (epoch + 1) % self.every_n_epochs:
            return
        start = time.perf_counter()
        metrics = self.evaluator.measure(self.model)
        logged = {f"recall@{k}": metrics[f"recall@{k}"] for k in self.evaluator.ks}
        logged["map@r"] = metrics["map@r"]
        if logs is not None:
            logs.update({self.prefix + name: value for name, value in logged.items()})
        summary = " ".join(f"{name}={value:.4f}" for name, value in logged.items())
        logging.info("epoch %d %s: %s (%.1fs)", epoch + 1, self.prefix.rstrip("_"), summary,
                     time.perf_counter() - start)


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the main ("lr") and the proxy ("proxy_lr") learning rates to the epoch logs."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        proxy_optimizer = getattr(self.model, "proxy_optimizer", None)
        if proxy_optimizer is not None:
            logs["proxy_lr"] = float(keras.ops.convert_to_numpy(proxy_optimizer.learning_rate))
