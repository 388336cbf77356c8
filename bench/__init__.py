"""Benchmarks: throughput, replies with a slow bot, memory, the pressure scenario, CPU per
request and recovery after a crash, each a script; see bench/README.md.

The scripts share: lifecycle.py (cleanup on exit, the work directory), databases.py (the
database of a run, seeding it), apps.py (gunicorn serving the compared apps), load.py (the
throughput load generator), metrics.py (what is sampled while a benchmark runs) and
report.py (the machine report, tables). What the tests use too (gunicorn servers, throwaway
PostgreSQL databases, the SSE reader, the pressure scenario) is in tests/support/.
"""
