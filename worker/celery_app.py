"""The workers' Celery application (``worker.celery_app:app``): the contract's app with the tasks included.

Its configuration (Redis broker and result backend, two queues, at-least-once delivery) is
:func:`contract.tasks.make_celery`, the same the API sends with.
"""

from __future__ import annotations

from contract.settings import get_settings
from contract.tasks import make_celery

app = make_celery(get_settings(), include=["worker.tasks", "worker.pipeline_tasks"])
