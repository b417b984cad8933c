"""The worker's Celery application: the one from app.core.queue, with the tasks registered."""

from __future__ import annotations

from app.core.queue import get_celery

celery = get_celery()

import workers.tasks  # noqa: E402,F401  (registers the tasks on `celery`)
