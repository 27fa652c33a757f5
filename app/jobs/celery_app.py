"""The Celery application shared by web processes (which send tasks) and ``convscope worker``
processes (which run them), built from ``Settings`` so both sides agree on every option.

A task carries only a job id: the job's record, images and results live in the shared data
directory (``CONVSCOPE_DATA_DIR``), so a redelivered task finds everything a first delivery
wrote, and results are idempotent by content address.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery import Celery

    from app.settings import Settings

QUEUE = "convscope"
TASK_NAME = "convscope.run_job"
SOCKET_TIMEOUT_S = 5.0


def make_celery(settings: "Settings") -> "Celery":
    from celery import Celery

    app = Celery("convscope", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        # A task is acknowledged when it ends, not when it starts: a worker killed mid-job
        # leaves it in Redis to be handed out again (visibility timeout, or sooner through
        # its expired claim; app.jobs.broker).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One task at a time per worker process: a GPU worker never hoards queued jobs that an
        # idle worker could run.
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,        # results are files in the data directory
        broker_transport_options={
            "visibility_timeout": settings.broker_visibility_timeout_s,
            "socket_timeout": SOCKET_TIMEOUT_S,
            "socket_connect_timeout": SOCKET_TIMEOUT_S,
        },
        # A web process answers 503 E_BROKER_UNAVAILABLE at once instead of retrying for
        # seconds while the user waits; workers keep reconnecting.
        task_publish_retry=False,
        broker_connection_timeout=SOCKET_TIMEOUT_S,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app
