"""The artefacts of a training run and of an export: where each is, and reading it back.

One place owns the layout the other modules write and read, and every way an artefact can be
wrong is one error of `pnpp_tf.artifacts.errors` (each a `pnpp_tf.errors.UserError`):

- `pnpp_tf.artifacts.model_dir`: a training run's --model_dir: embedder.keras
  (`load_keras_model`), results.json with its "flags", "metrics" and "history" (`ModelDir`,
  `RunResults`), curves.png.
- `pnpp_tf.artifacts.export_dir`: an export directory: numbered SavedModel versions as TF Serving
  picks them, tflite/<version>/, onnx/<version>/, parity/<version>.json (`ExportDir`).
- `pnpp_tf.artifacts.embedder`: either loaded to embed images (`load_embedder` and its
  narrower `load_model_dir_embedder`, `load_keras_embedder`, `load_saved_model_embedder`),
  one input-size rule for all (`image_size_of`).
"""

from pnpp_tf.artifacts.embedder import (Embedder, image_size_of, load_embedder,
                                        load_keras_embedder, load_model_dir_embedder,
                                        load_saved_model_embedder)
from pnpp_tf.artifacts.errors import (ArtifactError, CorruptArtifactError, ForeignArtifactError,
                                      MissingArtifactError, SignatureError,
                                      UnloadableArtifactError)
from pnpp_tf.artifacts.export_dir import ExportDir, is_saved_model
from pnpp_tf.artifacts.model_dir import (CURVES_FILE, EMBEDDER_FILE, RESULTS_FILE, ModelDir,
                                         RunResults, load_keras_model)

__all__ = [
    "CURVES_FILE", "EMBEDDER_FILE", "RESULTS_FILE", "ArtifactError", "CorruptArtifactError",
    "Embedder", "ExportDir", "ForeignArtifactError", "MissingArtifactError", "ModelDir",
    "RunResults", "SignatureError", "UnloadableArtifactError", "image_size_of", "is_saved_model",
    "load_embedder", "load_keras_embedder", "load_keras_model", "load_model_dir_embedder",
    "load_saved_model_embedder",
]
