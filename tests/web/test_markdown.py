"""Assistant replies: Markdown rendered without raw HTML, then sanitized."""

import re
from html import unescape

import pytest

from chatapp.web import markdown
from chatapp.web.markdown import render_markdown, render_streaming_markdown


def test_headings_lists_code_and_links():
    html = render_markdown(
        "# One\n\n## Two\n\n- a\n- b\n\n1. first\n\n```python\nprint('<hi>')\n```\n\n"
        "Use `x` or see [the docs](https://example.com/docs)."
    )
    # A reply's headings sit below the page's own h1 and h2.
    assert "<h3>One</h3>" in html and "<h4>Two</h4>" in html and "<h1>" not in html
    assert "<ul>\n<li>a</li>\n<li>b</li>\n</ul>" in html
    assert "<ol>\n<li>first</li>\n</ol>" in html
    assert '<pre class="highlight"><code><span class="nb">print</span>' in html
    assert "<span class=\"s1\">'&lt;hi&gt;'</span>" in html
    assert "<code>x</code>" in html
    assert '<a href="https://example.com/docs" rel="noopener nofollow">the docs</a>' in html


def test_raw_html_is_text():
    html = render_markdown('<script>alert(1)</script>\n\n<img src=x onerror=alert(1)>\n\n<a href="x" onclick="y">z</a>')
    assert "<script" not in html and "<img" not in html and "<a " not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html


def test_dangerous_links_and_images_are_dropped():
    html = render_markdown(
        "[a](javascript:alert(1)) [b](data:text/html;base64,PHNjcmlwdD4=) "
        "[c](vbscript:x) ![pic](https://example.com/x.png) [ok](mailto:me@example.com)"
    )
    assert 'href="javascript' not in html and 'href="data:' not in html and 'href="vbscript' not in html
    assert "<img" not in html
    assert '<a href="mailto:me@example.com" rel="noopener nofollow">ok</a>' in html


def test_sanitizer_backs_up_the_renderer():
    # Whatever reaches the cleaner, only the allowed tags and attributes survive.
    from chatapp.web import markdown

    dirty = '<p class="x" style="color:red" onclick="y">t<iframe src="https://e.com"></iframe></p><a href="https://e.com" target="_blank">l</a>'
    clean = markdown._cleaner.clean(dirty)
    assert clean == '<p>t</p><a href="https://e.com" rel="noopener nofollow">l</a>'


# --- code blocks ---------------------------------------------------------------------------------


def test_code_is_highlighted_with_classes_under_its_language():
    html = render_markdown("```python\ndef f(x):\n    return x\n```")
    assert html.startswith(
        '<div class="code-block"><div class="code-header"><span class="code-lang">python</span></div>'
    )
    assert '<pre class="highlight"><code><span class="k">def</span>' in html
    assert '<span class="nf">f</span>' in html
    assert "style=" not in html


@pytest.mark.parametrize(
    "fence", ["```nosuchlanguage\n<b>x</b> & y\n```", "```\n<b>x</b> & y\n```", "    <b>x</b> & y"]
)
def test_unknown_or_no_language_is_a_plain_block(fence):
    html = render_markdown(fence)
    assert "<code>&lt;b&gt;x&lt;/b&gt; &amp; y\n</code></pre>" in html
    assert "<span class=" not in html.split("<pre")[-1]  # no highlighting
    if fence.startswith("```nosuch"):
        assert '<span class="code-lang">nosuchlanguage</span>' in html
    if fence.startswith("```\n"):
        assert '<span class="code-lang">code</span>' in html


def test_very_long_code_is_shown_plain():
    code = "x = 1\n" * (markdown.HIGHLIGHT_MAX_LENGTH // 6 + 1)
    html = render_markdown(f"```python\n{code}```")
    assert '<span class="code-lang">python</span>' in html
    assert f'<pre class="highlight"><code>{code}</code></pre>' in html


@pytest.mark.parametrize(
    "info",
    [
        '"><script>alert(1)</script>',
        "python onclick=alert(1)",
        "<img src=x onerror=alert(1)>",
        'x" class="admin-only',
    ],
)
def test_an_info_string_is_only_ever_a_label(info):
    html = render_markdown(f"```{info}\nprint(1)\n```")
    assert "<script" not in html and "<img" not in html and "onclick" not in html.split("</span>")[0].split(">")[0]
    assert "admin-only" not in re.findall(r'class="([^"]*)"', html)
    assert set(re.findall(r"<(\w+)", html)) <= {"div", "span", "pre", "code"}


def test_code_with_markup_inside_stays_text():
    html = render_markdown('```html\n<script>alert(1)</script><span class="admin-only">x</span>\n```')
    assert "<script" not in html and 'class="admin-only"' not in html
    code = re.sub(r"<[^>]+>", "", html.split("<code>")[1].split("</code>")[0])
    assert unescape(code) == '<script>alert(1)</script><span class="admin-only">x</span>\n'


def test_the_sanitizer_keeps_only_the_classes_the_renderer_uses():
    dirty = (
        '<span class="admin-only">a</span><span class="k admin-only">b</span><div class="button primary">c</div>'
        '<pre class="highlight danger"><code class="language-x">d</code></pre><p class="code-block">e</p>'
    )
    clean = markdown._cleaner.clean(dirty)
    classes = set(" ".join(re.findall(r'class="([^"]*)"', clean)).split())
    assert classes == {"k", "highlight"}, clean


def test_every_highlighter_class_is_allowed():
    # Every class a long, varied snippet gets from Pygments survives the sanitizer.
    code = 'import os\n@decorator\nclass A(B):\n    """doc"""\n    def f(self, x=1.5e3, *a):\n        return f"{x!r}" + r"\\d" if x else None  # c\n'
    raw = markdown._markdown.render(f"```python\n{code}```")
    emitted = set(re.findall(r'<span class="([^"]+)"', raw)) - {"code-lang"}
    assert len(emitted) > 10 and emitted <= markdown.PYGMENTS_CLASSES
    assert set(re.findall(r'<span class="([^"]+)"', render_markdown(f"```python\n{code}```"))) == emitted | {
        "code-lang"
    }


# --- line breaks, headings -----------------------------------------------------------------------


def test_single_line_breaks_are_kept():
    assert render_markdown("one\ntwo") == "<p>one<br>\ntwo</p>"
    assert render_markdown("one\n\ntwo") == "<p>one</p>\n<p>two</p>"


@pytest.mark.parametrize(
    ("source", "tag"),
    [("# a", "h3"), ("## a", "h4"), ("### a", "h5"), ("#### a", "h6"), ("###### a", "h6"), ("a\n===", "h3")],
)
def test_headings_start_below_the_page_title(source, tag):
    assert render_markdown(source) == f"<{tag}>a</{tag}>"


# --- math ----------------------------------------------------------------------------------------


def test_inline_and_display_math_are_mathml():
    html = render_markdown("Area is $\\pi r^2$.\n\n$$\n\\frac{a}{b}\n$$")
    assert '<math display="inline"><mrow><mi>π</mi><msup><mi>r</mi><mn>2</mn></msup></mrow></math>' in html
    assert '<div class="math-block"><math display="block"><mrow><mfrac>' in html


def test_prices_are_not_math():
    for text in ("It costs $5 and $10.", "$5-$10", "from $3.50 to $4", "a $ b $ c"):
        assert render_markdown(text) == f"<p>{text}</p>"


@pytest.mark.parametrize("latex", ["\\frac{", "x^", "\\begin{matrix}", "{" * 3000 + "}" * 3000])
def test_bad_latex_is_shown_as_written(latex):
    html = render_markdown(f"see ${latex}$ here")
    assert "<math" not in html
    assert html.startswith("<p>see ") and html.endswith(" here</p>")
    assert "<code>$" in html or "$" in html  # as code, or as the text it was


def test_math_cannot_smuggle_links_classes_or_styles():
    html = render_markdown(
        "$\\href{javascript:alert(1)}{x}$ $\\class{admin-only}{y}$ $\\style{color:red}{z}$ $\\text{<img src=x onerror=alert(1)>}$"
    )
    assert "href" not in html and "admin-only" not in html and "style=" not in html
    assert "<img" not in html


# --- a reply being written -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("so_far", "expected"),
    [
        ("half **bol", "<p>half <strong>bol</strong></p>"),
        ("half **bold ", "<p>half <strong>bold</strong></p>"),
        ("run `ls -", "<p>run <code>ls -</code></p>"),
        ("**a ~~b", "<p><strong>a <s>b</s></strong></p>"),
        ("a ** b", "<p>a ** b</p>"),  # never emphasis: nothing added
        ("**done** and more", "<p><strong>done</strong> and more</p>"),
        ("**a\n\n", "<p>**a</p>"),  # the paragraph ended open: as it will stay
    ],
)
def test_a_reply_being_written_closes_what_it_opened(so_far, expected):
    assert render_streaming_markdown(so_far) == expected


def test_an_open_fence_is_a_code_block_so_far():
    html = render_streaming_markdown("Here:\n\n```python\ndef f(**kw):\n    return `x")
    assert '<span class="code-lang">python</span>' in html
    assert '<pre class="highlight"><code><span class="k">def</span>' in html
    assert "`" in html and html.count("**") == 1  # the code's own characters, nothing added


def test_a_finished_reply_renders_as_it_streamed():
    text = "# Plan\n\nFirst **bold** step,\nthen:\n\n```js\nlet x = 1;\n```\n\n$x^2$ costs $5"
    assert render_streaming_markdown(text) == render_markdown(text)
    # Each prefix renders without error, and the whole one exactly as finished.
    for end in range(len(text) + 1):
        render_streaming_markdown(text[:end])


def test_the_highlighter_colours_are_served_from_our_static_files():
    from pathlib import Path

    import chatapp

    css = (Path(chatapp.__file__).parent / "static" / "reply.css").read_text()
    assert markdown.CSS_MARKER in css
    generated = css[css.index(markdown.CSS_MARKER) :]
    assert generated == markdown.code_css(), (
        "static/reply.css is out of date: replace everything from its marker line on with the output of "
        "python -c 'from chatapp.web.markdown import code_css; print(code_css(), end=\"\")'"
    )
    # Classes only, for both colour schemes, and nothing fetched from anywhere.
    assert "@media (prefers-color-scheme: dark)" in css and ".markdown .highlight .k {" in css
    assert "url(" not in css and "@import" not in css
