"""One error per way an artefact of a model_dir or an export directory can be wrong.

Every one is a `pnpp_tf.errors.UserError` (so a `ValueError`): the user can fix it, and the entry
points print its one-line message. Catch `ArtifactError` for all of them.
"""

from pnpp_tf.errors import UserError


class ArtifactError(UserError):
    """A model_dir or export-directory artefact that cannot be used; the base of those below."""


class MissingArtifactError(ArtifactError):
    """The file or directory is not there (never written, deleted, or a wrong path)."""


class CorruptArtifactError(ArtifactError):
    """The file is there but not whole or not of its format: cut short, not a zip, not JSON, or
    JSON whose structure is not the one pnpp_tf writes."""


class UnloadableArtifactError(ArtifactError):
    """The file is whole, but its loader (Keras, TensorFlow) failed; `__cause__` is the loader's
    own error, kept for the traceback of whoever needs more than the one line."""


class SignatureError(ArtifactError):
    """The model loaded, but does not take or return what pnpp_tf needs: a batch of square RGB
    images in, an embedding out."""


class ForeignArtifactError(ArtifactError):
    """The artefact contradicts the others it sits with: a results.json from another run."""
