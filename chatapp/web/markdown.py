"""Markdown for assistant replies: rendered without raw HTML, then sanitized.

Replies render code (highlighted on the server by Pygments, with its language above it),
math (``$...$`` and ``$$...$$`` as MathML, by latex2mathml), tables, lists, links and
headings; single line breaks are kept. Everything is made here, on the server, and nothing
is loaded from another site: the page needs no script or font for any of it, and the
Content-Security-Policy stays as strict as it is.

A reply being written renders through the same code (``render_streaming_markdown``), so it
looks the same while it streams as when it has finished.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import nh3
from latex2mathml.converter import convert as latex_to_mathml
from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml, unescapeAll
from markdown_it.renderer import RendererHTML
from markdown_it.token import Token
from markdown_it.utils import EnvType, OptionsDict
from markupsafe import Markup
from mdit_py_plugins.dollarmath import dollarmath_plugin
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexer import Lexer
from pygments.lexers import get_lexer_by_name
from pygments.token import STANDARD_TYPES
from pygments.util import ClassNotFound

# A reply's headings start below the page's own (its h1 is the conversation's title, and
# h2 the sidebar's): "# x" becomes an h3, and anything deeper stops at h6.
HEADING_SHIFT = 2
# Longer LaTeX than this is shown as written: latex2mathml recurses on nesting, and no
# reply needs a formula this long.
MATH_MAX_LENGTH = 2000
# Longer code than this is shown plain: a page should not wait on a lexer for a dump.
HIGHLIGHT_MAX_LENGTH = 20_000
# The language shown above a code block is the reply's own text: kept short.
LANGUAGE_LABEL_MAX_LENGTH = 30

# Classes only (nowrap: just the <span class="k">...</span> runs), never inline styles:
# the colours come from static/reply.css (see code_css below), in light and dark.
_formatter = HtmlFormatter(nowrap=True)
# Every class Pygments gives a token ("k", "nf", "s2", ...): the only classes a <span> in a
# reply may carry. A lexer's own token subtypes outside this set lose their class (and
# keep their text).
PYGMENTS_CLASSES = frozenset(name for name in STANDARD_TYPES.values() if name)


@functools.lru_cache(maxsize=256)
def _lexer(language: str) -> Lexer | None:
    """Pygments' lexer for a fence's language name, None for an unknown (or no) language."""
    if not language:
        return None
    try:
        return get_lexer_by_name(language, stripnl=False, ensurenl=False)
    except ClassNotFound:
        return None


# A reply being written is rendered again every 250 ms while the page watches it: its code
# blocks that are already complete come from here instead of from Pygments each time.
@functools.lru_cache(maxsize=256)
def _highlighted(code: str, language: str) -> str:
    lexer = _lexer(language) if len(code) <= HIGHLIGHT_MAX_LENGTH else None
    return highlight(code, lexer, _formatter) if lexer is not None else escapeHtml(code)


def _fence(renderer: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
    """A fenced code block: its language above it (the page script adds a Copy button there)."""
    token = tokens[idx]
    info = unescapeAll(token.info).strip()
    language = info.split(maxsplit=1)[0] if info else ""
    code = _highlighted(token.content, language.lower())
    label = escapeHtml(language[:LANGUAGE_LABEL_MAX_LENGTH] or "code")
    return (
        '<div class="code-block"><div class="code-header">'
        f'<span class="code-lang">{label}</span></div>'
        f'<pre class="highlight"><code>{code}</code></pre></div>\n'
    )


@functools.lru_cache(maxsize=1024)
def _math(latex: str, display: bool) -> str:
    """MathML for one formula; LaTeX that does not convert is shown as written, in code."""
    mathml = None
    if len(latex) <= MATH_MAX_LENGTH:
        try:
            mathml = latex_to_mathml(latex, display="block" if display else "inline")
        except Exception:  # latex2mathml's errors have no common base; RecursionError too
            mathml = None
    if mathml is None:
        fence = "$$" if display else "$"
        return f"<code>{escapeHtml(fence + latex + fence)}</code>"
    return mathml


def _math_inline(renderer, tokens, idx, options, env) -> str:
    return _math(tokens[idx].content, False)


def _math_display(renderer, tokens, idx, options, env) -> str:
    return f'<div class="math-block">{_math(tokens[idx].content.strip(), True)}</div>\n'


def _math_inline_display(renderer, tokens, idx, options, env) -> str:
    # "$$x$$" inside a paragraph: shown as display math, in a span (a div cannot be in a <p>).
    return _math(tokens[idx].content.strip(), True)


def _shift_headings(state) -> None:
    for token in state.tokens:
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(int(token.tag[1]) + HEADING_SHIFT, 6)}"


# html=False: HTML written in a reply is shown as text, never parsed. linkify stays off, so
# only links the reply writes as Markdown become links. breaks=True: a single line break in
# a reply is a line break on the page, as the model (or the person it echoes) meant it.
_markdown = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable(["table", "strikethrough"])
# Prices are not math: "$5 and $10" stays text (no digit right inside a "$", no space either).
_markdown.use(dollarmath_plugin, allow_labels=False, allow_space=False, allow_digits=False, double_inline=True)
_markdown.add_render_rule("fence", _fence)
_markdown.add_render_rule("math_inline", _math_inline)
_markdown.add_render_rule("math_inline_double", _math_inline_display)
_markdown.add_render_rule("math_block", _math_display)
_markdown.core.ruler.push("chatapp_shift_headings", _shift_headings)

# What latex2mathml writes, and nothing else of MathML (no href, no class, no style).
MATHML_TAGS = frozenset(
    {
        "math",
        "mrow",
        "mi",
        "mo",
        "mn",
        "ms",
        "mtext",
        "mspace",
        "mfrac",
        "msqrt",
        "mroot",
        "msup",
        "msub",
        "msubsup",
        "munder",
        "mover",
        "munderover",
        "mtable",
        "mtr",
        "mtd",
        "mstyle",
        "mpadded",
        "mphantom",
        "menclose",
    }
)
MATHML_ATTRIBUTES = frozenset(
    {
        "mathvariant",
        "mathsize",
        "mathcolor",
        "mathbackground",
        "stretchy",
        "fence",
        "separator",
        "form",
        "accent",
        "accentunder",
        "lspace",
        "rspace",
        "largeop",
        "movablelimits",
        "symmetric",
        "minsize",
        "maxsize",
        "linethickness",
        "displaystyle",
        "scriptlevel",
        "width",
        "height",
        "depth",
        "voffset",
        "notation",
        "columnalign",
        "columnspacing",
        "rowspacing",
        "columnlines",
        "rowlines",
    }
)

# The sanitizer is the second wall: whatever the renderer emits, only these survive. No
# style attributes, and only the classes our own markup uses (the highlighter's token
# classes, the code block's frame), so a reply cannot borrow the page's own styling.
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
        "div",
        "span",
    }
    | MATHML_TAGS,
    attributes={
        "a": {"href", "title"},
        "ol": {"start"},
        "math": {"display"} | MATHML_ATTRIBUTES,
        **{tag: set(MATHML_ATTRIBUTES) for tag in MATHML_TAGS - {"math"}},
    },
    allowed_classes={
        "div": {"code-block", "code-header", "math-block"},
        "span": {"code-lang"} | PYGMENTS_CLASSES,
        "pre": {"highlight"},
    },
    link_rel="noopener nofollow",
    url_schemes={"http", "https", "mailto"},
)


def render_markdown(text: str) -> Markup:
    """Safe HTML for a reply's Markdown: headings, lists, code, math, links (rel="noopener nofollow")."""
    if len(text) <= CACHE_MAX_LENGTH:
        return _render_cached(text)
    return _render(_markdown.parse(text))


# A finished reply renders the same every time, and a conversation's page shows up to
# WEB_MESSAGES_PER_PAGE of them on every visit: remember recent ones (keyed by the text,
# so an edited or regenerated reply is a new entry). Bounded in count and in length.
CACHE_MAX_LENGTH = 16_000


@functools.lru_cache(maxsize=256)
def _render_cached(text: str) -> Markup:
    return _render(_markdown.parse(text))


def _render(tokens: Sequence[Token]) -> Markup:
    return Markup(_cleaner.clean(_markdown.renderer.render(tokens, _markdown.options, {})).strip())


# Emphasis, strikethrough and code spans a reply has opened but not yet closed: while it
# streams, they are closed for it, so "**bo" shows as bold now, not as "**bo" until the
# closing "**" arrives. (An open code fence needs nothing: it is a code block so far.)
_OPEN_MARKERS = ("**", "__", "~~")


def render_streaming_markdown(text: str) -> Markup:
    """Safe HTML for the text so far of a reply being written, as it will look when finished."""
    tokens = _markdown.parse(text)
    closed = _closed(text, tokens)
    if closed is not None:
        tokens = closed
    return _render(tokens)


def _closed(text: str, tokens: list[Token]) -> list[Token] | None:
    """The tokens of ``text`` with the code span, emphasis or strikethrough its last
    paragraph left open closed; None when nothing is open (or closing it would not help)."""
    tail = text.rstrip(" \t")
    if not tail or tail.endswith("\n"):
        return None  # the paragraph may have ended: what is open then stays open in the end too
    unmatched = _unmatched_in_last_paragraph(tokens)
    if not unmatched:
        return None
    if unmatched.count("`") % 2:
        closers = ["`"]  # inside a code span the other markers are just characters
    else:
        closers = [marker for marker in reversed(_OPEN_MARKERS) if unmatched.count(marker) % 2]
    if not closers:
        return None
    closed = _markdown.parse(tail + "".join(closers))
    # A marker that could never open ("a ** b") stays as written: adding a closer would
    # only show one more "**" until the reply ends.
    after = _unmatched_in_last_paragraph(closed)
    if any(after.count(marker) >= unmatched.count(marker) for marker in closers):
        return None
    return closed


def _unmatched_in_last_paragraph(tokens: list[Token]) -> str:
    """The text the inline parser left in the last block (delimiters it could not pair among it); none in code."""
    if not tokens or tokens[-1].type in ("fence", "code_block", "math_block"):
        return ""
    inline = next((token for token in reversed(tokens) if token.type == "inline"), None)
    if inline is None or not inline.children:
        return ""
    return "".join(child.content for child in inline.children if child.type == "text")


# --- the highlighter's colours -------------------------------------------------------------------

# static/reply.css ends with these rules, generated once and committed (no build step, nothing
# from another site); tests/web/test_markdown.py checks they match, and says how to remake them.
CSS_MARKER = "/* Pygments token colours: made by chatapp.web.markdown.code_css(); edit nothing below. */"
LIGHT_STYLE = "default"
DARK_STYLE = "github-dark"


def code_css() -> str:
    """Colours for the highlighter's classes: a light theme, and a dark one in dark mode."""
    scope = ".markdown .highlight"

    def rules(style: str) -> str:
        # Token rules only: the block's background is the page's own --code-bg.
        return "\n".join("  " + rule for rule in HtmlFormatter(style=style).get_token_style_defs(scope))

    return (
        f"{CSS_MARKER}\n"
        f"@media not (prefers-color-scheme: dark) {{\n{rules(LIGHT_STYLE)}\n}}\n"
        f"@media (prefers-color-scheme: dark) {{\n{rules(DARK_STYLE)}\n}}\n"
    )
