"""What an exported model serves (`signatures`: the SavedModel's and TFLite's functions) and the
report that the exports embed like the Keras model (`parity`)."""
