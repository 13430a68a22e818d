"""The training loop of `pnpp_tf.train`: phases, callbacks, resumable checkpoints and the
tf.distribute strategies."""
