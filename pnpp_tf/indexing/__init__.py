"""Search indexes of image collections, embedded by a trained model.

The trained embedder that embeds them is loaded by `pnpp_tf.artifacts.load_embedder`, from a
model_dir or an exported SavedModel, and returns unit embeddings.

- `pnpp_tf.indexing.embeddings`: image files found under a folder and embedded as evaluation
  embeds them, skipping unreadable ones (`find_images`, `embed_paths`).
- `pnpp_tf.indexing.neighbours`: the k nearest neighbours by cosine similarity, search's side of
  the one k-NN engine `pnpp_tf.neighbours` (`nearest`, `cosine_distance`).
- `pnpp_tf.indexing.search_index`: the index itself, built, saved, loaded and searched
  (`SearchIndex`, `build_index`).

The command lines are `python -m pnpp_tf.index` (build one) and `python -m pnpp_tf.search`.
"""
