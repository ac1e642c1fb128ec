"""The deliberate error types of the library.

Every check that rejects user input raises :class:`SteeringError` *before* anything is changed
(model, artifact, handle), with a message naming the offending site or argument. Two subclasses say
which kind of input was bad; catching :class:`SteeringError` (or ``ValueError``) still catches them.
"""


class SteeringError(ValueError):
    """Bad input to lineas_fast: wrong site, wrong model for an artifact, bad shapes, corrupt files..."""


class ArtifactError(SteeringError):
    """A steering file that cannot be loaded: not safetensors, truncated or garbled, a header whose
    offsets do not fit the file, tensors of another dtype or shape than its metadata says, missing or
    unknown tensors or metadata keys, metadata of the wrong JSON types, an unknown format version, or
    non-finite values. The message names the file and what is wrong with it."""


class SiteError(SteeringError):
    """A site specification that cannot be resolved on a model: unknown module, bad ``":k"``/``":in"``
    suffix, a preset the architecture does not have, or a site whose output cannot be steered."""
