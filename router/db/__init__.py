"""The node's database: models, engines, migrations and the repository (DESIGN §5).

Everything outside ``router/db`` goes through ``Repository`` and the functions
re-exported here; only this package runs SQL.
"""

from router.db.engine import make_engine, make_session_factory, sqlite_url_for
from router.db.migrate import (
    SchemaError,
    SchemaMissing,
    SchemaOutOfDate,
    check_schema,
    current_revision,
    head_revision,
    upgrade,
)
from router.db.models import InstanceState, JobState
from router.db.repository import (
    AlreadyExists,
    Destination,
    Instance,
    InstanceResult,
    InUse,
    InvalidValue,
    NewInstance,
    NotFound,
    Repository,
    RepositoryError,
    Source,
    TlsOptions,
)

__all__ = [
    "AlreadyExists",
    "Destination",
    "InUse",
    "Instance",
    "InstanceResult",
    "InstanceState",
    "InvalidValue",
    "JobState",
    "NewInstance",
    "NotFound",
    "Repository",
    "RepositoryError",
    "SchemaError",
    "SchemaMissing",
    "SchemaOutOfDate",
    "Source",
    "TlsOptions",
    "check_schema",
    "current_revision",
    "head_revision",
    "make_engine",
    "make_session_factory",
    "sqlite_url_for",
    "upgrade",
]
