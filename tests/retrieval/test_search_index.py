"""An index file, or the embedder.keras an index is built with, that is not whole (or not what it
should be) is named in a one-line error."""

import re

import numpy as np
import pytest

from pnpp_tf.artifacts import load_embedder
from pnpp_tf.retrieval.search_index import SearchIndex
from pnpp_tf.modeling.model import build_embedder


def test_a_cut_short_index_is_named(tmp_path):
    path = tmp_path / "photos.npz"
    SearchIndex(np.eye(3, dtype=np.float32), ["a.jpg", "b.jpg", "c.jpg"], {"num_images": 3}).save(str(path))
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=rf"^--index={path} is not an index written by pnpp_tf.index "
                                         r"\(BadZipFile: .*\); if it was cut short, build it again"):
        SearchIndex.load(str(path))


def test_an_index_whose_metadata_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "photos.npz"
    np.savez(path, embeddings=np.eye(3, dtype=np.float32), paths=np.asarray(["a", "b", "c"]),
             metadata=np.asarray("[1]"))
    with pytest.raises(ValueError, match=rf"^--index={path} is not an index written by pnpp_tf.index "
                                         r"\(its metadata is a JSON list, not an object\)"):
        SearchIndex.load(str(path))


def test_a_cut_short_embedder_is_named_not_reported_as_missing(tmp_path):
    path = tmp_path / "run" / "embedder.keras"
    path.parent.mkdir()
    build_embedder("small_cnn", 32, 8, weights=None).save(str(path))
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} is not a whole .keras file "
                                         rf"\({len(whole) // 2} bytes\): it may have been cut short"):
        load_embedder(str(tmp_path / "run"))
