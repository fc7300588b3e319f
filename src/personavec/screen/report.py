"""The screen's HTML page: dataset scores, the distribution of differences, top samples and their tokens.

One self-contained file like the other reports (:mod:`personavec.reports.html`): the histogram is a PNG
beside it, embedded as a data URI; the per-token heatmaps are coloured spans.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from personavec.reports.html import (
    REPORT_NAME,
    esc,
    fmt,
    html_table,
    png_uri,
    pyplot,
    token_heatmap,
    write_page,
)
from personavec.screen.scoring import TokenTrace
from personavec.screen.stats import DatasetScores

HISTOGRAM_PNG = "screen_histogram.png"
SHOWN_TOP = 10


def _histogram(scores: DatasetScores, summary: dict[str, Any], path: Path) -> str:
    plt = pyplot()
    names = [n for n, st in scores.vectors.items() if st.histogram[0]]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.2 * max(1, len(names)), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        st = scores.vectors[name]
        counts, edges = st.histogram
        ax.stairs(counts, edges, fill=True, alpha=0.6)
        ax.axvline(st.mean_projection_difference, color="black", linestyle="--", linewidth=1, label="mean")
        ax.set_title(f"{name} (layer {summary['vectors'][name]['layer']})")
        ax.set_xlabel("projection difference")
        ax.set_ylabel("samples")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return png_uri(fig, path)


def _agreement_text(summary_vector: dict[str, Any]) -> str:
    parts = []
    for key, label in (("cheap_agreement", "cheap"), ("raw_agreement", "raw projection")):
        agree = summary_vector.get(key)
        if agree:
            parts.append(f"{label}: {fmt(agree['pearson'], 2)} / {fmt(agree['spearman'], 2)}")
    return "; ".join(parts) or "-"


def _scores_table(summary: dict[str, Any]) -> str:
    header = ["vector", "layer", "samples", "mean projection", "mean own projection", "mean difference"]
    header += ["95% CI", "agreement with the full difference (Pearson / Spearman)"]
    rows = []
    for name, v in summary["vectors"].items():
        low, high = v["ci95"]
        rows.append(
            [
                esc(name),
                esc(v["layer"]),
                esc(v["n"]),
                fmt(v["mean_projection"]),
                fmt(v["mean_own_projection"]),
                f"<b>{fmt(v['mean_projection_difference'])}</b>",
                f"[{fmt(low)}, {fmt(high)}]",
                _agreement_text(v),
            ]
        )
    return html_table(header, rows)


def _top_table(top: list[dict[str, Any]], name: str) -> str:
    rows = []
    for rank, r in enumerate(top[:SHOWN_TOP], 1):
        vs = r["vectors"][name]
        rows.append(
            [
                esc(rank),
                esc(r["line"]),
                fmt(vs["projection_difference"]),
                fmt(vs["projection"]),
                fmt(vs["own_projection"]),
                esc(r["prompt"]),
                esc(r["response"]),
            ]
        )
    return html_table(["#", "line", "difference", "projection", "own", "prompt", "response"], rows)


def write_screen_report(
    out_dir: str | Path, summary: dict[str, Any], scores: DatasetScores, traces: dict[str, list[TokenTrace]]
) -> Path:
    """Write ``OUT/report.html`` for a screen.

    Args:
        out_dir: The run folder.
        summary: The screen's summary (as in ``summary.json``).
        scores: The dataset scores (histograms and top records).
        traces: Per vector, per-token projections of its top samples.

    Returns:
        The HTML file written.
    """
    folder = Path(out_dir)
    mode = summary["mode"]
    rows = summary["rows"]
    parts = [
        f"<h1>Data screening: {esc(Path(summary['data']).name)}</h1>",
        f"<p class='muted'>model: {esc(summary['model']['id'])}; mode: {esc(mode)} (own answer read as: "
        f"{esc(summary['own_measure'])}); {esc(rows['screened'])} samples screened, {esc(rows['skipped'])} "
        "malformed rows skipped</p>",
        "<p>Per sample and vector: the projection of the dataset's response (response-token mean at the "
        "vector's layer, under the sample's prompt), the projection of the model's own answer to the same "
        "prompt, and their difference. A large positive difference means the sample shows more of the "
        "trait than the model itself would: training on it pulls the model toward the trait.</p>",
        "<h2 id='scores'>Dataset scores</h2>",
        _scores_table(summary),
        "<p class='muted'>95% CI: seeded percentile bootstrap of the mean difference. The agreement column "
        "(full runs) correlates with the full difference, over these samples, the cheap difference "
        "(projection minus the last prompt token's projection) and the raw projection (nothing "
        "subtracted).</p>",
    ]
    parts += [f"<p class='muted'>note: {esc(n)}</p>" for n in summary.get("notes", [])]
    drop = summary.get("drop")
    if drop:
        parts.append(
            f"<p>Dropped the top {esc(drop['count'])} samples ({esc(drop['spec'])}, ranked by "
            f"{esc(summary['rank_by'])}): {esc(drop['path'])}</p>"
        )
    parts.append("<h2 id='distribution'>Distribution</h2>")
    try:
        uri = _histogram(scores, summary, folder / HISTOGRAM_PNG)
        parts.append(f"<img alt='distribution of projection differences' src='{uri}'>")
    except Exception as e:  # a broken plot must not cost the tables
        parts.append(f"<p class='muted'>plot not drawn: {esc(e)}</p>")
    for name, st in scores.vectors.items():
        layer = int(summary["vectors"][name]["layer"])
        parts.append(f"<h2 id='top-{esc(name)}'>Top samples: {esc(name)}</h2>")
        parts.append(_top_table(list(st.top), name))
        by_line = {int(r["line"]): r["vectors"][name] for r in st.top}
        prompts = {int(r["line"]): r["prompt"] for r in st.top}
        examples = [
            {
                "label": f"line {t.line}, difference {fmt(by_line[t.line]['projection_difference'])}",
                "question": prompts[t.line],
                "tokens": list(t.tokens),
                "token_projection": list(t.projections),
            }
            for t in traces.get(name, [])
            if t.line in by_line
        ]
        if examples:
            parts.append(token_heatmap(examples, layer))
    timing = summary.get("timing", {})
    parts.append("<h2 id='timing'>Where the time went</h2>")
    parts.append(html_table(["", "value"], [[esc(k), fmt(v)] for k, v in timing.items()]))
    target = folder / REPORT_NAME
    write_page(target, f"screen {Path(summary['data']).name}", parts)
    return target
