"""Database engine and sessions. Built on first use from Settings, never at import time.

Transactions: one per use case, committed in one place.

- A route never commits nor rolls back. The service function it calls for a change (`create_job`,
  `cancel_job`, `delete_model`, `delete_dataset`, `stored.save_upload`) is the use case: it ends with the
  one `session.commit()`; an error before that leaves nothing committed (the request's session is closed, which
  rolls back). The helpers a use case calls only `flush()`.
- Workers, the reaper, the gate's key check and the commands open `session_scope()`: the block is the use
  case, committed when it ends, rolled back on an error; the service functions called inside only flush.
- What must wait for the data (enqueueing a job or an inspection, deleting stored files) is registered with
  `after_commit`: it runs once the transaction commits, and a rollback drops it.

Where the commit falls matters: a job's row is committed before its id is queued (a worker reads the row);
an upload's row only after its file is stored and the quotas were checked again under the tenant's lock (a
refusal or a failing commit deletes the file, so no row names a missing file).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from app.core.config import get_settings

log = logging.getLogger(__name__)


class Base(DeclarativeBase):
    pass


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # The API, the worker and the runner's parent share the file: WAL lets readers run beside a writer and
        # the busy timeout makes a writer wait instead of failing with "database is locked".
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    # Pre-ping replaces connections a database restart killed; the connect timeout turns a database that
    # stopped answering into a 503 within seconds instead of a request that hangs.
    connect_args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10, connect_args=connect_args)


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    if settings.resolved_database_url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return make_engine(settings.resolved_database_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


def after_commit(session: Session, action: Callable[[], None]) -> None:
    """Run `action` once the session's transaction commits; a rollback drops it (jobs are enqueued this way)."""
    session.info.setdefault("after_commit", []).append(action)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    # The data is committed: a failing action (the broker went away since the readiness check) must not turn
    # the answer into an error. Its object stays queued or inspecting and is logged.
    actions = session.info.pop("after_commit", [])
    for action in actions:
        try:
            action()
        except Exception:
            log.exception("an after-commit action failed")


@event.listens_for(Session, "after_soft_rollback")
def _drop_after_commit(session: Session, _previous_transaction: object) -> None:
    session.info.pop("after_commit", None)


@contextmanager
def session_scope() -> Iterator[Session]:
    """One transaction per use case: commit on success, roll back on error."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
