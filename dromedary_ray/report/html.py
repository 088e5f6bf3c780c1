"""Render the report's blocks as one self-contained HTML page.

Self-contained: the stylesheet is inline, every figure is a `data:image/png;base64` URI, and
there is no script, font or link to fetch. A Content-Security-Policy meta tag forbids anything
else, so a page that would reach out shows errors in the browser console instead of silently
depending on the network. All text from the run directory goes through `html.escape`.
"""

from __future__ import annotations

import base64
from html import escape

from dromedary_ray.report.document import (
    Block,
    Facts,
    Figure,
    Heading,
    Status,
    TableBlock,
    Text,
)
from dromedary_ray.report.tables import Table

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
h3, h4, h5, h6 { margin-bottom: .3em; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 2px 0; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 1px 12px; margin: .4em 0; }
dl.facts dt { color: #666; } dl.facts dd { margin: 0; }
figure { margin: .8em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #666; font-size: 12px; }
.status { display: inline-block; padding: 1px 8px; border-radius: 9px; font-size: 12px;
          font-weight: 600; background: #eee; }
.status-done { background: #dff0d8; color: #2d6a2d; }
.status-running { background: #fcf3cf; color: #8a6d0b; }
.status-pending { background: #eee; color: #666; }
.status-failed, .status-unknown { background: #f8d7da; color: #842029; }
p.note { color: #842029; font-size: 12px; } p.muted { color: #777; }
"""


def _table(table: Table, caption: str) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in table.headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>"
                   for row in table.rows)
    cap = f"<caption>{escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _block(block: Block) -> str:
    if isinstance(block, Heading):
        n = block.level
        return f'<h{n} id="{escape(block.anchor)}">{escape(block.text)}</h{n}>'
    if isinstance(block, Text):
        return f'<p class="{escape(block.kind)}">{escape(block.text)}</p>'
    if isinstance(block, Status):
        css = "".join(c if c.isalnum() else "-" for c in block.status)
        return (f'<p>status: <span class="status status-{escape(css)}">'
                f"{escape(block.status)}</span></p>")
    if isinstance(block, Facts):
        items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in block.pairs)
        return f'<dl class="facts">{items}</dl>' if items else ""
    if isinstance(block, TableBlock):
        return _table(block.table, block.caption)
    if isinstance(block, Figure):
        data = base64.b64encode(block.plot.png).decode("ascii")
        title = escape(block.plot.title)
        return (f'<figure id="fig-{escape(block.plot.key)}"><img src="data:image/png;base64,'
                f'{data}" alt="{title}"><figcaption>{title}</figcaption></figure>')
    raise TypeError(f"unknown block {block!r}")


def render_html(blocks: list[Block], title: str) -> str:
    body = "\n".join(filter(None, (_block(b) for b in blocks)))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'  # no favicon request, not even from file://
        f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"{body}\n</body>\n</html>\n"
    )
