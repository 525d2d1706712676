"""The errors a user can act on. The CLI prints their message, without a traceback, and exits 1."""


class SaedynamicsError(Exception):
    """Base class: anything raised with this type carries a message meant for the user."""


class ConfigError(SaedynamicsError):
    """The study configuration is invalid (names the key and the allowed values)."""


class DataError(SaedynamicsError):
    """An input file is missing, unreadable or inconsistent (names the file)."""


class ResourceError(SaedynamicsError):
    """Not enough disk space or GPU memory for a job (names the amounts and the config keys to lower)."""


class TrainingDiverged(SaedynamicsError):
    """A loss became NaN or infinite (names the seed and the step)."""
