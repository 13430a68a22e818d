"""A catalogue search answered in the SavedModel's own graph: the `retrieve` signatures.

    retrieve             image_bytes string [B], k int32 scalar  ->  ids string [B, k],
    retrieve_embeddings  embedding float32 [B, D], k int32 scalar     indices int64 [B, k],
                                                                      scores float32 [B, k],
                                                                      distances float32 [B, k]

beside `serving_default` and `serve_image_bytes` (`pnpp_tf.serving.signatures`), in one SavedModel:

    from pnpp_tf.serving import retrieve
    module = retrieve.RetrievalServingModule(embedder, gallery, ids, max_k=100, dtype="float16")
    module.save("exports/shop/1")
    loaded = tf.saved_model.load("exports/shop/1")
    found = loaded.signatures["retrieve"](image_bytes=tf.constant([jpeg_bytes]), k=tf.constant(10))
    found["ids"].numpy()        # [[b"shoes/0041.jpg", ...]], nearest first

`retrieve` decodes the images exactly as `serve_image_bytes` does (same pixel budget, same
errors) and embeds them; `retrieve_embeddings` takes embeddings made elsewhere. Both L2-normalise
the queries and rank the gallery as `pnpp_tf.retrieval.neighbours` does: score = float32 dot
product of unit rows, descending, ties by ascending gallery index. `distances` are cosine
distances, 1 - score clipped at 0 (`pnpp_tf.retrieval.search_index.cosine_distance`).

`k` is a scalar, 1 <= k <= max_k (fixed at export, at most the gallery's size); anything else
fails with InvalidArgument naming k and the bound. In a PredictRequest:
`request.inputs["k"].CopyFrom(tf.make_tensor_proto(10, tf.int32))`; over REST use the columnar
form, `{"signature_name": "retrieve", "inputs": {"image_bytes": [{"b64": ...}], "k": 10}}` (the
row form would need every input to share the batch dimension). For the same reason a server run
with --enable_batching refuses `retrieve` requests (its batching wants a batch dimension on every
input); the embedding signatures are unaffected.

The search is exact and stock TensorFlow only (TF Serving loads no custom ops): a `tf.while_loop`
over fixed blocks of gallery rows keeps a running top-k, so memory holds one block's scores
(B x block_size floats) and one float32 copy of a block, never B x N scores. The gallery is a
non-trainable variable, float32 or float16 (half the SavedModel; each block is cast to float32
before its scores are computed, so scores are those of the float16-rounded rows).

Cost: every request reads the whole gallery, so time grows with N: on 2 Xeon cores (AVX-512),
512-d rows, k=10, model and decoding excluded, one query takes 1.4 ms at 10k items, 11 ms at
100k and 105 ms at 1M in float32; float16 is slower at batch 1 (its cast to float32 costs more
than its halved reads save: 15 ms at 100k, 170-230 ms at 1M) and as fast at batch 16, which
costs about 3x one query. Exact in-graph retrieval suits catalogues up to about 250k items;
beyond, an approximate index outside the graph (`pnpp_tf.retrieval.ann`) does.
"""

import os

import numpy as np
import tensorflow as tf
from absl import logging

from pnpp_tf.errors import UserError
from pnpp_tf.io_utils import variables_bytes
from pnpp_tf.retrieval import neighbours
from pnpp_tf.retrieval.catalogue import Catalogue
from pnpp_tf.retrieval.search_index import SearchIndex
from pnpp_tf.serving import signatures

RETRIEVE_SIGNATURE = "retrieve"
EMBEDDINGS_SIGNATURE = "retrieve_embeddings"
EMBEDDING_INPUT = "embedding"
K_INPUT = "k"
OUTPUTS = ("ids", "indices", "scores", "distances")
DTYPES = ("float32", "float16")
DEFAULT_MAX_K = 100
# Gallery rows scored per loop step. Fewer, larger steps save op overhead, but a float16 block
# is cast to a float32 copy (8,192 x 512 x 4 B = 16 MB), which is slower to write and read back
# once it outgrows the caches: 8,192 was as fast as any for float32 and the fastest for float16
# on 2 Xeon cores (100k x 512 gallery, batches of 1 and 16).
DEFAULT_BLOCK_ROWS = 8192
# The neighbours engine's normaliser, x / max(||x||, 1e-12): sqrt and division are correctly
# rounded, so a row of norm exactly 1 stays bit for bit (rsqrt, as l2_normalize uses, does not).
_MIN_NORM = 1e-12
# Gallery rows normalised and stored at a time when building.
_FILL_ROWS = 1 << 16


class RetrievalServingModule(signatures.EmbedderServingModule):
    """An `EmbedderServingModule` that also searches a catalogue: `retrieve` and `retrieve_embeddings`.

    Args:
        embedder: as for `EmbedderServingModule`.
        gallery: float [N, D] embeddings of the catalogue, D the embedder's width; normalised here
            (`neighbours.unit_rows`, which also refuses non-finite rows).
        ids: N strings (str or bytes) naming the items: the catalogue's image paths, relative
            to its root.
        max_pixels: as for `EmbedderServingModule`.
        max_k: the largest k a request may ask for; lowered to N if the gallery is smaller.
        dtype: "float32" or "float16", how the gallery is stored.
        block_size: gallery rows scored per step of the search.

    Attributes:
        gallery, ids, max_k: saved as variables (`loaded.ids.numpy()`, `loaded.max_k.numpy()`).
        retrieve, retrieve_embeddings: the `tf.function`s behind the two signatures.

    Raises:
        UserError: an empty or non-finite gallery, one of another width than the embeddings,
            ids not one per row, or a bad max_k, dtype or block_size.
    """

    def __init__(self, embedder, gallery, ids, max_pixels=signatures.DEFAULT_MAX_PIXELS,
                 max_k=DEFAULT_MAX_K, dtype="float32", block_size=DEFAULT_BLOCK_ROWS,
                 name="pnpp_tf_embedder"):
        super().__init__(embedder, max_pixels=max_pixels, name=name)
        if dtype not in DTYPES:
            raise UserError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
        if int(max_k) < 1:
            raise UserError(f"max_k must be at least 1, got {max_k}.")
        if int(block_size) < 1:
            raise UserError(f"block_size must be at least 1, got {block_size}.")
        gallery = neighbours.check_rows(gallery, "gallery")  # no copy of a float32 array
        num_items, width = gallery.shape
        if width != self._embedding_dim:
            raise UserError(f"The gallery's rows are {width}-d but the embedder's embeddings are "
                            f"{self._embedding_dim}-d: was it embedded with another model?")
        ids = [os.fsencode(item) for item in ids]  # bytes: any file name, UTF-8 or not
        if len(ids) != num_items:
            raise UserError(f"{len(ids)} ids for a gallery of {num_items} rows: give one per row.")
        if int(max_k) > num_items:
            logging.info("max_k=%d lowered to the gallery's %d items.", int(max_k), num_items)
        self._max_k = min(int(max_k), num_items)
        self._block_size = int(block_size)
        # Variables, not constants: they go to variables/ rather than saved_model.pb, which
        # protobuf limits to 2 GB. Filled a chunk of unit rows at a time, so that building holds
        # the caller's array and the variable, not two more full-size copies (a 1M x 512 float32
        # gallery is 2 GB).
        self.gallery = tf.Variable(tf.zeros([num_items, width], dtype), trainable=False, name="gallery")
        for start in range(0, num_items, _FILL_ROWS):
            rows = neighbours.unit_rows(gallery[start:start + _FILL_ROWS], "gallery")
            self.gallery[start:start + len(rows)].assign(rows.astype(dtype, copy=False))
        self.ids = tf.Variable(tf.constant(ids, tf.string), trainable=False, name="ids")
        self.max_k = tf.Variable(self._max_k, dtype=tf.int32, trainable=False, name="max_k")
        k_spec = tf.TensorSpec([], tf.int32, K_INPUT)
        self.retrieve = tf.function(self._retrieve, input_signature=[
            tf.TensorSpec([None], tf.string, signatures.BYTES_INPUT), k_spec])
        self.retrieve_embeddings = tf.function(self._retrieve_embeddings, input_signature=[
            tf.TensorSpec([None, self._embedding_dim], tf.float32, EMBEDDING_INPUT), k_spec])

    def signatures(self):
        """The four signatures to save: the embedder's two, `retrieve` and `retrieve_embeddings`."""
        found = super().signatures()
        found[RETRIEVE_SIGNATURE] = self.retrieve.get_concrete_function()
        found[EMBEDDINGS_SIGNATURE] = self.retrieve_embeddings.get_concrete_function()
        return found

    def _retrieve(self, image_bytes, k):
        # The images wait for the check: a bad k should not cost a batch of decodes first.
        image_bytes, k = self._after_k_check(k, image_bytes, k)
        embedding = self._serve_image_bytes(image_bytes)[signatures.OUTPUT]
        return self._search(embedding, k)

    def _retrieve_embeddings(self, embedding, k):
        embedding, k = self._after_k_check(k, embedding, k)
        finite = tf.debugging.Assert(
            tf.reduce_all(tf.math.is_finite(embedding)),
            ["embedding has NaN or infinite values; send the embeddings serve_image_bytes returns."])
        with tf.control_dependencies([finite]):
            return self._search(tf.identity(embedding), k)

    def _after_k_check(self, k, *tensors):
        """`tensors`, available only once k is known to be in range (else InvalidArgument)."""
        check = tf.debugging.Assert(
            tf.logical_and(k >= 1, k <= self._max_k),
            [tf.strings.format("k={} is out of range: it must be between 1 and max_k={} (fixed at "
                               "export; the gallery holds {} items).",
                               (k, self._max_k, self.gallery.shape[0]))])
        with tf.control_dependencies([check]):
            return [tf.identity(tensor) for tensor in tensors]

    def _search(self, embedding, k):
        norm = tf.sqrt(tf.reduce_sum(tf.square(embedding), axis=1, keepdims=True))
        queries = embedding / tf.maximum(norm, _MIN_NORM)
        scores, indices = blockwise_top_k(queries, self.gallery, k, self._block_size)
        return {
            "ids": tf.gather(self.ids, indices),
            "indices": tf.cast(indices, tf.int64),
            "scores": scores,
            "distances": tf.maximum(1.0 - scores, 0.0),
        }


def blockwise_top_k(queries, gallery, k, block_size=DEFAULT_BLOCK_ROWS):
    """The `k` best gallery rows of each query by dot product, one block of rows at a time.

    Exact, in the order of `pnpp_tf.retrieval.neighbours`: score descending, ties by ascending
    gallery index. tf.math.top_k lists equal values lower position first; each step ranks the
    running best (all of lower index than the block, and themselves in that order) followed by
    the block's columns (in index order), so among equal scores the lower index always wins.

    Args:
        queries: float32 [B, D].
        gallery: float32 or float16 [N, D] tensor or variable; each block is cast to float32.
        k: int32 scalar tensor (or int), 1 <= k <= N; not checked here.
        block_size: Python int, gallery rows per step.

    Returns:
        (float32 scores [B, k], int32 gallery indices [B, k]).
    """
    gallery = tf.convert_to_tensor(gallery)  # read once: every step slices this one tensor
    num_items = tf.shape(gallery)[0]
    batch = tf.shape(queries)[0]
    k = tf.convert_to_tensor(k, tf.int32)

    def step(start, best_scores, best_index):
        rows = tf.minimum(block_size, num_items - start)
        block = tf.cast(tf.slice(gallery, [start, 0], [rows, -1]), tf.float32)
        scores = tf.matmul(queries, block, transpose_b=True)
        # Running best first: see the tie rule above.
        top_scores, position = tf.math.top_k(tf.concat([best_scores, scores], axis=1), k)
        from_best = tf.gather(best_index, tf.minimum(position, k - 1), batch_dims=1)
        return start + rows, top_scores, tf.where(position < k, from_best, start + position - k)

    # Placeholders every real score beats (scores of finite unit rows are >= -1); as k <= N,
    # all are replaced by the end. Index -1 would show if one were not.
    initial = (tf.constant(0), tf.fill([batch, k], tf.constant(-np.inf, tf.float32)),
               tf.fill([batch, k], -1))
    # parallel_iterations=1: steps run one after another, so one block is in memory at a time.
    _, best_scores, best_index = tf.while_loop(
        lambda start, *_: start < num_items, step, initial, parallel_iterations=1)
    return best_scores, best_index


def read_index(index_path):
    """The gallery and ids the export serves, from an index of `python -m pnpp_tf.index`.

    Args:
        index_path: a catalogue directory (`pnpp_tf.retrieval.catalogue`), or an .npz index of an
            earlier pnpp_tf (`pnpp_tf.retrieval.search_index.SearchIndex`).

    Returns:
        (float32 [N, D] rows as stored, which `RetrievalServingModule` scales to unit length as
        the exact engine does, so that `retrieve` ranks as `Catalogue.search(backend="exact")`;
        the N image paths relative to the images root, in item order (an .npz path outside its
        root kept as stored); the index's metadata: "image_size", "model", ...).

    Raises:
        UserError: not an index, an empty one, or a catalogue with a damaged shard (its items
            would be missing from the export).
    """
    if not os.path.isdir(index_path):
        index = SearchIndex.load(index_path)
        root = index.metadata.get("images_root")
        inside = os.path.join(os.path.abspath(root), "") if root else None
        ids = [os.path.relpath(path, inside) if inside and os.path.abspath(path).startswith(inside) else path
               for path in index.paths]
        return index.embeddings, ids, index.metadata
    opened = Catalogue.open(index_path)
    if opened.damaged:
        names = ", ".join(name for name, _ in opened.damaged)
        raise UserError(f"--index={index_path}: shard(s) {names} are damaged ({opened.damaged[0][1]}); "
                        "run python -m pnpp_tf.index on it again before exporting it.")
    if not len(opened):
        raise UserError(f"--index={index_path} holds no items.")
    rows = np.concatenate([shard.decoded() for shard in opened.shards])
    return rows, opened.relative_paths(), opened.manifest


def serving_module(embedder, max_pixels=signatures.DEFAULT_MAX_PIXELS, index_path=None,
                   max_k=DEFAULT_MAX_K, dtype="float32", image_size=None):
    """The module `pnpp_tf.export` saves: the embedder's signatures, and the catalogue's too if
    an index is given.

    Args:
        embedder: the Keras embedder (`Embedder.keras_model`).
        max_pixels: the bytes signatures' pixel budget.
        index_path: None, or an index made by `python -m pnpp_tf.index` with this model
            (`read_index`).
        max_k, dtype: as for `RetrievalServingModule`.
        image_size: the embedder's crop size, checked against the index's (None: not checked).

    Returns:
        An `EmbedderServingModule`, or with `index_path` a `RetrievalServingModule`.

    Raises:
        UserError: an unreadable index, or one made at another crop size or width.
    """
    if index_path is None:
        return signatures.EmbedderServingModule(embedder, max_pixels=max_pixels)
    rows, ids, metadata = read_index(index_path)
    indexed_size = metadata.get("image_size")
    if image_size is not None and indexed_size is not None and int(indexed_size) != int(image_size):
        raise UserError(f"--index={index_path} holds embeddings of {indexed_size} px crops but the "
                        f"model takes {image_size} px ones: index the catalogue with this model.")
    logging.info("Serving retrieval over the %d items of %s (%s, max_k=%s)",
                 len(ids), index_path, dtype, max_k)
    return RetrievalServingModule(embedder, rows, ids, max_pixels=max_pixels, max_k=max_k, dtype=dtype)


def saved_model_bytes(module):
    """About what the SavedModel's variables take on disk: the embedder's weights, and a
    `RetrievalServingModule`'s gallery and ids."""
    total = variables_bytes(module.model_variables)
    if isinstance(module, RetrievalServingModule):
        total += variables_bytes([module.gallery])
        total += int(tf.reduce_sum(tf.strings.length(module.ids)).numpy()) + 8 * module.ids.shape[0]
    return total
