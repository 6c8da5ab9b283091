"""Exception types. Every error the library raises on bad input names the
offending key/value/file and the fix; callers can catch these by type."""


class MetastoneError(Exception):
    """Base class of every error raised deliberately by metastone-lab."""


class ConfigError(MetastoneError, ValueError):
    """A config, spec or parameter is unknown, of the wrong type or out of range."""


class UnknownNameError(ConfigError, KeyError):
    """A registry lookup (segmenter, aggregator, selector, loss, task, ...) failed."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class TokenizerError(MetastoneError, ValueError):
    """The tokenizer cannot support the requested step segmentation."""


class ShapeError(MetastoneError, ValueError):
    """Tensor shapes or model widths do not match."""


class CheckpointError(MetastoneError, ValueError):
    """A checkpoint or head file is missing, corrupt, unsafe or incompatible."""


class DataError(MetastoneError, ValueError):
    """A data file or row is malformed."""


class NumericsError(MetastoneError, FloatingPointError):
    """NaN/inf found in features, logits or scores."""


class TrackingError(MetastoneError, RuntimeError):
    """The MLflow tracking store cannot be reached or written."""


class StorageError(MetastoneError, OSError):
    """A write failed because the disk is full (or over quota); what was there before
    is kept."""
