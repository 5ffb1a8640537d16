"""Reports as a list of blocks, rendered as Markdown and as one self-contained HTML file (images inlined).

A block is `(kind, value)`: ("h1"|"h2"|"h3", text), ("p", text: `code` spans and "- " list lines),
("code", text), ("table", (header, rows)), ("img", (path, caption)).
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Block = tuple[str, Any]


def slug(name: str) -> str:
    """`name` made safe as a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Block:
    return ("table", (list(header), [[str(c) for c in row] for row in rows]))


def render_markdown(doc: Sequence[Block]) -> str:
    lines = []
    for kind, value in doc:
        if kind in ("h1", "h2", "h3"):
            lines.append(f"{'#' * int(kind[1])} {value}")
        elif kind == "p":
            lines.append(value)
        elif kind == "code":
            lines.append(f"```python\n{value}\n```")
        elif kind == "table":
            header, rows = value
            cells = [header, ["---"] * len(header), *rows]
            lines.append("\n".join("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells))
        elif kind == "img":
            path, caption = value
            lines.append(f"![{caption}]({path.name})")
        lines.append("")
    return "\n".join(lines)


def _html_text(text: str) -> str:
    """Paragraph text: `code` spans, and "- " lines as a list."""
    out, items = [], []
    for line in text.splitlines():
        escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(line))
        if line.startswith("- "):
            items.append(f"<li>{escaped[2:]}</li>")
        elif line.startswith("  ") and items:
            items[-1] = items[-1][:-5] + " " + escaped.strip() + "</li>"
        else:
            if items:
                out.append("<ul>" + "".join(items) + "</ul>")
                items = []
            out.append(escaped)
    if items:
        out.append("<ul>" + "".join(items) + "</ul>")
    return "<p>" + "\n".join(out) + "</p>"


def render_html(doc: Sequence[Block], title: str) -> str:
    parts = []
    for kind, value in doc:
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{html.escape(value)}</{kind}>")
        elif kind == "p":
            parts.append(_html_text(value))
        elif kind == "code":
            parts.append(f"<pre><code>{html.escape(value)}</code></pre>")
        elif kind == "table":
            header, rows = value
            head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            path, caption = value
            data = base64.b64encode(path.read_bytes()).decode()
            parts.append(
                f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    style = (
        "body{font-family:sans-serif;max-width:70em;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse;font-size:0.85em;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px}"
        "th{background:#f3f3f3}pre{background:#f6f6f6;padding:0.5em}img{max-width:100%}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


def write_report(out: Path, doc: Sequence[Block], data: dict[str, Any], title: str) -> dict[str, Path]:
    """Writes report.md, report.html (images inlined) and report.json into `out`; returns their paths."""
    paths = {"md": out / "report.md", "html": out / "report.html", "json": out / "report.json"}
    paths["md"].write_text(render_markdown(doc))
    paths["html"].write_text(render_html(doc, title))
    paths["json"].write_text(json.dumps(data, indent=1, default=str) + "\n")
    return paths
