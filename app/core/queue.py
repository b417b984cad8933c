"""The Celery application, configured from Settings. The API only sends task names and ids through it."""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import Celery

from app.core.config import Settings, get_settings

log = logging.getLogger(__name__)

QUEUE = "qaas"
INSPECT_MODEL = "qaas.inspect_model"
INSPECT_DATASET = "qaas.inspect_dataset"
RUN_JOB = "qaas.run_job"


def _use_fast_sqlite_polling(interval_s: float) -> None:
    # kombu's SQLAlchemy transport polls once a second, and broker_transport_options go to create_engine (a
    # worker crash), so the class attribute is the only knob (docs/engine-notes.md#the-embedded-broker).
    from kombu.transport import sqlalchemy as sqla_transport

    sqla_transport.Transport.polling_interval = interval_s


def make_celery(settings: Settings) -> Celery:
    broker_url = settings.resolved_broker_url
    celery = Celery("qaas", broker=broker_url, set_as_current=False)
    transport_options: dict[str, object] = {}
    if broker_url.startswith("sqla+"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        _use_fast_sqlite_polling(settings.broker_polling_interval_s)
    elif broker_url.startswith(("redis://", "rediss://")):
        transport_options = {
            "visibility_timeout": settings.broker_visibility_timeout_s,
            "socket_connect_timeout": settings.readiness_timeout_s,
            "socket_timeout": 30,
        }
    # A job's hard limit stays below the visibility timeout, or Redis would hand a running job to a second worker.
    hard_limit = min(settings.job_timeout_s + 300, settings.broker_visibility_timeout_s - 60)
    celery.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        task_time_limit=hard_limit,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.readiness_timeout_s,
        # The API must answer 503 quickly when the broker is down, not retry for a minute.
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return celery


@lru_cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def enqueue(task_name: str, object_id: str) -> None:
    """Send one id to the workers. Raises kombu/redis errors when the broker is down."""
    get_celery().send_task(task_name, args=[object_id], queue=QUEUE)


def check_broker(timeout_s: float) -> None:
    """Open a broker connection or raise; used by /readyz and before work is accepted."""
    with get_celery().connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout_s)


def prune_embedded_broker(settings: Settings, older_than_s: float = 3600.0) -> int:
    """Delete the embedded broker's delivered messages; returns how many. kombu's SQLAlchemy transport only
    marks a delivered message invisible (and stamps it with the local time), so its table would grow forever.
    Nothing to do on Redis."""
    url = settings.resolved_broker_url
    if not url.startswith("sqla+"):
        return 0
    import datetime

    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(url.removeprefix("sqla+"))
    try:
        if not inspect(engine).has_table("kombu_message"):
            return 0
        before = datetime.datetime.now() - datetime.timedelta(seconds=older_than_s)
        with engine.begin() as conn:
            result = conn.execute(
                text("DELETE FROM kombu_message WHERE visible = 0 AND timestamp < :before"),
                {"before": before},
            )
        return int(result.rowcount or 0)
    finally:
        engine.dispose()
