"""Benchmark: the cost of rendering one reply's Markdown, in this process (no server).

A 6,000-character reply with three fenced code blocks (Python, JavaScript, SQL), prose,
a list and some math, rendered as a conversation page renders it (``render_markdown``, the
first time and again, from its cache) and as a streaming reply's text so far is rendered
(``render_streaming_markdown``, never cached). ``--before FILE`` also times another
version of ``chatapp/web/markdown.py`` (e.g. ``git show <rev>:chatapp/web/markdown.py``).

    python bench/reply_render.py [--number 200] [--before /tmp/old_markdown.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatapp.web import markdown  # noqa: E402

PROSE = (
    "This is a paragraph of **explanation** with `inline code`, a [link](https://example.com), "
    "some *emphasis* and $x^2 + y^2 = z^2$.\n"
)
CODE = {
    "python": "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n" * 4,
    "javascript": "function add(a, b) {\n  return a + b; // sum\n}\nconst x = [1, 2, 3].map((n) => n * 2);\n" * 4,
    "sql": "SELECT id, title FROM conversations WHERE owner_id = 1 ORDER BY updated_at DESC LIMIT 30;\n" * 4,
}


def sample_reply(length: int = 6000) -> str:
    parts = ["## Answer\n\n"]
    for language, code in CODE.items():
        parts += [PROSE * 3, f"\n```{language}\n{code}```\n\n", "- one\n- two\n- three\n\n"]
    text = "".join(parts)
    while len(text) < length:
        text += PROSE
    return text[:length]


def per_call_ms(function, text: str, number: int) -> float:
    function(text)
    return min(timeit.repeat(lambda: function(text), number=number, repeat=3)) / number * 1000


def first_time(text: str) -> str:
    """A reply never rendered before: no cached page, code block or formula helps."""
    markdown._render_cached.cache_clear()
    markdown._highlighted.cache_clear()
    markdown._math.cache_clear()
    return markdown.render_markdown(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200)
    parser.add_argument("--before", help="another markdown.py to time alongside")
    args = parser.parse_args()
    text = sample_reply()
    print(f"reply: {len(text)} characters, {text.count('```') // 2} code blocks; nproc {os.cpu_count()}")
    print(f"load average: {os.getloadavg()}")
    rows = []
    if args.before:
        spec = importlib.util.spec_from_file_location("markdown_before", args.before)
        assert spec and spec.loader
        before = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(before)
        rows.append(("before: render_markdown", before.render_markdown))
    rows += [
        ("render_markdown, first time (no cache)", first_time),
        ("render_markdown, seen before (cached)", markdown.render_markdown),
        ("render_streaming_markdown (text so far)", markdown.render_streaming_markdown),
    ]
    for name, function in rows:
        print(f"{name:45} {per_call_ms(function, text, args.number):8.2f} ms")
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
