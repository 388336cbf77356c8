"""Replies on a job queue: Celery on Redis, when REPLY_QUEUE names the broker.

Web processes only enqueue reply ids (``QueueReplyRunner``); replies run in Celery
worker processes (``celery --app chatapp.jobs worker --pool threads``), each of which
runs the reply with the same lease keeper as the in-process runner
(``WorkerReplyRunner``), so a stop, a delete or a take-over elsewhere reaches the run
within REPLY_STOP_CHECK_SECONDS, and its sweep finds orphaned replies.

Delivery: tasks are acknowledged after they ran (``acks_late``) and given back when
their worker process dies (``reject_on_worker_lost``); Redis hands an unacknowledged
task out again after REPLY_QUEUE_VISIBILITY_TIMEOUT. The lease claim decides who runs a
reply, so a task delivered twice (redelivered, or enqueued again by a sweep) runs it
once: the second delivery finds the lease taken or the reply finished, and does nothing.

Lost enqueues: Redis keeps nothing on disk here, and a publish can fail after the commit.
The sweep, in the Celery workers only (web processes run no replies, so none of their
own can be orphaned), finds a committed reply no process claimed within
REPLY_LEASE_SECONDS, or whose lease expired, and enqueues it again; a Redis marker lets
one sweep enqueue each orphan at most once per REPLY_LEASE_SECONDS across all workers.

Titles: in queue mode a title job is a Celery task too (``TITLE_TASK_NAME``, the
conversation's id only), which the reply that completed enqueues from its worker and the
reply workers run; nothing runs in web processes. Its work is the same short read, bot
call and conditional write as the in-process title threads' (chatapp.chat.titles), so a
task delivered twice stores one title.

Redis down at a POST: ``reserve`` pings the broker (short timeouts) before the view
commits, so the view answers 503 and writes nothing; a publish that fails after the
commit is logged and left to the sweep.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import redis
from celery import Celery, Task
from flask import Flask
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from chatapp.chat import leases, titles
from chatapp.chat.pipeline import generate_reply
from chatapp.chat.runner import Cancellation, Reservation, ThreadPoolReplyRunner
from chatapp.db import unit_of_work
from chatapp.errors import ServiceBusy
from chatapp.ops.metrics import QUEUE_JOBS, QUEUE_WAIT_SECONDS, job

log = logging.getLogger(__name__)
CELERY_KEY = "celery"
WORKER_RUNNER_KEY = "chatapp.queue_worker_runner"
TASK_NAME = "chatapp.generate_reply"
TITLE_TASK_NAME = "chatapp.generate_title"
_ENQUEUED_MARK = "chatapp:reply-enqueued:"
# What generate_reply's result means for the queue's job outcome counter.
_OUTCOMES = {"skipped": "duplicate"}


def queue_mode(app: Flask) -> bool:
    return bool(app.config.get("REPLY_QUEUE"))


def celery_init_app(app: Flask) -> Celery:
    """The Celery app for this Flask app (Flask's documented pattern), with the reply task."""
    config = app.config
    timeout = float(config["REPLY_QUEUE_TIMEOUT"])
    visibility = float(config["REPLY_QUEUE_VISIBILITY_TIMEOUT"])
    celery = Celery(app.name, set_as_current=False)
    celery.conf.update(
        broker_url=config["REPLY_QUEUE"],
        task_default_queue=config["REPLY_QUEUE_NAME"],
        task_ignore_result=True,
        # Acknowledged once the reply ran; a worker that dies gives its tasks back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Each worker thread takes one task at a time: no task waits behind a long reply
        # in a process that already has all its threads busy.
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": visibility,
            # How often a worker looks for jobs whose worker died (one sorted-set read):
            # kombu's default is every 100 s, whatever the visibility timeout.
            "unacked_restore_interval": int(max(1, min(10, visibility // 4))),
            "unacked_restore_throttle": 1,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
        },
        broker_connection_timeout=timeout,
        broker_connection_retry_on_startup=True,
        # A worker waits for Redis as long as it takes (retrying every 2 to 30 s, logged),
        # at start-up and after losing it, instead of exiting after 100 tries (about 50
        # minutes) into a restart loop. Nothing is lost meanwhile: posts are refused (503),
        # and what Redis lost the sweep enqueues again from the database.
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
    )

    @celery.task(name=TASK_NAME, bind=True)
    def run_reply(task: Task, reply_id: int, enqueued_at: float) -> str:
        """Run one reply here; only its id (and when it was enqueued) crosses the queue."""
        QUEUE_WAIT_SECONDS.observe(max(0.0, time.time() - float(enqueued_at)))
        if (task.request.delivery_info or {}).get("redelivered"):
            QUEUE_JOBS.labels("redelivered").inc()
        outcome = get_worker_runner(app).run(int(reply_id))
        QUEUE_JOBS.labels(_OUTCOMES.get(outcome, outcome)).inc()
        return outcome

    @celery.task(name=TITLE_TASK_NAME)
    def make_title(conversation_id: int) -> str:
        """Title one conversation here; only its id crosses the queue."""
        return titles.generate_title(app, int(conversation_id))

    app.extensions[CELERY_KEY] = celery
    return celery


class QueueTitleJobs:
    """Title jobs as Celery tasks, run by the reply workers; nothing waits in this process."""

    def __init__(self, app: Flask):
        self.app = app

    def submit(self, conversation_id: int) -> bool:
        """Enqueue a title job; False if Redis refused it (the conversation keeps its title)."""
        try:
            self.app.extensions[CELERY_KEY].send_task(TITLE_TASK_NAME, args=[int(conversation_id)], retry=False)
        except Exception as error:  # a title is a nicety: never fail the reply over it
            log.warning("conversation %s: no title job enqueued (%s)", conversation_id, error)
            return False
        return True

    def wait_idle(self, timeout: float | None = None) -> bool:
        return True

    def shutdown(self, grace: float) -> None:
        """Nothing runs here: queued titles stay in Redis for the workers."""


class QueueReplyRunner:
    """The web side of queue mode: enqueues reply ids; runs nothing in this process."""

    def __init__(self, app: Flask):
        self.app = app
        self.celery = celery_init_app(app)
        timeout = float(app.config["REPLY_QUEUE_TIMEOUT"])
        self.redis = redis.Redis.from_url(
            app.config["REPLY_QUEUE"], socket_timeout=timeout, socket_connect_timeout=timeout
        )

    def reserve(self) -> Reservation:
        """Always room, as long as Redis answers: else 503 before anything is committed."""
        try:
            self.redis.ping()
        except redis.RedisError as error:
            log.error("the reply queue (Redis) is unreachable (%s): answering 503", error)
            raise ServiceBusy(
                "replies cannot be queued right now; nothing was saved, retry in a moment",
                code="replies_unavailable",
            ) from None
        return Reservation()

    def enqueue(self, reply_id: int) -> bool:
        try:
            self.celery.send_task(TASK_NAME, args=[int(reply_id), time.time()], retry=False)
        except Exception as error:  # kombu's and redis's errors both: never fail the view
            log.error(
                "could not enqueue reply %s (%s); the sweep enqueues it again once Redis answers", reply_id, error
            )
            return False
        return True

    def submit(self, reply_id: int, reservation: Reservation | None = None) -> None:
        if reservation is not None:
            reservation.release()
        self.enqueue(reply_id)

    def adopt(self, reply_ids: list[int]) -> list[int]:
        """Enqueue orphans a sweep found, each at most once per lease period (all workers)."""
        mark_seconds = max(1, math.ceil(float(self.app.config["REPLY_LEASE_SECONDS"])))
        taken = []
        for reply_id in reply_ids:
            try:
                fresh = self.redis.set(f"{_ENQUEUED_MARK}{reply_id}", 1, nx=True, ex=mark_seconds)
            except redis.RedisError as error:
                # Redis is down: the replies stay in the database; the next sweep tries again.
                log.warning("the sweep cannot reach the reply queue (%s); retrying at its next pass", error)
                break
            if fresh and self.enqueue(reply_id):
                taken.append(reply_id)
        return taken

    def busy_with(self) -> set[int]:
        return set()  # the replies running in workers hold live leases: no sweep finds them

    def running(self) -> list[int]:
        return []

    def cancel(self, reply_id: int, reason: str = "stopped") -> None:
        """Nothing to do here: the worker's keeper sees the stop in the database."""

    def shutdown(self, grace: float) -> None:
        """Nothing runs here to hand over."""

    def wait_idle(self, timeout: float | None = None) -> bool:
        return True

    def depth(self) -> int | None:
        """Tasks waiting in Redis (the queue's list), or None if Redis does not answer."""
        try:
            return int(self.redis.llen(self.app.config["REPLY_QUEUE_NAME"]))  # type: ignore[arg-type]
        except redis.RedisError:
            return None

    def metrics_text(self) -> bytes:
        """Queue depth, sampled at scrape time (one LLEN), in Prometheus text format."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_DepthCollector(self.depth()))
        return generate_latest(registry)


class _DepthCollector:
    def __init__(self, depth: int | None):
        self._depth = depth

    def collect(self):
        up = GaugeMetricFamily("chatapp_reply_queue_up", "Whether the reply queue's Redis answered the scrape.")
        up.add_metric([], 0 if self._depth is None else 1)
        yield up
        if self._depth is not None:
            depth = GaugeMetricFamily("chatapp_reply_queue_depth", "Jobs (replies, titles) waiting for a worker.")
            depth.add_metric([], self._depth)
            yield depth


class WorkerReplyRunner(ThreadPoolReplyRunner):
    """The Celery worker's side: runs a delivered reply on the task's own thread, under the
    same lease keeper as the in-process runner."""

    def run(self, reply_id: int) -> str:
        with self._lock:
            self._state()
            live = self.live.start(reply_id)
            self._queued += 1
            cancel = Cancellation()
            self._runs.setdefault(reply_id, []).append(cancel)
            self._ensure_keeper()
        outcome = "crashed"
        try:
            outcome = generate_reply(self.app, reply_id, owner=self.owner, cancel=cancel, live=live)
        finally:
            self._done(reply_id, cancel, live)
        if outcome == "handed_over":
            # Released before the task returns: Celery's warm shutdown ends the process as
            # soon as its tasks have, which may be before shutdown() gets to release them.
            try:
                with job("lease"), unit_of_work(self.app):
                    leases.release(self.owner, [reply_id])
            except Exception:
                log.warning("could not release reply %s; its lease expires in REPLY_LEASE_SECONDS", reply_id)
        return outcome


_worker_runner_lock = threading.Lock()


def get_worker_runner(app: Flask) -> WorkerReplyRunner:
    with _worker_runner_lock:
        runner = app.extensions.get(WORKER_RUNNER_KEY)
        if runner is None:
            runner = app.extensions[WORKER_RUNNER_KEY] = WorkerReplyRunner(
                app, app.config["REPLY_WORKERS"], app.config["REPLY_QUEUE_MAX"]
            )
        return runner
