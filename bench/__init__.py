"""Benchmarks of issue 5 item 8 and the issue-3 pressure figures; see bench/README.md."""
