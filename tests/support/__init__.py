"""Support code shared by the tests and the benchmarks (bench/).

- databases: PostgreSQL databases created for a run and dropped after it; migrating a database
  with the real CLI; reading what a server stored, straight from the database.
- pgbouncer: PgBouncer in transaction pooling mode in front of the test PostgreSQL server.
- servers: free loopback ports, and gunicorn serving an app with gunicorn.conf.py.
- sse: reading a reply's Server-Sent Events, from a body or a live stream.
- load: client threads looping a scenario against a server, every call recorded.
- pressure: the pressure scenario (concurrent posts and streams while GETs are timed).
- metrics: samples from a /metrics page.
- hosts: several hosts on one machine (network namespaces on a bridge, or loopback
  addresses), and HAProxy in front of them.
- multi_host: chatapp on those hosts (gunicorn app hosts, Celery reply-worker hosts, Redis,
  PgBouncer) and the faults injected into it.
- chats: the fake model those hosts talk to, and clients that post and stream through HAProxy.

Nothing here imports pytest: the benchmarks run without it.
"""
