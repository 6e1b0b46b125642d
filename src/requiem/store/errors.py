"""Errors of the store layer: reaching the database, migrating it, its pool.

database_unreachable       Unavailable   503 / 6
database_auth_failed       Unavailable   503 / 6
pool_draining              Unavailable   503 / 6
sqlite_in_production       ConfigError   400 / 2
default_secret_in_production ConfigError 400 / 2
unknown_revision           InvalidInput  400 / 2
rollback_out_of_range      InvalidInput  400 / 2
migration_locked           Conflict      409 / 8
migration_lock_holder_alive Conflict     409 / 8
migration_checksum_mismatch Conflict     409 / 8
revision_not_failed        Conflict      409 / 8
database_revision_unknown  Conflict      409 / 8
migration_failed           Unprocessable 422 / 5
"""

from __future__ import annotations

from requiem.errors import (
    ConfigError,
    Conflict,
    InvalidInput,
    Unavailable,
    Unprocessable,
)


class DatabaseUnreachable(Unavailable):
    code = "database_unreachable"


class DatabaseAuthFailed(Unavailable):
    code = "database_auth_failed"


class PoolDraining(Unavailable):
    code = "pool_draining"


class SqliteInProduction(ConfigError):
    code = "sqlite_in_production"


class DefaultSecretInProduction(ConfigError):
    code = "default_secret_in_production"


class UnknownRevision(InvalidInput):
    code = "unknown_revision"


class RollbackOutOfRange(InvalidInput):
    code = "rollback_out_of_range"


class MigrationLocked(Conflict):
    code = "migration_locked"


class LockHolderAlive(Conflict):
    code = "migration_lock_holder_alive"


class ChecksumMismatch(Conflict):
    code = "migration_checksum_mismatch"


class RevisionNotFailed(Conflict):
    code = "revision_not_failed"


class SchemaNotCurrent(Conflict):
    code = "schema_not_current"


class DatabaseRevisionUnknown(Conflict):
    code = "database_revision_unknown"


class MigrationFailed(Unprocessable):
    code = "migration_failed"
