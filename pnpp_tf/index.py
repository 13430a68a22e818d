"""Embeds every image under a folder with a trained model and saves a search index.

    python -m pnpp_tf.index --model=runs/demo --images=~/Pictures --index=pictures.npz

--model is a training run's model_dir (embedder.keras) or an exported SavedModel (a version
directory, or the export base directory, whose highest version is used). Images are found
recursively (JPEG, PNG, BMP, GIF, WebP; symbolic links followed, loops of them passed over) and
cropped as evaluation crops them. A file that cannot be read or decoded (a dangling link or a loop
of links too), or whose header gives more than --max_pixels pixels, is skipped, reported and
listed in the index. Search it with python -m pnpp_tf.search.
"""

import os
import time

from pnpp_tf import flags
from pnpp_tf.config import IndexConfig
from pnpp_tf.data.image_header import DEFAULT_MAX_PIXELS
from pnpp_tf.errors import UserError
from pnpp_tf.io_utils import check_writable_file
from pnpp_tf.retrieval.embed import find_images
from pnpp_tf.artifacts import load_embedder
from pnpp_tf.retrieval.search_index import build_index

_SHOWN_SKIPPED = 10
_KINDS = {"keras": "Keras model", "saved_model": "SavedModel"}


def run(model, images, index_path, batch_size=64, progress=True, max_pixels=DEFAULT_MAX_PIXELS):
    """Builds and writes the index; returns it.

    Raises:
        UserError: a missing or unreadable input, or an index that cannot be written.
    """
    if not model or not images or not index_path:
        raise UserError("--model, --images and --index are all required.")
    model, images, index_path = (os.path.expanduser(p) for p in (model, images, index_path))
    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {batch_size}.")
    if max_pixels < 1:
        raise UserError(f"--max_pixels must be at least 1, got {max_pixels}.")
    if os.path.isdir(index_path):
        raise UserError(f"--index={index_path} is a directory; give a file name, e.g. photos.npz.")
    check_writable_file(index_path, "--index")  # before the images are embedded, not after
    paths = find_images(images)
    embedder = load_embedder(model)
    index = build_index(embedder, paths, images, batch_size, verbose=int(progress), max_pixels=max_pixels)
    try:
        index.save(index_path)
    except OSError as error:
        raise UserError(f"cannot write --index={index_path}: {error}") from error
    return index


def main(config):
    start = time.perf_counter()
    index = run(config.model, config.images, config.index, config.batch_size, config.progress, config.max_pixels)
    meta = index.metadata
    print(f"Indexed {meta['num_images']} images under {config.images} into {config.index} in "
          f"{time.perf_counter() - start:.1f} s ({meta['images_per_second']:.1f} images/s embedded): "
          f"{meta['embedding_dim']}-d embeddings of "
          f"{meta['image_size']} px crops, {_KINDS.get(meta['model_kind'], 'model')} "
          f"{meta['model']}.")
    skipped = meta["skipped"]
    print(f"Skipped {len(skipped)} unreadable file(s){':' if skipped else '.'}")
    for path, reason in skipped[:_SHOWN_SKIPPED]:
        print(f"  {path}  ({reason})")
    if len(skipped) > _SHOWN_SKIPPED:
        print(f"  ... and {len(skipped) - _SHOWN_SKIPPED} more, listed in the index's metadata.")


if __name__ == "__main__":
    flags.run(main, IndexConfig, "pnpp_tf.index")
