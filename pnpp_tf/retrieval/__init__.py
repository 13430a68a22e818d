"""From image files to neighbours and metrics: embedding (`embed`), the one exact k-NN engine
(`neighbours`), the retrieval metrics (`metrics`), the evaluator training and `pnpp_tf.evaluate`
measure with (`evaluator`) and the search index of `pnpp_tf.index` and `pnpp_tf.search`
(`search_index`)."""
