"""Markdown for assistant replies: rendered without raw HTML, then sanitized."""

from __future__ import annotations

import nh3
from markdown_it import MarkdownIt
from markupsafe import Markup

# html=False: HTML written in a reply is shown as text, never parsed. linkify stays
# off, so only links the reply writes as Markdown become links.
_markdown = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])

# The sanitizer is the second wall: whatever the renderer emits, only these survive.
# No class or style attributes, so a reply cannot borrow the page's own styling.
_cleaner = nh3.Cleaner(
    tags={
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "p",
        "br",
        "hr",
        "blockquote",
        "ul",
        "ol",
        "li",
        "pre",
        "code",
        "em",
        "strong",
        "s",
        "a",
        "table",
        "thead",
        "tbody",
        "tr",
        "th",
        "td",
    },
    attributes={"a": {"href", "title"}, "ol": {"start"}},
    link_rel="noopener nofollow",
    url_schemes={"http", "https", "mailto"},
)


def render_markdown(text: str) -> Markup:
    """Safe HTML for a reply's Markdown: headings, lists, code, links (rel="noopener nofollow")."""
    return Markup(_cleaner.clean(_markdown.render(text)))
