"""qmpc's exception types. Every error raised at a public boundary is one of these."""

from __future__ import annotations


class QmpcError(Exception):
    """Base class of every error qmpc raises on purpose."""


class InputError(QmpcError, ValueError):
    """A public function got an argument of the wrong shape, dtype or value (NaN, Inf, lb > ub…)."""


class UnsupportedLayerError(QmpcError, TypeError):
    """A torch module has no exact CasADi twin (an unknown layer or a non-smooth activation)."""


class SolverError(QmpcError, RuntimeError):
    """A solve failed and the caller asked to raise instead of masking the sample."""


class ConfigError(QmpcError, ValueError):
    """A configuration has an unknown key, a value of the wrong type, or an impossible value."""


class OutputError(QmpcError, OSError):
    """An output path (run directory, dataset, plot or video) is in the way, read-only, or locked."""


class MujocoWarning(UserWarning):
    """A warning of MuJoCo's (a deprecated model attribute, an unstable simulation), shown once per message.

    qmpc routes MuJoCo's warnings here when it makes an environment and no other handler is installed, so
    that ``warnings.filterwarnings("ignore", category=MujocoWarning)`` silences them and a run that makes
    many environments prints each message once instead of at every ``gymnasium.make``.
    """
