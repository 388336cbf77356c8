"""Assistant replies: Markdown rendered without raw HTML, then sanitized."""

from chatapp.web.markdown import render_markdown


def test_headings_lists_code_and_links():
    html = render_markdown(
        "# One\n\n## Two\n\n- a\n- b\n\n1. first\n\n```python\nprint('<hi>')\n```\n\n"
        "Use `x` or see [the docs](https://example.com/docs)."
    )
    assert "<h1>One</h1>" in html and "<h2>Two</h2>" in html
    assert "<ul>\n<li>a</li>\n<li>b</li>\n</ul>" in html
    assert "<ol>\n<li>first</li>\n</ol>" in html
    assert "<pre><code>print('&lt;hi&gt;')\n</code></pre>" in html
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
