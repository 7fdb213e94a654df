"""The report tab of `minilm serve --run RUN`: RUN/report.md as HTML, and the run's files, safely.

    html = markdown_to_html(Path("runs/speedrun-laptop/report.md").read_text(), lambda p: "/run/" + p)
    path = file_inside(Path("runs/speedrun-laptop"), "report/gains.png")   # PermissionError if outside

The markdown is what minilm writes (minilm/speedrun/report.py): headings, paragraphs, bullet lists,
pipe tables, images, links, `code`, **bold** and fenced code. A tiny renderer covers it, so the page
needs no package and nothing from the internet. Every piece of text is HTML-escaped before any tag
is added, so a report cannot inject markup or script into the page. Relative links and images point
into the run folder through `url_of`.

`file_inside` is the guard of the file route: the path is resolved (symlinks followed, `..`
collapsed) and must stay inside the resolved run folder, else PermissionError (HTTP 403); a missing
file, or a kind of file the page never needs, is FileNotFoundError (HTTP 404).
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from pathlib import Path

SERVED = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
          ".md": "text/plain; charset=utf-8", ".txt": "text/plain; charset=utf-8",
          ".json": "text/plain; charset=utf-8", ".jsonl": "text/plain; charset=utf-8"}
IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
BOLD = re.compile(r"\*\*(.+?)\*\*")
HEADING = re.compile(r"(#{1,6})\s+(.*)")
BULLET = re.compile(r"\s*[-*]\s+(.*)")
RULE = re.compile(r"\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?")   # a table's |---|---:| line


def file_inside(root: Path, relative: str) -> Path:
    """root/relative, resolved, if it is a served file inside root."""
    base = root.resolve()
    try:
        path = (base / relative).resolve()   # an absolute `relative` replaces base: caught below
    except (OSError, ValueError) as e:       # a NUL byte, a symlink loop
        raise FileNotFoundError(f"no such file: {relative!r}") from e
    if not path.is_relative_to(base):
        raise PermissionError(f"{relative!r} is outside the run folder")
    if path.suffix.lower() not in SERVED or not path.is_file():
        raise FileNotFoundError(f"no such file in the run folder: {relative!r}")
    return path


def _url(target: str, url_of: Callable[[str], str]) -> str:
    """Where a link or image points: web links stay, anything else is a file of the run."""
    target = html.unescape(target)
    return html.escape(target if target.startswith(("http://", "https://", "#")) else url_of(target))


def inline(text: str, url_of: Callable[[str], str]) -> str:
    """One line's markdown as escaped HTML: `code` spans first, then images, links and bold."""
    parts = text.split("`")           # odd indices are code spans
    if len(parts) % 2 == 0:           # an unmatched backtick is a literal one
        parts[-2:] = [parts[-2] + "`" + parts[-1]]
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{html.escape(part)}</code>")
            continue
        s = html.escape(part, quote=True)
        s = IMAGE.sub(lambda m: f'<img alt="{m[1]}" src="{_url(m[2], url_of)}">', s)
        s = LINK.sub(lambda m: f'<a href="{_url(m[2], url_of)}">{m[1]}</a>', s)
        out.append(BOLD.sub(r"<strong>\1</strong>", s))
    return "".join(out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(rows: list[str], url_of) -> str:
    """rows[0] the header, rows[1] the |---:| rule (a trailing colon right-aligns), then the body."""
    right = [c.endswith(":") for c in _cells(rows[1])]

    def row(line: str, tag: str) -> str:
        cells = [f'<{tag}{" class=num" if i < len(right) and right[i] else ""}>{inline(c, url_of)}</{tag}>'
                 for i, c in enumerate(_cells(line))]
        return "<tr>" + "".join(cells) + "</tr>"
    body = "".join(row(line, "td") for line in rows[2:])
    return f"<table><thead>{row(rows[0], 'th')}</thead><tbody>{body}</tbody></table>"


def markdown_to_html(text: str, url_of: Callable[[str], str]) -> str:
    """The blocks of `text` (headings, fences, tables, lists, paragraphs) as HTML."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):              # fenced code, to the closing fence
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1:end])) + "</code></pre>")
            i = end + 1
        elif m := HEADING.fullmatch(line):
            level = len(m[1])
            out.append(f"<h{level}>{inline(m[2], url_of)}</h{level}>")
            i += 1
        elif line.startswith("|") and i + 1 < len(lines) and RULE.fullmatch(lines[i + 1].strip()):
            end = next((j for j in range(i + 2, len(lines)) if not lines[j].startswith("|")), len(lines))
            out.append(_table(lines[i:end], url_of))
            i = end
        elif BULLET.fullmatch(line):
            items = []
            while i < len(lines) and (m := BULLET.fullmatch(lines[i])):
                items.append(f"<li>{inline(m[1], url_of)}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
        elif not line.strip():
            i += 1
        else:                                   # a paragraph: lines up to a blank or another block
            start, i = i, i + 1                 # the first line always belongs to it
            while i < len(lines) and lines[i].strip() and not (
                    lines[i].startswith(("```", "#", "|")) or BULLET.fullmatch(lines[i])):
                i += 1
            out.append("<p>" + inline(" ".join(lines[start:i]), url_of) + "</p>")
    return "\n".join(out)
