"""Typed errors. Every user-facing failure in roicache is a :class:`RoicacheError`.

The command-line front ends print ``str(error)`` as one line and exit with status 2, so the
message must say what is wrong *and* how to fix it.
"""

from __future__ import annotations


class RoicacheError(Exception):
    """Base class of every error a user can cause (bad input, bad files, bad settings)."""


class ConfigError(RoicacheError):
    """A setting, a config file key or a command-line value is invalid."""


class DatasetError(RoicacheError):
    """An annotation file or image directory is missing or malformed."""


class CheckpointError(RoicacheError):
    """A detector or head checkpoint is missing, corrupt, or not what was expected."""


class SchemaError(RoicacheError):
    """A store's metadata or arrays do not follow the cache contract."""


class StoreIncompleteError(SchemaError):
    """A store (or a split of it) has images whose extraction has not finished."""


class StoreNotFoundError(SchemaError):
    """No roicache store exists at the location given."""


class StoreUninitializedError(SchemaError):
    """A store's creation is still running or was interrupted (no image can have been written)."""


class StoreMismatchError(SchemaError):
    """A store was built from another detector checkpoint or annotation file than the one given."""


class ChunkError(SchemaError):
    """A chunk file of a store is missing or cannot be decoded."""


class StoreExistsError(RoicacheError):
    """A new store was asked for where a store (or other data) already exists."""
