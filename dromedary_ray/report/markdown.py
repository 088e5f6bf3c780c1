"""Render the report's blocks as GitHub-flavoured Markdown, figures as PNG files beside it."""

from __future__ import annotations

import re

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


def _inline(text: str) -> str:
    """One line of literal text: no raw HTML, no table breaks, no emphasis by accident."""
    text = " ".join(text.split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = re.sub(r"([\\`*\[\]|])", r"\\\1", text)
    return re.sub(r"(?<!\w)_|_(?!\w)", r"\_", text)  # snake_case words stay readable


def _table(table: Table, caption: str) -> str:
    lines = [f"*{_inline(caption)}*", ""] if caption else []
    lines.append("| " + " | ".join(_inline(h) or " " for h in table.headers) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(table.headers)))
                 + "|")
    lines += ["| " + " | ".join(_inline(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def _block(block: Block) -> str:
    if isinstance(block, Heading):
        return f'{"#" * block.level} {_inline(block.text)}'
    if isinstance(block, Text):
        return f"_{_inline(block.text)}_" if block.kind != "p" else _inline(block.text)
    if isinstance(block, Status):
        return f"status: **{_inline(block.status)}**"
    if isinstance(block, Facts):
        return "\n".join(f"- {_inline(k)}: {_inline(v)}" for k, v in block.pairs)
    if isinstance(block, TableBlock):
        return _table(block.table, block.caption)
    if isinstance(block, Figure):
        return f"![{_inline(block.plot.title)}]({block.plot.key}.png)"
    raise TypeError(f"unknown block {block!r}")


def render_markdown(blocks: list[Block]) -> str:
    return "\n\n".join(filter(None, (_block(b) for b in blocks))) + "\n"
