"""Several hosts behind a real load balancer, with faults: nothing acknowledged is lost.

Two app hosts (gunicorn) and two reply-worker hosts (Celery), each in its own network
namespace (or on its own loopback address without root), behind HAProxy doing
round-robin, in queue mode with REPLY_EVENTS, on PostgreSQL (tests/support/multi_host.py).
200 chats post a message and stream its reply through HAProxy at once, so a stream often
lands on another host than its post. Meanwhile one reply worker is SIGKILLed mid-reply,
Redis is restarted empty, and one app host is restarted. Every acknowledged message must
be stored, every reply must end ``complete`` with exactly the model's text, both in the
database and as each client assembled it from its stream (resumed with Last-Event-ID).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections import Counter

import pytest

from tests.support import pgbouncer
from tests.support.chats import Chat, run_chat, sign_up
from tests.support.hosts import haproxy_binary
from tests.support.multi_host import Cluster, inject_faults, stored_messages

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("redis-server") is None, reason="needs redis-server (apt-get install redis-server)"
    ),
    pytest.mark.skipif(haproxy_binary() is None, reason="needs haproxy (apt-get install haproxy)"),
    pytest.mark.skipif(pgbouncer.binary() is None, reason="needs pgbouncer (apt-get install pgbouncer)"),
]
CHATS = 200
# Each reply streams for about 7 s: long enough for every fault to land mid-reply.
WORDS, DELAY = 24, 0.3


def listed_namespaces() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_chats_through_a_load_balancer_survive_a_killed_worker_a_redis_restart_and_an_app_restart(
    database_uri, tmp_path
):
    with Cluster(database_uri, tmp_path, words=WORDS, delay=DELAY) as cluster:
        token, conversation_ids = sign_up(cluster.url, CHATS)
        chats = [Chat(conversation_id, f"chat {n}") for n, conversation_id in enumerate(conversation_ids)]
        deadline = time.monotonic() + 240
        clients = [
            threading.Thread(target=run_chat, args=(cluster.url, token, chat, deadline), daemon=True) for chat in chats
        ]
        for client in clients:
            client.start()

        # A reply worker is SIGKILLed mid-reply (its whole process group); Redis restarts
        # empty (queued jobs and every subscription gone); an app host restarts (SIGTERM,
        # then started again) while streams are open on it.
        faults = inject_faults(cluster, chats)

        for client in clients:
            client.join(max(1.0, deadline - time.monotonic()))
        logs = cluster.logs()
        rows = stored_messages(database_uri)
        namespaces = [host.namespace for host in cluster.topology.hosts if host.namespace]

    if namespaces:  # the hosts were network namespaces (as root): deleted with the cluster
        assert not set(namespaces) & set(listed_namespaces())

    unfinished = [chat for chat in chats if chat.status is None]
    assert not unfinished, (unfinished[:3], logs)
    # Zero lost acknowledged messages: each chat's message stored once, with its reply.
    assert all(chat.acknowledged for chat in chats)
    users = Counter((conversation, content) for conversation, role, content, *_ in rows if role == "user")
    assert all(users[(chat.conversation_id, chat.content)] == 1 for chat in chats), users
    replies = {row[5]: row for row in rows if row[1] == "assistant"}
    for chat in chats:
        expected = cluster.model.expected(chat.content)
        _conversation, _role, content, status, *_ = replies[chat.reply_id]
        assert (content, status) == (expected, "complete"), (chat, logs)
        # No chunk repeated or missing in what the client assembled from its stream(s).
        assert (chat.text, chat.status) == (expected, "complete"), chat

    # The killed worker's replies ran again elsewhere, from the start: their streams were reset.
    assert faults.interrupted and all(replies[reply_id][4] >= 2 for reply_id in faults.interrupted)
    by_reply = {chat.reply_id: chat for chat in chats}
    started = [by_reply[i] for i in faults.interrupted if (by_reply[i].first_text_at or 0) < faults.killed_at]
    assert started and all(chat.resets >= 1 for chat in started)
    # Streams broken by the app host's restart resumed (with Last-Event-ID) through HAProxy.
    resumed = [chat for chat in chats if chat.connections > 1]
    assert resumed, "no stream was interrupted"
    # Round-robin: streams landed on another host than their post (about half would by chance).
    elsewhere = [chat for chat in chats if any(host != chat.post_host for host in chat.stream_hosts)]
    assert len(elsewhere) >= CHATS // 4, Counter((chat.post_host, tuple(chat.stream_hosts)) for chat in chats)
