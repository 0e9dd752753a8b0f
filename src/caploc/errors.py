"""User-facing errors: each carries a one-line message that names what to fix. The CLI prints it without a traceback."""


class CaplocError(ValueError):
    """Bad input or configuration; the message is one line and says what to change."""


class ArchitectureError(CaplocError):
    """The model's architecture is not in the layout registry (and no custom layout was given)."""


class DataError(CaplocError):
    """A dataset is empty, malformed, or does not fit the model (e.g. longer than the context)."""


class IncompatibleResultError(CaplocError):
    """A saved result (neuron set, scores, adapter) was made for a model with other dimensions."""
