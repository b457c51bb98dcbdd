"""A report as plain data, and its two renderings: one self-contained HTML file and Markdown.

A document is `{"title", "subtitle", "headline": [str], "sections": [{"title", "blocks"}]}`; blocks come
from the constructors below. The run report and the comparison both build one and call `write_document`,
so escaping and embedding live in exactly one place: HTML escapes every string (jinja2 autoescape) and
embeds plots as base64 data URIs; Markdown links the same plots as PNG files in `<stem>_files/`.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Sequence
from pathlib import Path

import jinja2

from strop.core.io import atomic_write_text

MARK = {"warning": "⚠ ", "ok": "✓ "}  # by severity, then by kind; plain info is unmarked


def text(s: str) -> dict:
    return {"kind": "text", "text": s}


def note(s: str) -> dict:
    """A muted one-liner, e.g. why a section is empty."""
    return {"kind": "note", "text": s}


def warning(s: str) -> dict:
    return {"kind": "warning", "text": s}


def findings(items: list[dict]) -> dict:
    """Diagnosis items `{"kind", "severity", "text"}` as a marked list."""
    return {"kind": "findings", "items": items}


def table(header: list[str], rows: list[list]) -> dict:
    return {
        "kind": "table",
        "header": header,
        "rows": [["" if c is None else str(c) for c in r] for r in rows],
    }


def image(name: str, png: bytes | None, alt: str) -> dict | None:
    """A plot; `name` is its file stem in Markdown. None (dropped by `section`) when there is no plot."""
    if png is None:
        return None
    return {"kind": "image", "name": name, "png": png, "alt": alt, "uri": _data_uri(png)}


def example(title: str, fields: list[tuple[str, str]]) -> dict:
    """One sample: a title and labelled verbatim texts (prompt, reference, outputs)."""
    return {
        "kind": "example",
        "title": title,
        "fields": [(k, "" if v is None else str(v)) for k, v in fields],
    }


def section(title: str, blocks: Sequence[dict | None]) -> dict:
    return {"title": title, "blocks": [b for b in blocks if b is not None]}


def num(x, signed: bool = False) -> str:
    """A number for people, with fixed decimals by magnitude so a column lines up (0.10, 0.22, 1.43,
    23.4, 1,024); tiny values keep 3 significant digits (1e-05); '—' for missing."""
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
        return "—" if x is None else str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    sign = "+" if signed and x > 0 else ""
    if isinstance(x, int) or abs(x) >= 100:
        return f"{sign}{x:,.0f}"
    if abs(x) >= 10:
        return f"{sign}{x:.1f}"
    if abs(x) >= 0.01 or x == 0:
        return f"{sign}{x:.2f}"
    return f"{sign}{x:.3g}"


def count(n) -> str:
    """A large count compactly: 4.88M, 139M, 1.2B."""
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "—"
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def duration(seconds) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds):
        return "—"
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f} s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def write_document(doc: dict, folder: Path, stem: str) -> dict[str, Path]:
    """Write `<stem>.html` (self-contained) and `<stem>.md` (+ `<stem>_files/*.png`) into `folder`
    atomically; returns {"html": path, "md": path}."""
    folder = Path(folder)
    files = folder / f"{stem}_files"
    for block in _images(doc):
        # PNGs are bytes, so the same tmp-and-rename as atomic_write_text, inline
        files.mkdir(parents=True, exist_ok=True)
        tmp = files / f".{block['name']}.png.tmp"
        tmp.write_bytes(block["png"])
        tmp.replace(files / f"{block['name']}.png")
    paths = {"html": folder / f"{stem}.html", "md": folder / f"{stem}.md"}
    atomic_write_text(paths["html"], to_html(doc))
    atomic_write_text(paths["md"], to_markdown(doc, f"{stem}_files"))
    return paths


def _images(doc: dict) -> list[dict]:
    return [b for s in doc["sections"] for b in s["blocks"] if b["kind"] == "image"]


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---- HTML -------------------------------------------------------------------------------------------

_CSS = """
body{font:15px/1.5 -apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2328;
 max-width:980px;margin:2em auto;padding:0 1em;background:#fff}
h1{font-size:1.6em;margin-bottom:.1em}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.8em}
.subtitle{color:#59636e;margin-top:0}.headline{font-size:1.1em;background:#f0f6ff;border-left:4px solid #0969da;
 padding:.6em 1em}.headline p{margin:.2em 0}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #d0d7de;padding:.25em .7em;text-align:left;
 vertical-align:top}th{background:#f6f8fa}td{font-variant-numeric:tabular-nums}
.note{color:#59636e;font-style:italic}.warning{background:#fff8c5;border-left:4px solid #bf8700;padding:.5em 1em}
ul.findings{list-style:none;padding-left:0}ul.findings li{padding:.3em .6em;margin:.3em 0;border-radius:4px}
li.warning{background:#fff8c5}li.info{background:#f6f8fa}
img{max-width:100%;height:auto;display:block;margin:.6em 0}
.example{border:1px solid #d0d7de;border-radius:6px;padding:.2em 1em .8em;margin:1em 0}
.example h3{font-size:1em;margin:.6em 0}.label{font-weight:600;font-size:.85em;color:#59636e;margin-top:.5em}
pre{white-space:pre-wrap;word-break:break-word;background:#f6f8fa;padding:.5em .7em;margin:.2em 0;
 border-radius:4px;max-height:20em;overflow:auto;font:13px/1.4 ui-monospace,Menlo,Consolas,monospace}
"""

_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ doc.title }}</title><style>{{ css }}</style></head>
<body>
<h1>{{ doc.title }}</h1>
{% if doc.subtitle %}<p class="subtitle">{{ doc.subtitle }}</p>{% endif %}
{% if doc.headline %}<div class="headline">{% for line in doc.headline %}<p>{{ line }}</p>{% endfor %}</div>{% endif %}
{% for s in doc.sections %}
<h2>{{ s.title }}</h2>
{% for b in s.blocks %}
{% if b.kind == "text" %}<p>{{ b.text }}</p>
{% elif b.kind == "note" %}<p class="note">{{ b.text }}</p>
{% elif b.kind == "warning" %}<p class="warning">⚠ {{ b.text }}</p>
{% elif b.kind == "findings" %}<ul class="findings">{% for f in b["items"] %}
<li class="{{ f.severity }}">{{ mark(f) }}{{ f.text }}</li>{% endfor %}</ul>
{% elif b.kind == "table" %}<table><thead><tr>{% for h in b.header %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>{% for r in b.rows %}<tr>{% for c in r %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>
{% elif b.kind == "image" %}<img src="{{ b.uri }}" alt="{{ b.alt }}">
{% elif b.kind == "example" %}<div class="example"><h3>{{ b.title }}</h3>{% for label, body in b.fields %}
<div class="label">{{ label }}</div><pre>{{ body }}</pre>{% endfor %}</div>
{% endif %}
{% endfor %}
{% endfor %}
</body></html>
"""

_ENV = jinja2.Environment(
    autoescape=True, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined
)


def to_html(doc: dict) -> str:
    """One HTML file with inline CSS and embedded PNGs: no scripts, fonts or links to fetch."""
    return _ENV.from_string(_HTML).render(doc=doc, css=_CSS, mark=_mark)


# ---- Markdown ---------------------------------------------------------------------------------------


def to_markdown(doc: dict, image_dir: str) -> str:
    out = [f"# {doc['title']}", ""]
    if doc.get("subtitle"):
        out += [doc["subtitle"], ""]
    for line in doc.get("headline", []):
        out += [f"> {line}", ">"]
    if doc.get("headline"):
        out[-1] = ""
    for s in doc["sections"]:
        out += [f"## {s['title']}", ""]
        for b in s["blocks"]:
            out += _md_block(b, image_dir) + [""]
    return "\n".join(out).rstrip() + "\n"


def _md_block(b: dict, image_dir: str) -> list[str]:
    kind = b["kind"]
    if kind == "text":
        return [b["text"]]
    if kind == "note":
        return [f"_{b['text']}_"]
    if kind == "warning":
        return [f"**⚠ {b['text']}**"]
    if kind == "findings":
        return [f"- {_mark(f)}{f['text']}" for f in b["items"]]
    if kind == "table":
        rows = [b["header"], ["---"] * len(b["header"]), *b["rows"]]
        return ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    if kind == "image":
        return [f"![{b['alt']}]({image_dir}/{b['name']}.png)"]
    if kind == "example":
        lines = [f"### {b['title']}"]
        for label, body in b["fields"]:
            fence = "`" * max(3, _longest_backtick_run(body) + 1)
            lines += ["", f"**{label}**", fence, body, fence]
        return lines
    raise ValueError(f"unknown block kind {kind!r}")


def _mark(finding: dict) -> str:
    return MARK.get(finding.get("severity", ""), "") or MARK.get(finding.get("kind", ""), "")


def _md_cell(c: str) -> str:
    return c.replace("|", "\\|").replace("\n", " ")


def _longest_backtick_run(s: str) -> int:
    return max((len(m) for m in re.findall(r"`+", s)), default=0)
