"""Monitoring commands: read traits off a prompt before the model answers, and calibrate vectors."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.color import Color
from rich.style import Style
from rich.table import Table
from rich.text import Text

from personavec.cli import JSON_OPT, MODEL_OPT, app, emit_json, err, friendly, load, out, parse_layers
from personavec.core.errors import PersonavecError

if TYPE_CHECKING:
    from personavec.core.models import LoadedModel
    from personavec.core.vectors import PersonaVector
    from personavec.monitor.monitoring import MonitorRecord

_LOW = (66, 133, 244)  # blue: below the answer's median projection
_MID = (170, 170, 170)  # grey: at the median
_HIGH = (230, 57, 70)  # red: above it


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> Color:
    return Color.from_rgb(*(round(x + (y - x) * t) for x, y in zip(a, b)))


def colour_tokens(tokens: Sequence[str], values: Sequence[float]) -> Text:
    """Tokens coloured on a diverging blue-grey-red scale around the median of ``values``.

    Centred on the answer's own median (raw projections carry a model-specific offset, so 0 means
    nothing) and scaled by the largest deviation, so the tokens that stand out in *this* answer show.
    """
    text = Text()
    if not tokens:
        return text
    centre = statistics.median(values)
    spread = max(abs(v - centre) for v in values) or 1.0
    for tok, v in zip(tokens, values):
        t = max(-1.0, min(1.0, (v - centre) / spread))
        colour = _mix(_MID, _HIGH, t) if t >= 0 else _mix(_MID, _LOW, -t)
        text.append(tok, style=Style(color=colour, bold=abs(t) > 0.6))
    return text


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _preview(conversation: Sequence[dict[str, str]], width: int = 48) -> str:
    last = " ".join(conversation[-1]["content"].split())
    return last if len(last) <= width else last[: width - 1] + "…"


@app.command("monitor")
@friendly
def monitor_cmd(
    vectors: list[Path] = typer.Argument(..., help="Vector files (.safetensors) to read."),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="One user message to monitor."),
    file: Path | None = typer.Option(
        None, "--file", "-f", help="JSONL file: one conversation (list of {role, content}) per line."
    ),
    system: str | None = typer.Option(
        None, "--system", help="System prompt (with --file: added to conversations that have none)."
    ),
    model: str | None = MODEL_OPT,
    layer: str | None = typer.Option(
        None, "--layer", help="Layer(s) for every vector, e.g. 15 or 12,15 (default: recommended layer)."
    ),
    generate: bool = typer.Option(False, "--generate", help="Also generate the answer and trace its tokens."),
    max_new_tokens: int = typer.Option(48, min=1, help="Answer length in tokens (with --generate)."),
    as_json: bool = JSON_OPT,
) -> None:
    """Project the last prompt token onto each vector: raw, z and percentile per trait."""
    from personavec.core.generation import SamplingParams
    from personavec.core.vectors import PersonaVector
    from personavec.monitor.monitoring import monitor

    if (prompt is None) == (file is None):
        raise PersonavecError("pass exactly one of --prompt TEXT or --file conversations.jsonl")
    vecs = [PersonaVector.load(p) for p in vectors]
    convs, lines, errors = _conversations(prompt, file, system)
    lm = load(model)
    _warn_other_weights(vectors, vecs, lm)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    with err.status("generating and tracing ..." if generate else "reading activations ..."):
        records = monitor(lm, vecs, convs, layers=parse_layers(layer), generate=generate, params=params)

    notes = _notes(records, vectors)
    if as_json:
        rows = _json_rows(records, vectors, lines)
        emit_json({"model": lm.info.id, "records": rows, "errors": errors, "notes": notes})
        _print_notes(notes)
        return
    out.print(_readings_table(records, convs, lines if file is not None else None, lm.info.id))
    if generate:
        _print_token_traces(records)
    _print_notes(notes)


def _conversations(
    prompt: str | None, file: Path | None, system: str | None
) -> tuple[list[list[dict[str, str]]], list[int | None], list[str]]:
    """The conversations to read, each one's line in ``file`` (``None`` for --prompt), and bad lines."""
    from personavec.monitor.monitoring import read_jsonl_with_lines

    errors: list[str] = []
    lines: list[int | None]
    if prompt is not None:
        convs = [[{"role": "user", "content": prompt}]]
        lines = [None]
    else:
        assert file is not None
        good, errors = read_jsonl_with_lines(file)
        for line in errors:
            err.print(f"[yellow]skipped[/] {line}", highlight=False, soft_wrap=True)
        if not good:
            raise PersonavecError(f"no usable conversations in {file} ({len(errors)} bad line(s))")
        lines = [n for n, _c in good]
        convs = [c for _n, c in good]
    if system is not None:
        convs = [
            c if c[0]["role"] == "system" else [{"role": "system", "content": system}, *c] for c in convs
        ]
    return convs, lines, errors


def _warn_other_weights(paths: Sequence[Path], vecs: Sequence[PersonaVector], lm: LoadedModel) -> None:
    """Warn about vectors made on a model of the same shape but other weights."""
    for path, v in zip(paths, vecs):
        if v.meta.model_fingerprint != lm.info.fingerprint and (v.meta.n_blocks, v.meta.hidden_size) == (
            lm.info.n_blocks,
            lm.info.hidden_size,
        ):
            err.print(
                f"warning: {path} was made on {v.meta.model_id}, not on {lm.info.id} (same shape, other "
                "weights): its projections may mean little here",
                highlight=False,
                soft_wrap=True,
            )


def _notes(records: Sequence[MonitorRecord], vectors: Sequence[Path]) -> list[str]:
    """The records' notes, once each, in order, naming the vector file."""
    notes: dict[str, None] = {}
    for r in records:
        if r.note is not None:
            notes[r.note.replace("VECTOR", str(vectors[r.vector]))] = None
    return list(notes)


def _print_notes(notes: Sequence[str]) -> None:
    for note in notes:
        err.print(f"note: {note}", highlight=False, soft_wrap=True)


def _json_rows(
    records: Sequence[MonitorRecord], vectors: Sequence[Path], lines: Sequence[int | None]
) -> list[dict[str, Any]]:
    """The records as JSON objects, with their vector file and, for --file, their line."""
    rows: list[dict[str, Any]] = []
    for r in records:
        row = {**r.to_dict(), "vector_file": str(vectors[r.vector])}
        if lines[r.conversation] is not None:
            row["line"] = lines[r.conversation]
        rows.append(row)
    return rows


def _readings_table(
    records: Sequence[MonitorRecord],
    convs: Sequence[Sequence[dict[str, str]]],
    lines: Sequence[int | None] | None,
    model_id: str,
) -> Table:
    """One row per reading; ``lines`` (with --file) adds a line column."""
    table = Table(title=f"trait readings before the answer ({model_id})")
    table.add_column("#", justify="right")
    if lines is not None:
        table.add_column("line", justify="right")
    table.add_column("prompt")
    table.add_column("trait")
    table.add_column("layer", justify="right")
    table.add_column("raw", justify="right")
    table.add_column("z", justify="right")
    table.add_column("percentile", justify="right")
    for r in records:
        cells = [str(r.conversation)]
        if lines is not None:
            cells.append(str(lines[r.conversation]))
        cells += [
            _preview(convs[r.conversation]),
            r.trait,
            str(r.layer),
            f"{r.projection:.3f}",
            _fmt(r.z, "+.2f"),
            _fmt(r.percentile, ".1f"),
        ]
        table.add_row(*cells)
    return table


def _print_token_traces(records: Sequence[MonitorRecord]) -> None:
    """Each generated answer with its tokens coloured by their projection."""
    out.print("token colours: blue = below this answer's median projection, red = above", style="dim")
    for r in records:
        assert r.tokens is not None and r.token_projections is not None
        head = Text(
            f"[{r.conversation}] {r.trait} @ layer {r.layer}, response mean {_fmt(r.response_mean, '.3f')}: ",
            style="bold",
        )
        out.print(head + colour_tokens(r.tokens, r.token_projections))


@app.command("calibrate")
@friendly
def calibrate_cmd(
    vector: Path = typer.Argument(..., help="Vector file (.safetensors) to calibrate."),
    model: str | None = MODEL_OPT,
    layer: str | None = typer.Option(
        None, "--layer", help="Extra layer(s) to calibrate; required if the vector has no recommended layer."
    ),
    out_path: Path | None = typer.Option(None, "--out", help="Write here instead of rewriting VECTOR."),
    as_json: bool = JSON_OPT,
) -> None:
    """Measure the projection on built-in neutral prompts, so that monitoring gives z and percentile."""
    from personavec.core.vectors import PersonaVector
    from personavec.monitor.monitoring import calibrate

    v = PersonaVector.load(vector)
    lm = load(model)
    with err.status("projecting neutral prompts ..."):
        calibrated = calibrate(lm, v, layers=parse_layers(layer))
    target = calibrated.save(out_path or vector)
    err.print(f"wrote {target}", highlight=False)
    cal = calibrated.meta.extra["calibration"]
    summary = {
        "path": str(target),
        "trait": v.meta.trait,
        "model": lm.info.id,
        "model_fingerprint": cal["model_fingerprint"],
        "prompt_set": cal["prompt_set"],
        "prompt_set_sha256": cal["prompt_set_sha256"],
        "layers": {k: {s: e[s] for s in ("mean", "std", "n")} for k, e in cal["layers"].items()},
    }
    if as_json:
        emit_json(summary)
        return
    table = Table(title=f"calibration of '{v.meta.trait}' on {lm.info.id} ({cal['prompt_set']})")
    table.add_column("layer", justify="right")
    table.add_column("mean", justify="right")
    table.add_column("std", justify="right")
    table.add_column("n", justify="right")
    for k, e in summary["layers"].items():
        table.add_row(k, f"{e['mean']:.3f}", f"{e['std']:.3f}", str(e["n"]))
    out.print(table)
