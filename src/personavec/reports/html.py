"""One HTML file per run folder, readable offline: no scripts, no fonts or styles from the network.

Plots are drawn with matplotlib (Agg backend, no display needed), saved as PNG beside the HTML and
embedded in it as base64 ``data:`` URIs, so the single file can be mailed or archived on its own.

Inputs, all optional except ``summary.json`` or ``sweep.json``: ``trait.yaml``, ``summary.json``
(extraction counts and per-layer separation; when present, the vector's ``quality`` and how its layer
was chosen, ``layer_choice``), ``sweep.json`` (dose-response and example answers with per-token
projections). With a model at hand and no token data stored, a few held-out answers are
re-read to draw the per-token heatmap.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from personavec.core.errors import PersonavecError
from personavec.core.store import write_atomic

if TYPE_CHECKING:
    from personavec.core.models import LoadedModel

REPORT_NAME = "report.html"
SWEEP_NAME = "sweep.json"
MONITORING_NAME = "monitor_experiment.json"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;background:#fff;line-height:1.45;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}
.chosen{background:#fff3c4}.muted{color:#777}img{max-width:100%;border:1px solid #eee}
.tok{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em;
line-height:1.9;border:1px solid #eee;padding:.5em}.tok span{border-radius:2px}
blockquote{margin:.3em 0 .8em 0;padding:.3em .8em;border-left:3px solid #ccc;background:#fafafa}
"""


def esc(x: object) -> str:
    """``x`` as text safe inside HTML (and inside quoted attributes)."""
    return html.escape(str(x), quote=True)


def fmt(x: object, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` decimals (tiny ones in ``g`` form), ``None`` as ``-``, escaped."""
    if x is None:
        return "-"
    if isinstance(x, float):
        return (
            "nan" if math.isnan(x) else f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
        )
    return esc(x)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PersonavecError(f"{path}: not valid JSON ({e})") from e
    return data if isinstance(data, dict) else None


def png_uri(fig: Any, path: Path) -> str:
    """Save a figure as PNG beside the report and return it as a data URI."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must be set before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def _separation_plot(evaluation: dict[str, Any], recommended: int | None, path: Path) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for name, ev in evaluation.items():
        axes[0].plot(ev["layers"], ev["auroc"], marker=".", label=name)
        axes[1].plot(ev["layers"], ev["effect_size"], marker=".", label=name)
    for ax, title in zip(axes, ("held-out AUROC", "effect size (Cohen's d)")):
        if recommended is not None:
            ax.axvline(recommended, color="#999", linestyle="--", linewidth=1)
        ax.set_xlabel("layer")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return png_uri(fig, path)


def _dose_plot(sweep: dict[str, Any], path: Path) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    cells = [c for c in sweep["cells"] if not c["refused"]]
    base = sweep["baselines"]
    use_judge = sweep["choice"].get("chosen_by", {}).get("signal") == "judge"
    for layer in sorted({c["layer"] for c in cells}):
        for condition, style in (("amplify", "-"), ("suppress", ":")):
            pts = sorted(
                [(c["fraction"], c) for c in cells if c["layer"] == layer and c["condition"] == condition],
                key=lambda p: p[0],
            )
            b = base.get(condition)
            if b is not None:
                pts = [(0.0, b), *pts] if condition == "amplify" else [*pts, (0.0, b)]
            xs = [p[0] for p in pts]
            label = f"layer {layer}" + ("" if condition == "amplify" else " (under eliciting prompt)")
            axes[0].plot(xs, [p[1]["trait"] for p in pts], style, marker="o", label=label)
            if use_judge:
                axes[1].plot(xs, [p[1]["judge_coherence"] for p in pts], style, marker="o", label=label)
            else:
                axes[1].plot(xs, [p[1]["ppl_ratio"] for p in pts], style, marker="o", label=label)
    for kind, marker in (("amplify", "*"), ("suppress", "X")):
        ch = sweep["choice"].get(kind)
        if ch:
            axes[0].plot(
                [ch["coef_fraction_of_residual_norm"]], [ch["trait_readback"]], marker, color="black",
                markersize=15, label=f"chosen ({kind})",
            )  # fmt: skip
            y = ch["judge_coherence"] if use_judge else ch["ppl_ratio"]
            axes[1].plot([ch["coef_fraction_of_residual_norm"]], [y], marker, color="black", markersize=15)
    axes[0].set_title(f"trait read-back (projection at layer {sweep['readback_layer']})")
    axes[1].set_title("judge coherence (0-100)" if use_judge else "perplexity ratio to unsteered")
    for ax in axes:
        ax.set_xlabel("coefficient x ||v|| / residual norm")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return png_uri(fig, path)


def _colour(value: float, scale: float) -> str:
    """Red for positive projection (towards the trait), blue for negative, white at 0."""
    t = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    if t >= 0:
        return f"rgba(220,50,47,{0.75 * t:.3f})"
    return f"rgba(38,139,210,{0.75 * -t:.3f})"


def token_heatmap(examples: list[dict[str, Any]], layer: int) -> str:
    """Answers as spans coloured by each token's projection (one shared colour scale)."""
    vals = [abs(x) for ex in examples for x in ex.get("token_projection", [])]
    if not vals:
        return "<p class='muted'>no per-token data.</p>"
    vals.sort()
    scale = vals[int(0.95 * (len(vals) - 1))] or 1.0  # a few outlier tokens must not wash out the rest
    parts = [
        f"<p>Projection of each answer token onto the unit vector at layer {layer}, read by the "
        f"unsteered model. Red: towards the trait, blue: away; full colour at |projection| &ge; "
        f"{scale:.3g}. Hover a token for its value.</p>"
    ]
    for ex in examples:
        spans = "".join(
            f"<span style='background:{_colour(p, scale)}' title='{p:.3f}'>{esc(t)}</span>"
            for t, p in zip(ex["tokens"], ex["token_projection"])
        )
        head = esc(ex.get("label", ""))
        parts.append(f"<p><b>{head}</b> &mdash; {esc(ex['question'])}</p><div class='tok'>{spans}</div>")
    return "\n".join(parts)


def html_table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    """A table of already escaped cells (``header`` is escaped here), with optional row classes."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        f"<tr class='{(classes or [''] * len(rows))[i]}'>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>"
        for i, r in enumerate(rows)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _heldout_examples(
    run_dir: Path, lm: LoadedModel, summary: dict[str, Any], n: int = 4
) -> list[dict[str, Any]]:
    """Re-read a few held-out answers (two per polarity) for the heatmap when no sweep stored tokens."""
    from personavec.core.store import JsonlStore
    from personavec.core.vectors import PersonaVector
    from personavec.steer.readback import read_back

    vec_path = run_dir / "vector.safetensors"
    store_path = run_dir / "responses.jsonl"
    if not vec_path.is_file() or not store_path.is_file():
        return []
    vector = PersonaVector.load(vec_path)
    layer = int(summary.get("recommended_layer") or max(1, vector.meta.n_blocks // 2))
    rows = [r for r in JsonlStore(store_path).records() if r.get("split") == "evaluation"]
    picked = [r for r in rows if r["polarity"] == "pos"][: n // 2] + [
        r for r in rows if r["polarity"] == "neg"
    ][: n // 2]
    picked = [r for r in picked if str(r.get("answer", "")).strip()]
    if not picked:
        return []
    rb = read_back(lm, vector, [(r["question"], r["answer"]) for r in picked], layer, tokens=True)
    assert rb.tokens is not None and rb.token_projection is not None
    return [
        {
            "label": f"held-out, {'trait-eliciting' if r['polarity'] == 'pos' else 'suppressing'} prompt",
            "question": r["question"],
            "tokens": t,
            "token_projection": p,
        }
        for r, t, p in zip(picked, rb.tokens, rb.token_projection)
    ]


def write_report(
    run_dir: str | os.PathLike[str],
    *,
    lm: LoadedModel | None = None,
    out: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``report.html`` (and its PNG plots) for a run folder.

    Args:
        run_dir: A run folder from ``extract`` and/or ``sweep`` (``summary.json``, ``sweep.json``...).
        lm: The model, used only to draw the token heatmap when no sweep stored per-token data.
        out: The HTML path (default ``RUN_DIR/report.html``).

    Returns:
        The HTML file written.

    Raises:
        PersonavecError: If the folder has neither ``summary.json`` nor ``sweep.json``.
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        raise PersonavecError(f"run folder not found: {folder}")
    summary = _read_json(folder / "summary.json")
    sweep = _read_json(folder / SWEEP_NAME)
    if summary is None and sweep is None:
        raise PersonavecError(f"{folder} has no summary.json or {SWEEP_NAME}: not a run folder")
    target = Path(out) if out is not None else folder / REPORT_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    spec = _read_spec(folder / "trait.yaml")
    trait = (
        (spec or {}).get("name")
        or (summary or {}).get("trait")
        or (sweep or {}).get("settings", {}).get("trait")
    )
    model = (summary or {}).get("model", {}).get("id") or (sweep or {}).get("settings", {}).get("model")
    parts = [f"<h1>Persona vector report: {esc(trait)}</h1>", f"<p class='muted'>model: {esc(model)}</p>"]
    parts += _quality_box((summary or {}).get("quality"))
    parts += _trait_section(spec)
    parts += _filtering_section(summary)
    parts += _separation_section(summary, folder)
    parts += _layer_choice_section((summary or {}).get("layer_choice"), folder)
    monitoring = _read_json(folder / MONITORING_NAME)
    if monitoring:
        parts += _monitoring_section(monitoring, folder)
    parts += _sweep_sections(sweep, folder)
    parts += _heatmap_section(folder, summary, sweep, lm)
    write_page(target, trait, parts)
    return target


# -- the report's parts, in page order ------------------------------------------------------------------
def _read_spec(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, dict) else None


_QUALITY_COLOURS = {"good": "#2e7d32", "usable": "#b26a00", "weak": "#c62828"}  # green, amber, red


def _quality_box(quality: object) -> list[str]:
    """A short box on the vector's quality (``summary["quality"]``); nothing when it is absent."""
    if not isinstance(quality, dict):
        return []
    level = str(quality.get("level") or "unknown")
    colour = _QUALITY_COLOURS.get(level, "#777")
    kept = quality.get("kept")
    kept = kept if isinstance(kept, dict) else {}
    facts = [
        f"kept answers: {esc(kept.get('positive', '-'))} positive, {esc(kept.get('negative', '-'))} negative",
        f"held-out AUROC {fmt(quality.get('heldout_auroc'))}, "
        f"effect size {fmt(quality.get('heldout_effect_size'), 2)}",
        f"filter: {esc(quality.get('filter', '-'))}",
    ]
    warnings = quality.get("warnings")
    warnings = warnings if isinstance(warnings, list) else []
    bullets = "".join(f"<li>{esc(w)}</li>" for w in warnings)
    box = f"border-left:6px solid {colour};background:#fafafa;padding:.2em 1em;margin:1em 0"
    return [
        f"<div id='quality' style='{box}'>"
        f"<p><b>Vector quality: <span style='color:{colour}'>{esc(level)}</span></b></p>"
        f"<p>{'; '.join(facts)}.</p>" + (f"<ul>{bullets}</ul>" if bullets else "") + "</div>"
    ]


def _trait_section(spec: dict[str, Any] | None) -> list[str]:
    """The trait's description, sizes and first prompt pair, from ``trait.yaml``."""
    parts = ["<h2 id='trait'>Trait</h2>"]
    if not spec:
        return [*parts, "<p class='muted'>no trait.yaml in this folder.</p>"]
    pairs = spec.get("pairs") or []
    parts.append(f"<p>{esc(spec.get('description', ''))}</p>")
    sizes = [
        str(len(pairs)),
        str(len(spec.get("extraction_questions") or [])),
        str(len(spec.get("evaluation_questions") or [])),
        esc(spec.get("version", "")),
    ]
    header = ["prompt pairs", "extraction questions", "evaluation questions", "version"]
    parts.append(html_table(header, [sizes]))
    if pairs:
        parts.append(
            f"<p>First pair &mdash; eliciting:</p><blockquote>{esc(pairs[0]['positive'])}</blockquote>"
            f"<p>suppressing:</p><blockquote>{esc(pairs[0]['negative'])}</blockquote>"
        )
    return parts


def _filtering_section(summary: dict[str, Any] | None) -> list[str]:
    """How many extraction answers each filter kept and dropped, per side."""
    parts = ["<h2 id='filtering'>Filtering</h2>"]
    if not summary:
        return [*parts, "<p class='muted'>no extraction summary.</p>"]
    c = summary.get("counts", {})
    rows = [
        [
            name,
            *(
                str(c.get(f"{count}_{pol}", "-"))
                for count in ("total", "kept", "dropped_trait", "dropped_incoherent", "dropped_unscored")
            ),
        ]
        for pol, name in (("pos", "positive (eliciting)"), ("neg", "negative (suppressing)"))
    ]
    header = ["side", "answers", "kept", "dropped: trait", "dropped: incoherent", "dropped: unscored"]
    parts.append(html_table(header, rows))
    parts.append(f"<p>Judges: {esc(summary.get('trait_judge'))} | {esc(summary.get('coherence_judge'))}</p>")
    return parts


def _separation_section(summary: dict[str, Any] | None, folder: Path) -> list[str]:
    """Held-out AUROC and effect size per layer and pooling: a plot and a table."""
    parts = ["<h2 id='separation'>Per-layer separation</h2>"]
    if not summary or not summary.get("evaluation"):
        return [*parts, "<p class='muted'>no per-layer evaluation.</p>"]
    evaluation = summary["evaluation"]
    rec = summary.get("recommended_layer")
    uri = _separation_plot(evaluation, rec, folder / "separation.png")
    parts.append(f"<img alt='per-layer separation' src='{uri}'>")
    names = list(evaluation)
    layers = evaluation[names[0]]["layers"]
    rows = []
    for i, layer in enumerate(layers):
        row = [str(layer)]
        for nm in names:
            row += [fmt(evaluation[nm]["auroc"][i]), fmt(evaluation[nm]["effect_size"][i], 2)]
        rows.append(row)
    classes = ["chosen" if layer == rec else "" for layer in layers]
    header = ["layer"] + [f"{nm} {k}" for nm in names for k in ("AUROC", "d")]
    parts.append(
        f"<p>Recommended layer: <b>{esc(rec)}</b> (labels: {esc(evaluation[names[0]].get('labels', ''))})</p>"
    )
    parts.append(html_table(header, rows, classes))
    return parts


def _layer_choice_section(choice: object, folder: Path) -> list[str]:
    """How the layer was chosen (``summary["layer_choice"]``): the rule and its scores per layer."""
    if not isinstance(choice, dict):
        return []
    layer = choice.get("layer")
    candidates = ", ".join(esc(c) for c in choice.get("candidates") or [])
    parts = [
        "<h2 id='layer-choice'>Layer choice</h2>",
        f"<p>{esc(choice.get('rule', ''))}</p>",
        f"<p>Chosen layer: <b>{esc(layer)}</b>"
        + (f" (candidates: {candidates})" if candidates else "")
        + "</p>",
    ]
    scores = {str(k): v for k, v in (choice.get("scores") or {}).items() if isinstance(v, list) and v}
    if scores:
        uri = _layer_choice_plot(
            scores, layer if isinstance(layer, int) else None, folder / "layer_choice.png"
        )
        parts.append(f"<img alt='layer choice scores' src='{uri}'>")
    return parts


def _layer_choice_plot(scores: dict[str, list[float | None]], layer: int | None, path: Path) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.4))
    for name, values in scores.items():
        # None (a score not defined at that layer) becomes a gap in the line.
        ys = [math.nan if v is None else float(v) for v in values]
        ax.plot(range(1, len(ys) + 1), ys, marker=".", label=name)
    if layer is not None:
        ax.axvline(layer, color="#999", linestyle="--", linewidth=1, label=f"chosen: layer {layer}")
    ax.xaxis.get_major_locator().set_params(integer=True)  # layers are whole numbers
    ax.set_xlabel("layer (output of block l)")
    ax.set_title("layer-choice scores")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_uri(fig, path)


def _monitoring_section(result: dict[str, Any], folder: Path) -> list[str]:
    """The Monitoring section: r values, level means and the plots of ``monitor-experiment``."""
    from personavec.monitor.experiment import plot_results

    parts = ["<h2 id='monitoring'>Monitoring</h2>"]
    parts.append(
        f"<p>Last-prompt-token projection at layer {esc(result.get('layer'))} against the trait shown in "
        f"the answer, measured by {esc(result.get('measure'))}. Pearson r across samples and across "
        "level means, and across samples with each question's mean removed (the question alone moves both "
        "numbers). The paper reports r = 0.75-0.83 for graded system prompts.</p>"
    )
    rows = [
        [
            esc(name.replace("_", "-")),
            esc(measure),
            fmt(r["samples"], 2),
            fmt(r["levels"], 2),
            fmt(r.get("within_questions"), 2),
        ]
        for name in ("ladder", "many_shot")
        for measure, r in (result.get(name) or {}).get("r", {}).items()
    ]
    parts.append(
        html_table(["experiment", "measure", "r (samples)", "r (level means)", "r (within questions)"], rows)
    )
    try:
        paths = plot_results(result, folder)
    except Exception as e:  # a broken plot must not cost the rest of the report
        parts.append(f"<p class='muted'>plots not drawn: {esc(e)}</p>")
        paths = {}
    for name, path in paths.items():
        uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<img alt='monitoring: {esc(name)}' src='{uri}'>")
    for name in ("ladder", "many_shot"):
        block = result.get(name)
        if block:
            parts.append(_levels_table(name, block))
    return parts


def _levels_table(name: str, block: dict[str, Any]) -> str:
    """One monitoring experiment's mean projection, read-back (and judge score) per level."""
    has_judge = any("mean_judge" in lv for lv in block["levels"])
    header = ["level", "prompt" if name == "ladder" else "shots", "n", "mean projection", "mean read-back"]
    rows = []
    for lv in block["levels"]:
        row = [
            str(lv["level"]),
            esc(lv["label"]),
            str(lv["n"]),
            fmt(lv["mean_projection"]),
            fmt(lv["mean_readback"]),
        ]
        if has_judge:
            row.append(fmt(lv.get("mean_judge"), 1))
        rows.append(row)
    return html_table(header + (["mean judge"] if has_judge else []), rows)


def _sweep_sections(sweep: dict[str, Any] | None, folder: Path) -> list[str]:
    """The Dose-response and Example answers sections, from ``sweep.json``."""
    if not sweep:
        return [
            "<h2 id='dose-response'>Dose-response</h2>",
            "<p class='muted'>no sweep result yet: run <code>personavec sweep</code>.</p>",
            "<h2 id='examples'>Example answers</h2><p class='muted'>from a sweep only.</p>",
        ]
    uri = _dose_plot(sweep, folder / "dose_response.png")
    by = sweep["choice"].get("chosen_by", {})
    parts = [
        "<h2 id='dose-response'>Dose-response</h2>",
        f"<img alt='dose-response' src='{uri}'>",
        f"<p>Chosen by: trait = {esc(by.get('trait'))}; guard = {esc(by.get('guard'))}.</p>",
    ]
    parts += [_choice_line(kind, sweep["choice"].get(kind)) for kind in ("amplify", "suppress")]
    parts.append(_cells_table(sweep))
    agr = sweep.get("agreement", {})
    parts.append(
        "<p>Agreement across cells (Spearman): read-back vs judge trait "
        f"{fmt(agr.get('readback_vs_judge_trait'), 2)}; perplexity ratio vs judge coherence "
        f"{fmt(agr.get('ppl_ratio_vs_judge_coherence'), 2)}.</p>"
    )
    parts += [f"<p class='muted'>warning: {esc(w)}</p>" for w in sweep.get("warnings", [])]
    parts.append("<h2 id='examples'>Example answers</h2>")
    parts.append(_examples_table(sweep.get("examples", [])))
    return parts


def _choice_line(kind: str, ch: dict[str, Any] | None) -> str:
    text = (
        f"layer {ch['layer']}, coef {ch['coef']:.4g} "
        f"({100 * ch['coef_fraction_of_residual_norm']:.1f}% of residual norm): "
        f"read-back {fmt(ch['trait_readback'])} vs {fmt(ch['baseline_trait_readback'])} unsteered, "
        f"perplexity ratio {fmt(ch['ppl_ratio'], 2)}"
        if ch
        else "none passed the guard"
    )
    return f"<p><b>{kind}</b>: {esc(text)}</p>"


def _cells_table(sweep: dict[str, Any]) -> str:
    """Every sweep cell, the unsteered baselines first; the chosen cells highlighted."""
    choice = sweep["choice"]
    rows, classes = [], []
    for cell in [*sweep["baselines"].values(), *sweep["cells"]]:
        ch = choice.get(cell["condition"])
        chosen = bool(ch) and (ch["layer"], ch["coef"]) == (cell["layer"], cell["coef"])
        refused = cell["refused"]
        rows.append(
            [
                esc(cell["condition"]),
                "unsteered" if cell["layer"] == 0 else str(cell["layer"]),
                fmt(cell["coef"], 4),
                f"{100 * cell['fraction']:.1f}%",
                "refused" if refused else fmt(cell["trait"]),
                "-" if refused else fmt(cell["ppl_ratio"], 2),
                "-" if refused else fmt(cell.get("repetition"), 2),
                fmt(cell.get("judge_trait"), 1),
                fmt(cell.get("judge_coherence"), 1),
            ]
        )
        classes.append("chosen" if chosen else "")
    header = ["condition", "layer", "coef", "% residual", "trait read-back", "ppl ratio"]
    header += ["repeated 3-grams", "judge trait", "judge coh."]
    return html_table(header, rows, classes)


def _where(ex: dict[str, Any]) -> str:
    return "unsteered" if ex["layer"] == 0 else f"layer {ex['layer']}"


def _examples_table(examples: list[dict[str, Any]]) -> str:
    rows = [
        [
            esc(ex["condition"]),
            esc(_where(ex)),
            f"{100 * ex['fraction']:.1f}%",
            esc(ex["question"]),
            esc(ex["answer"]),
            fmt(ex["projection"]),
        ]
        for ex in examples
    ]
    return html_table(["condition", "steered at", "% residual", "question", "answer", "read-back"], rows)


def _heatmap_section(
    folder: Path, summary: dict[str, Any] | None, sweep: dict[str, Any] | None, lm: LoadedModel | None
) -> list[str]:
    """Per-token projections: the sweep's example answers, else held-out answers re-read by ``lm``."""
    if sweep:
        layer = sweep["readback_layer"]
        token_examples = [
            {**ex, "label": f"{ex['condition']}, {_where(ex)}, {100 * ex['fraction']:.1f}%"}
            for ex in sweep.get("examples", [])
            if ex.get("tokens")
        ]
    else:
        layer = (summary or {}).get("recommended_layer")
        token_examples = []
    if not token_examples and lm is not None and summary is not None:
        token_examples = _heldout_examples(folder, lm, summary)
    # Keep the page short: at most six answers, spread over the coefficients.
    if len(token_examples) > 6:
        step = len(token_examples) / 6
        token_examples = [token_examples[int(i * step)] for i in range(6)]
    return ["<h2 id='heatmap'>Per-token projection</h2>", token_heatmap(token_examples, int(layer or 0))]


def write_page(target: Path, trait: object, parts: list[str]) -> None:
    """Write the page atomically: a reader never sees half a report."""
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>personavec report: {esc(trait)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )
    write_atomic(target, page, mode=0o644)  # a report is meant to be shared


def write_prevent_report(folder: str | os.PathLike[str]) -> Path:
    """Write ``report.html`` for a ``prevent-experiment`` folder (its table, checks and plot).

    Args:
        folder: The experiment folder (holds ``prevent_experiment.json``).

    Returns:
        The HTML file written.

    Raises:
        PersonavecError: If the folder holds no results.
    """
    from personavec.finetune.experiment import RESULT_NAME, plot_results

    where = Path(folder)
    result = _read_json(where / RESULT_NAME)
    if not result:
        raise PersonavecError(f"{where} has no {RESULT_NAME}: run `personavec prevent-experiment` first")
    settings = result.get("settings", {})
    parts = [
        "<h1>Preventative steering experiment</h1>",
        f"<p class='muted'>vector: {esc(settings.get('vector'))}, layer {esc(settings.get('layer'))}</p>",
        "<p>Each condition is measured against the base model on the trait's evaluation questions: the "
        "finetuning shift (mean last-prompt projection), trait expression (answers read back by the base "
        "model; judge score), and the capability probe (multiple choice, neutral perplexity).</p>",
    ]
    header = [
        "condition",
        "coef",
        "shift",
        "expression",
        "judge",
        "MC accuracy",
        "MC p(correct)",
        "perplexity",
    ]
    rows = [
        [esc(n), fmt(r.get("coef")), fmt(r["shift"], 2), fmt(r["expression"], 2), fmt(r.get("judge"), 1),
         fmt(r["mc_accuracy"]), fmt(r["mc_prob"]), fmt(r["perplexity"], 2)]
        for n, r in (result.get("table") or {}).items()
    ]  # fmt: skip
    parts.append(html_table(header, rows))
    corr = result.get("correlation") or {}
    parts.append(
        f"<p>Shift against expression change over the plain fine-tunes: r = {fmt(corr.get('r'), 2)} "
        f"({esc(corr.get('points'))} points; the paper reports 0.76-0.97).</p>"
    )
    checks = result.get("checks") or {}
    parts.append(html_table(["check", "value"], [[esc(k), fmt(v)] for k, v in checks.items()]))
    try:
        png = plot_results(result, where)
        uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
        parts.append(f"<img alt='shift and expression per condition' src='{uri}'>")
    except Exception as e:  # a broken plot must not cost the table
        parts.append(f"<p class='muted'>plot not drawn: {esc(e)}</p>")
    target = where / REPORT_NAME
    write_page(target, "prevent-experiment", parts)
    return target
