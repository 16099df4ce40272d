"""User-facing error types. Every message says what was wrong and what is accepted."""


class SalmonnError(Exception):
    """Base class: the message is meant to be shown to the user as is."""


class AudioError(SalmonnError):
    """The audio could not be read or used."""


class PromptError(SalmonnError):
    """The prompt is not usable (empty, too long, bad placeholder)."""


class CheckpointError(SalmonnError):
    """A checkpoint or weight file is missing, unsafe or does not match the model."""


class ConfigError(SalmonnError):
    """A config file or path is wrong."""


class SettingsError(SalmonnError):
    """A decoding setting is out of its accepted range."""


class OutOfMemory(SalmonnError):
    """The model ran out of (GPU) memory on this request; the next request can still work."""


class Busy(SalmonnError):
    """No room for the request now (the model's line or the shared batch is full): try again shortly."""

