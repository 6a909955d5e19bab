"""The concept-density report: every figure as JSON, plots (PNG), a self-contained HTML page and a markdown summary.

`build_figures` turns per-source `DensityStats` into one JSON-able dict (the single source of truth); the plots,
HTML and markdown are rendered from that dict only, so what a reader sees is exactly what the JSON holds.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path

import numpy as np

from curation.density import (
    DensityStats,
    histogram_summary,
    noun_gaps,
    rank_frequency,
    table1,
    top_nouns,
)
from common.durable import atomic_write_bytes

JSON_FILE = "density.json"
HTML_FILE = "report.html"
MARKDOWN_FILE = "summary.md"
PLOTS_DIR = "plots"
NOUNS_DIR = "nouns"  # full noun counts per source, parquet (noun, count)

PLOT_TOP = 20  # nouns per source in the bar chart (the JSON and tables hold top_k)


@dataclass
class SourceResult:
    """One source's outcome: its statistics, or why it could not be read."""

    name: str
    manifest: str
    column: str
    stats: DensityStats | None = None
    problem: str | None = None


@dataclass
class TokenizerInfo:
    name_or_path: str | None
    available: bool
    reason: str | None = None  # why token figures are unavailable
    max_length: int = 120


def _histogram_json(counter) -> dict[str, int]:
    return {str(k): int(counter[k]) for k in sorted(counter)}


def build_figures(results: list[SourceResult], *, valid_threshold: int, top_k: int, tagger: str, lemmatizer: str,
                  tokenizer: TokenizerInfo, config: dict | None = None) -> dict:
    """Every figure of the report, JSON-able."""
    sources = []
    for result in results:
        entry = {"name": result.name, "manifest": result.manifest, "column": result.column,
                 "available": result.stats is not None, "problem": result.problem}
        stats = result.stats
        if stats is not None:
            entry["counts"] = {"seen": stats.seen, "analysed": stats.analysed,
                               "rejected": dict(sorted(stats.rejected.items()))}
            entry["table1"] = table1(stats, valid_threshold)
            entry["words"] = {**histogram_summary(stats.words), "histogram": _histogram_json(stats.words)}
            if tokenizer.available:
                entry["tokens"] = {"available": True,
                                   **histogram_summary(stats.tokens, limit=tokenizer.max_length),
                                   "histogram": _histogram_json(stats.tokens)}
            else:
                entry["tokens"] = {"available": False, "reason": tokenizer.reason}
            entry["nouns_per_caption"] = {**histogram_summary(stats.nouns_per_caption),
                                          "histogram": _histogram_json(stats.nouns_per_caption)}
            entry["top_nouns"] = [[noun, count] for noun, count in top_nouns(stats, top_k)]
            entry["rank_frequency"] = [[rank, count] for rank, count in rank_frequency(stats)]
        sources.append(entry)
    readable = [r for r in results if r.stats is not None]
    gaps = [{"have": a.name, "lack": b.name,
             "nouns": [[noun, count] for noun, count in noun_gaps(a.stats, b.stats, valid_threshold, top_k)]}
            for a, b in permutations(readable, 2)]
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "method": "PixArt-alpha (arXiv 2310.00426) Table 1: nouns by POS tagging, lemmatized; VN = distinct nouns "
                  f"occurring more than {valid_threshold} times; average = nouns per analysed caption (image)",
        "tagger": tagger,
        "lemmatizer": lemmatizer,
        "valid_threshold": valid_threshold,
        "top_k": top_k,
        "tokenizer": {"name_or_path": tokenizer.name_or_path, "available": tokenizer.available,
                      "reason": tokenizer.reason, "max_length": tokenizer.max_length},
        "sources": sources,
        "noun_gaps": gaps,
        "config": config,
    }


# --------------------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API: no pyplot, no global backend state in a worker or a test)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def empty_panel(ax, message: str) -> None:
    """A panel with nothing to plot says so, instead of showing an empty -0.06..0.06 frame."""
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", fontsize=10, color="0.35")
    ax.set_xticks([])
    ax.set_yticks([])


def _hist_arrays(histogram: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    values = np.array([int(k) for k in histogram], dtype=np.int64)
    weights = np.array(list(histogram.values()), dtype=np.int64)
    return values, weights


def _length_plot(sources: list[dict], key: str, xlabel: str, limit: int | None = None) -> bytes:
    fig = _figure(7, 3.6)
    ax = fig.add_subplot()
    upper = max([s[key]["p95"] * 1.5 for s in sources if s[key].get("count")] + [limit * 1.3 if limit else 1])
    upper = max(int(upper), 2)
    edges = np.linspace(0, upper, min(60, upper) + 1)
    for s in sources:
        if not s[key].get("count"):
            continue
        values, weights = _hist_arrays(s[key]["histogram"])
        label = f"{s['name']} (mean {s[key]['mean']:.1f})"
        if limit is not None:
            label += f", {100 * s[key]['share_over_limit']:.1f}% > {limit}"
        ax.hist(np.clip(values, 0, upper), bins=edges, weights=weights / weights.sum(), histtype="step",
                linewidth=1.8, label=label)
    if limit is not None:
        ax.axvline(limit, color="black", linestyle="--", linewidth=1)
        ax.text(limit, ax.get_ylim()[1] * 0.95, f" truncated past {limit}", va="top", fontsize=8)
    ax.set_xlabel(xlabel + " (last bin holds everything longer)")
    ax.set_ylabel("share of captions")
    if not any(s[key].get("count") for s in sources):
        empty_panel(ax, "no captions to measure")
        return _png(fig)
    ax.legend(fontsize=8)
    return _png(fig)


def _rank_plot(sources: list[dict], threshold: int) -> bytes:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig = _figure(7, 4)
    ax = fig.add_subplot()
    if not any(s["rank_frequency"] for s in sources):
        ax.set_title("Long tail of noun frequencies")
        empty_panel(ax, "no nouns found")
        return _png(fig)
    for s in sources:
        if s["rank_frequency"]:
            ranks, counts = zip(*s["rank_frequency"])
            t = s["table1"]
            ax.loglog(ranks, counts, marker=".", markersize=3, linewidth=1.4,
                      label=f"{s['name']}: {t['distinct_nouns']} distinct, {t['valid_distinct_nouns']} valid")
    ax.axhline(threshold, color="black", linestyle="--", linewidth=1)
    ax.text(1, threshold, f" valid: > {threshold} occurrences", va="bottom", fontsize=8)
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("noun rank")
    ax.set_ylabel("occurrences")
    ax.set_title("Long tail of noun frequencies")
    ax.legend(fontsize=8)
    return _png(fig)


def _top_plot(sources: list[dict]) -> bytes:
    n = len(sources)
    fig = _figure(3.6 * n, 0.22 * PLOT_TOP + 1.2)
    for i, s in enumerate(sources):
        ax = fig.add_subplot(1, n, i + 1)
        top = s["top_nouns"][:PLOT_TOP][::-1]
        if top:
            nouns, counts = zip(*top)
            ax.barh(range(len(nouns)), counts, color=f"C{i}")
            ax.set_yticks(range(len(nouns)), nouns, fontsize=8)
            ax.set_xlim(0, max(counts) * 1.1)
        else:
            empty_panel(ax, "no nouns found")
        ax.set_title(s["name"], fontsize=10)
        ax.set_xlabel("occurrences")
    return _png(fig)


def _table1_plot(sources: list[dict]) -> bytes:
    fig = _figure(7, 3)
    names = [s["name"] for s in sources]
    for i, (key, label) in enumerate((("vn_dn_percent", "VN/DN (%)"), ("avg_nouns_per_image", "nouns per image"))):
        ax = fig.add_subplot(1, 2, i + 1)
        values = [s["table1"][key] or 0.0 for s in sources]
        bars = ax.bar(range(len(names)), values, color=[f"C{j}" for j in range(len(names))])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_ylim(0, max(values + [0.0]) * 1.2 or 1.0)  # all zero: a 0..1 axis, not -0.06..0.06
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_title(label, fontsize=10)
    return _png(fig)


def render_plots(figures: dict) -> dict[str, bytes]:
    """File name -> PNG bytes, for the sources that could be read."""
    sources = [s for s in figures["sources"] if s["available"]]
    if not sources:
        return {}
    plots = {
        "table1.png": _table1_plot(sources),
        "caption_words.png": _length_plot(sources, "words", "caption length in words"),
        "noun_rank_frequency.png": _rank_plot(sources, figures["valid_threshold"]),
        "top_nouns.png": _top_plot(sources),
    }
    if figures["tokenizer"]["available"]:
        plots["caption_t5_tokens.png"] = _length_plot(sources, "tokens", "caption length in T5 tokens (with </s>)",
                                                      limit=figures["tokenizer"]["max_length"])
    return plots


# --------------------------------------------------------------------------------------------------------------
# Text renderings


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


TABLE1_COLUMNS = (("images", "Images"), ("distinct_nouns", "DN"), ("valid_distinct_nouns", "VN"),
                  ("vn_dn_percent", "VN/DN (%)"), ("total_nouns", "Total nouns"),
                  ("avg_nouns_per_image", "Avg nouns / image"))


def _token_cell(s: dict) -> str:
    tokens = s["tokens"]
    if not tokens.get("available"):
        return "unavailable"
    if not tokens.get("count"):
        return "n/a"
    return f"{_fmt(tokens['mean'])} mean, {_fmt(100 * tokens['share_over_limit'])}% > {tokens['limit']}"


def render_markdown(figures: dict, plot_files: list[str]) -> str:
    lines = ["# Concept density", "",
             f"Tagger: {figures['tagger']}. Lemmatizer: {figures['lemmatizer']}. "
             f"Valid noun: more than {figures['valid_threshold']} occurrences.", ""]
    tok = figures["tokenizer"]
    if not tok["available"]:
        lines += [f"T5 token figures unavailable: {tok['reason']}", ""]
    available = [s for s in figures["sources"] if s["available"]]
    if available:
        lines.append("| Source | " + " | ".join(label for _, label in TABLE1_COLUMNS) + " | Words (mean) | T5 tokens |")
        lines.append("|---" * (len(TABLE1_COLUMNS) + 3) + "|")
        for s in available:
            cells = [_fmt(s["table1"][key]) for key, _ in TABLE1_COLUMNS]
            lines.append(f"| {s['name']} | " + " | ".join(cells) + f" | {_fmt(s['words'].get('mean'))} | "
                         f"{_token_cell(s)} |")
        lines.append("")
        lines.append("Captions: " + "; ".join(
            f"{s['name']} {s['counts']['seen']:,} seen = {s['counts']['analysed']:,} analysed + "
            f"{sum(s['counts']['rejected'].values()):,} rejected"
            + (f" ({', '.join(f'{r}: {n:,}' for r, n in s['counts']['rejected'].items())})"
               if s["counts"]["rejected"] else "")
            for s in available) + ".")
        lines.append("")
        for s in available:
            lines.append(f"Top nouns, {s['name']}: " + ", ".join(f"{n} ({c:,})" for n, c in s["top_nouns"][:10]))
        lines.append("")
        for gap in figures["noun_gaps"]:
            nouns = ", ".join(f"{n} ({c:,})" for n, c in gap["nouns"][:10]) or "none"
            lines.append(f"Valid in {gap['have']}, absent from {gap['lack']}: {nouns}")
        lines.append("")
    for s in figures["sources"]:
        if not s["available"]:
            lines.append(f"Source {s['name']} ({s['manifest']}, column {s['column']}) not read: {s['problem']}")
    if plot_files:
        lines += ["", "Plots: " + ", ".join(f"[{p}]({PLOTS_DIR}/{p})" for p in plot_files), ""]
    lines.append(f"Every figure: {JSON_FILE}. Full report: {HTML_FILE}.")
    return "\n".join(lines) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
.nouns td { text-align: left; }
.muted { color: #777; } .problem { color: #a30; }
img { max-width: 100%; margin: 0.5em 0; }
"""


def render_html(figures: dict, plots: dict[str, bytes]) -> str:
    e = html.escape  # nouns and captions come from untrusted data
    available = [s for s in figures["sources"] if s["available"]]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Concept density</title>"
             f"<style>{_CSS}</style></head><body>", "<h1>Concept density</h1>",
             f"<p>{e(figures['method'])}.<br>Tagger: {e(figures['tagger'])}. Lemmatizer: {e(figures['lemmatizer'])}."
             f"<br><span class='muted'>Created {e(figures['created'])}.</span></p>"]
    tok = figures["tokenizer"]
    if not tok["available"]:
        parts.append(f"<p class='problem'>T5 token figures unavailable: {e(str(tok['reason']))}</p>")
    for s in figures["sources"]:
        if not s["available"]:
            parts.append(f"<p class='problem'>Source <b>{e(s['name'])}</b> ({e(s['manifest'])}, column "
                         f"{e(s['column'])}) not read: {e(str(s['problem']))}</p>")
    if available:
        parts.append("<h2>Table 1</h2><table><tr><th>Source</th>"
                     + "".join(f"<th>{e(label)}</th>" for _, label in TABLE1_COLUMNS) + "</tr>")
        for s in available:
            parts.append(f"<tr><td>{e(s['name'])}</td>"
                         + "".join(f"<td>{_fmt(s['table1'][key])}</td>" for key, _ in TABLE1_COLUMNS) + "</tr>")
        parts.append("</table>")
        parts.append("<h2>Captions</h2><table><tr><th>Source</th><th>Seen</th><th>Analysed</th><th>Rejected</th>"
                     "<th>Words: mean / median / p95 / max</th><th>T5 tokens: mean / median / p95 / max</th>"
                     "<th>Truncated</th></tr>")
        for s in available:
            w, t = s["words"], s["tokens"]
            rejected = ", ".join(f"{e(r)}: {n:,}" for r, n in s["counts"]["rejected"].items()) or "0"
            words = " / ".join(_fmt(w.get(k)) for k in ("mean", "median", "p95", "max")) if w.get("count") else "n/a"
            if t.get("available") and t.get("count"):
                tokens = " / ".join(_fmt(t.get(k)) for k in ("mean", "median", "p95", "max"))
                truncated = f"{_fmt(100 * t['share_over_limit'])}% &gt; {t['limit']}"
            else:
                tokens = truncated = "unavailable" if not t.get("available") else "n/a"
            parts.append(f"<tr><td>{e(s['name'])}</td><td>{s['counts']['seen']:,}</td>"
                         f"<td>{s['counts']['analysed']:,}</td><td>{rejected}</td><td>{words}</td>"
                         f"<td>{tokens}</td><td>{truncated}</td></tr>")
        parts.append("</table>")
        for name in ("table1.png", "caption_words.png", "caption_t5_tokens.png", "noun_rank_frequency.png",
                     "top_nouns.png"):
            if name in plots:
                data = base64.b64encode(plots[name]).decode()
                parts.append(f"<img alt='{e(name)}' src='data:image/png;base64,{data}'>")
        parts.append(f"<h2>Top {figures['top_k']} nouns</h2><table class='nouns'><tr><th>Rank</th>"
                     + "".join(f"<th>{e(s['name'])}</th>" for s in available) + "</tr>")
        for rank in range(max(len(s["top_nouns"]) for s in available)):
            cells = "".join(f"<td>{e(s['top_nouns'][rank][0])} ({s['top_nouns'][rank][1]:,})</td>"
                            if rank < len(s["top_nouns"]) else "<td></td>" for s in available)
            parts.append(f"<tr><td>{rank + 1}</td>{cells}</tr>")
        parts.append("</table>")
        if figures["noun_gaps"]:
            parts.append("<h2>Valid nouns one source has and another lacks</h2><table class='nouns'>"
                         "<tr><th>Valid in</th><th>Absent from</th><th>Nouns (occurrences)</th></tr>")
            for gap in figures["noun_gaps"]:
                nouns = ", ".join(f"{e(n)} ({c:,})" for n, c in gap["nouns"]) or "<span class='muted'>none</span>"
                parts.append(f"<tr><td>{e(gap['have'])}</td><td>{e(gap['lack'])}</td><td>{nouns}</td></tr>")
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _noun_table_bytes(stats: DensityStats) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ordered = sorted(stats.nouns.items(), key=lambda item: (-item[1], item[0]))
    table = pa.table({"noun": pa.array([n for n, _ in ordered], pa.string()),
                      "count": pa.array([c for _, c in ordered], pa.int64())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_report(figures: dict, results: list[SourceResult], out_dir: str | Path) -> dict[str, Path]:
    """Write density.json, report.html, summary.md, plots/*.png and nouns/<source>.parquet; each file atomically."""
    out = Path(out_dir)
    plots = render_plots(figures)
    written: dict[str, Path] = {}
    for name, data in plots.items():
        atomic_write_bytes(out / PLOTS_DIR / name, data)
        written[f"plot:{name}"] = out / PLOTS_DIR / name
    for result in results:
        if result.stats is not None:
            path = out / NOUNS_DIR / f"{result.name}.parquet"
            atomic_write_bytes(path, _noun_table_bytes(result.stats))
            written[f"nouns:{result.name}"] = path
    figures = {**figures, "files": {key: str(path.relative_to(out)) for key, path in written.items()}}
    atomic_write_bytes(out / JSON_FILE, json.dumps(figures, indent=1, ensure_ascii=False).encode())
    atomic_write_bytes(out / HTML_FILE, render_html(figures, plots).encode())
    atomic_write_bytes(out / MARKDOWN_FILE, render_markdown(figures, list(plots)).encode())
    written.update({"json": out / JSON_FILE, "html": out / HTML_FILE, "markdown": out / MARKDOWN_FILE})
    return written
