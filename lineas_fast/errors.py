"""The one deliberate error type of the library.

Every check that rejects user input raises :class:`SteeringError` *before* anything is changed
(model, artifact, handle), with a message naming the offending site or argument.
"""


class SteeringError(ValueError):
    """Bad input to lineas_fast: wrong site, wrong model for an artifact, bad shapes, corrupt files..."""
