"""Search indexes of image collections, embedded by a trained model.

- `pnpp_tf.indexing.saved_embedder`: a trained embedder loaded for inference from a model_dir or
  an exported SavedModel (`load_embedder`), returning unit embeddings. Not to be confused with
  `pnpp_tf.model.build_embedder`, which builds one to train.
- `pnpp_tf.indexing.embeddings`: image files found under a folder and embedded as evaluation
  embeds them, skipping unreadable ones (`find_images`, `embed_paths`).
- `pnpp_tf.indexing.neighbours`: the k nearest neighbours by cosine similarity, exact in numpy or
  on faiss (`nearest`, `cosine_distance`).
- `pnpp_tf.indexing.search_index`: the index itself, built, saved, loaded and searched
  (`SearchIndex`, `build_index`).

The command lines are `python -m pnpp_tf.index` (build one) and `python -m pnpp_tf.search`.
"""
