"""Steering commands: try a vector on a prompt, chat with it, sweep its strength, and report a run."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from personavec.cli import (
    JSON_OPT,
    app,
    emit_json,
    err,
    friendly,
    load,
    load_vector_and_model,
    out,
    parse_layers,
)
from personavec.core.errors import PersonavecError

VECTOR_ARG = typer.Argument(
    ..., help="A vector .safetensors file (e.g. runs/evil-smollm2-135m/vector.safetensors)."
)
MODEL_OPT_V = typer.Option(
    None, "--model", "-m", help="Model to steer (default: the one the vector was made on)."
)


def _warn_large(vector: Any, layer: int, coef: float, norms: dict[int, float]) -> float:
    from personavec.steer.sweep import MAX_NORM_MULTIPLE, fraction_of_norm, too_large

    frac = fraction_of_norm(vector, layer, coef, norms)
    if too_large(frac):
        err.print(
            f"warning: coef {coef:g} adds {abs(frac):.1f}x the residual norm at layer {layer}; the steered "
            f"stream can exceed {MAX_NORM_MULTIPLE:g}x its usual norm "
            "(expect gibberish; the sweep refuses this)",
            highlight=False,
        )
    return frac


@app.command("steer")
@friendly
def steer_cmd(
    vector_path: Path = VECTOR_ARG,
    prompt: str = typer.Option(..., "--prompt", "-p", help="User message to answer."),
    layer: int | None = typer.Option(None, help="Layer to steer (default: the vector's stored choice)."),
    coef: list[float] | None = typer.Option(
        None, "--coef", help="Strength in vector units; repeat for several (default: stored choice)."
    ),
    positions: str = typer.Option("all", help="Where to add the vector: all, prompt or response."),
    system: str | None = typer.Option(None, help="Optional system prompt."),
    model: str | None = MODEL_OPT_V,
    max_new_tokens: int = typer.Option(64, min=1, help="Answer length in tokens."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy; else sampled with --seed."),
    seed: int = typer.Option(0, help="Sampling seed, the same for every answer."),
    as_json: bool = JSON_OPT,
) -> None:
    """Answer a prompt unsteered and steered, side by side (same seed)."""
    from personavec.core.generation import SamplingParams, generate
    from personavec.core.layers import check_layers
    from personavec.core.steering import check_positions, steer
    from personavec.steer.readback import read_back
    from personavec.steer.sweep import readback_layer, residual_norms, steering_defaults

    if not prompt.strip():
        raise PersonavecError("the prompt is empty: pass --prompt 'your question'")
    if system is not None and not system.strip():
        raise PersonavecError("the system prompt is empty: drop --system or give it text")
    check_positions(positions)
    vector, lm = load_vector_and_model(vector_path, model)
    if layer is not None:
        check_layers([layer], lm.info.n_blocks, allow_embeddings=False)
    rb_layer = readback_layer(vector)
    defaults = steering_defaults(lm, vector)
    chosen_layer = int(layer if layer is not None else defaults["layer"])
    norms = residual_norms(lm, sorted({chosen_layer, rb_layer}))
    if coef:
        coefs = [float(c) for c in coef]
        source = "given"
    elif layer is not None and layer != defaults["layer"]:
        # A stored coefficient belongs to its own layer; keep the same share of this layer's norm.
        from personavec.steer.sweep import DEFAULT_STEER_FRACTION, coef_for_fraction

        frac = defaults["fraction"] if defaults["fraction"] is not None else DEFAULT_STEER_FRACTION
        coefs = [coef_for_fraction(vector, chosen_layer, float(frac), norms)]
        source = f"{100 * float(frac):.1f}% of the residual norm at layer {chosen_layer}"
    else:
        coefs = [float(defaults["coef"])]
        source = str(defaults["source"])
    if any(not math.isfinite(c) for c in coefs):
        raise PersonavecError("coefficients must be finite numbers")
    fracs = [_warn_large(vector, chosen_layer, c, norms) for c in coefs]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    conv = [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": prompt}]
    with err.status("generating ..."):
        answers = generate(lm, [conv], params, seeds=[seed])
        for c in coefs:
            with steer(lm, vector, layers=chosen_layer, coef=c, positions=positions):
                answers += generate(lm, [conv], params, seeds=[seed])
        rb = read_back(lm, vector, [(prompt, a) for a in answers], rb_layer)
    rows: list[dict[str, Any]] = [
        {
            "coef": 0.0 if i == 0 else coefs[i - 1],
            "fraction_of_residual_norm": 0.0 if i == 0 else fracs[i - 1],
            "answer": a,
            "readback": rb.projection[i],
        }
        for i, a in enumerate(answers)
    ]
    data = {
        "prompt": prompt,
        "system": system,
        "layer": chosen_layer,
        "positions": positions,
        "coef_source": source,
        "readback_layer": rb_layer,
        "residual_norm": norms[chosen_layer],
        "model": lm.info.id,
        "answers": rows,
    }
    if as_json:
        emit_json(data)
        return
    table = Table(title=f"{vector.meta.trait} at layer {chosen_layer} ({source})", show_lines=True)
    table.add_column("coef")
    table.add_column("% resid.", justify="right")
    table.add_column(f"read-back L{rb_layer}", justify="right")
    table.add_column("answer")
    for r in rows:
        table.add_row(
            "unsteered" if r["coef"] == 0 else f"{r['coef']:.4g}",
            f"{100 * r['fraction_of_residual_norm']:.1f}",
            f"{r['readback']:.3f}",
            str(r["answer"]),
        )
    out.print(table)


@app.command()
@friendly
def chat(
    vector_path: Path = VECTOR_ARG,
    layer: int | None = typer.Option(None, help="Layer to steer (default: the vector's stored choice)."),
    coef: float | None = typer.Option(None, help="Strength in vector units (default: stored choice)."),
    system: str | None = typer.Option(None, help="Optional system prompt."),
    model: str | None = MODEL_OPT_V,
    max_new_tokens: int = typer.Option(96, min=1, help="Reply length in tokens."),
) -> None:
    """Chat with the vector applied; each reply's read-back projection is shown. Empty line ends."""
    from personavec.core.generation import SamplingParams, generate
    from personavec.core.layers import check_layers
    from personavec.core.steering import steer
    from personavec.steer.readback import read_back
    from personavec.steer.sweep import readback_layer, residual_norms, steering_defaults

    vector, lm = load_vector_and_model(vector_path, model)
    if layer is not None:
        check_layers([layer], lm.info.n_blocks, allow_embeddings=False)
    defaults = steering_defaults(lm, vector)
    use_layer = int(layer if layer is not None else defaults["layer"])
    use_coef = float(coef if coef is not None else defaults["coef"])
    rb_layer = readback_layer(vector)
    _warn_large(vector, use_layer, use_coef, residual_norms(lm, [use_layer]))
    err.print(
        f"steering '{vector.meta.trait}' at layer {use_layer} with coef {use_coef:.4g}; "
        "empty line or Ctrl-D ends",
        highlight=False,
    )
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    params = SamplingParams(max_new_tokens=max_new_tokens)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        with steer(lm, vector, layers=use_layer, coef=use_coef):
            reply = generate(lm, [history], params)[0]
        history.append({"role": "assistant", "content": reply or "..."})
        proj = read_back(lm, vector, [(line, reply)], rb_layer).projection[0]
        out.print(f"model> {reply}", highlight=False, markup=False)
        err.print(f"[dim](read-back at layer {rb_layer}: {proj:.3f})[/]", highlight=False)


def _trait_for(vector: Any, vector_path: Path, trait: str | None) -> Any:
    from personavec.traits import trait_for_vector

    return trait_for_vector(str(vector.meta.trait), vector_path, trait)


def _parse_coefs(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PersonavecError(f"cannot parse coefficients '{text}': use e.g. 1,2,4") from None
    if not vals or any(not math.isfinite(v) for v in vals):
        raise PersonavecError(f"cannot parse coefficients '{text}': give finite numbers, e.g. 1,2,4")
    return vals


@app.command("sweep")
@friendly(resumable=True)
def sweep_cmd(
    vector_path: Path = VECTOR_ARG,
    trait: str | None = typer.Option(None, help="Trait name or spec file (default: the vector's trait)."),
    layers: str | None = typer.Option(None, help="Steering layers, e.g. 10,14 or 8-12 (default: derived)."),
    coefs: str | None = typer.Option(
        None, help="Positive coefficients in vector units, e.g. 2,4,8 (default: shares of residual norm)."
    ),
    judge: str | None = typer.Option(
        None,
        help="Trait judge (embedding, local[:M], openai:M, anthropic:M); also enables a coherence judge.",
    ),
    coherence_judge: str | None = typer.Option(
        None, "--coherence-judge", help="Coherence judge (default with --judge: perplexity)."
    ),
    quick: bool = typer.Option(False, "--quick", help="2 layers x 3 coefficients x 5 questions, 32 tokens."),
    n_questions: int | None = typer.Option(None, min=1, help="Evaluation questions to use."),
    max_new_tokens: int | None = typer.Option(None, min=1, help="Answer length in tokens."),
    out_dir: Path | None = typer.Option(None, "--out", help="Folder for sweep.json, cache and report."),
    model: str | None = MODEL_OPT_V,
    as_json: bool = JSON_OPT,
) -> None:
    """Sweep layers x coefficients, choose a setting, store it in the vector file, write the report."""
    from personavec.cli.extract import rich_progress
    from personavec.core.generation import SamplingParams
    from personavec.core.store import JsonlStore
    from personavec.judging import make_coherence_judge, make_trait_judge
    from personavec.reports import write_report
    from personavec.steer.sweep import DEFAULT_FRACTIONS, QUICK_FRACTIONS, default_layers, sweep, with_choice

    coef_list = _parse_coefs(coefs)
    layer_list = parse_layers(layers)
    vector, lm = load_vector_and_model(vector_path, model)
    spec = _trait_for(vector, vector_path, trait)
    target = out_dir or vector_path.parent
    target.mkdir(parents=True, exist_ok=True)
    if not (target / "trait.yaml").is_file():
        (target / "trait.yaml").write_text(spec.to_yaml(), encoding="utf-8")
    tj = cj = None
    if judge is not None or coherence_judge is not None:
        with err.status("loading judges ..."):
            tj = make_trait_judge(judge, spec, lm) if judge is not None else None
            cj = make_coherence_judge(coherence_judge, lm)
    params = SamplingParams(max_new_tokens=max_new_tokens or (32 if quick else 64))
    n_q = n_questions or (5 if quick else len(spec.evaluation_questions))
    n_layers = len(layer_list) if layer_list else len(default_layers(vector, quick=quick))
    n_coefs = len(coef_list) if coef_list else len(QUICK_FRACTIONS if quick else DEFAULT_FRACTIONS)
    n_cells = 2 * (1 + n_layers * n_coefs)
    logging.captureWarnings(True)
    with rich_progress() as progress:
        result = sweep(
            lm,
            vector,
            spec,
            layers=layer_list,
            coefs=coef_list,
            store=JsonlStore(target / "sweep.jsonl"),
            trait_judge=tj,
            coherence_judge=cj,
            n_questions=n_q,
            params=params,
            on_progress=progress("steered answers", n_cells * n_q),
            quick=quick,
        )
    for w in result.warnings:
        err.print(f"warning: {w}", highlight=False)
    data = result.to_dict()
    tmp = target / ".sweep.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    tmp.replace(target / "sweep.json")
    with_choice(vector, result).save(vector_path)
    try:
        report = write_report(target, lm=lm)
        data["report"] = str(report)
    except Exception as e:  # the sweep's results are saved; a plotting failure must not hide them
        err.print(f"warning: report not written: {e}", highlight=False)
    data["vector_file"] = str(vector_path)
    if as_json:
        emit_json(data)
        return
    _print_sweep(result, judged=tj is not None or cj is not None)
    err.print(f"choice written to {vector_path}; results in {target / 'sweep.json'}", highlight=False)
    if "report" in data:
        err.print(f"report: {data['report']}", highlight=False)


def _print_sweep(result: Any, *, judged: bool) -> None:
    table = Table(title=f"steering sweep (trait read-back at layer {result.readback_layer})")
    for col in ("condition", "layer", "coef", "% resid.", "trait read-back", "ppl ratio", "repeats"):
        table.add_column(col, justify="right" if col not in ("condition",) else "left")
    if judged:
        table.add_column("judge trait", justify="right")
        table.add_column("judge coh.", justify="right")
    for cell in [*result.baselines.values(), *result.cells]:
        ch = result.choice.get(cell.condition)
        mark = " *" if ch and (ch["layer"], ch["coef"]) == (cell.layer, cell.coef) else ""
        row = [
            cell.condition + mark,
            "-" if cell.layer == 0 else str(cell.layer),
            f"{cell.coef:.4g}",
            f"{100 * cell.fraction:.1f}",
            "refused" if cell.refused else f"{cell.trait:.3f}",
            "-" if cell.refused else f"{cell.ppl_ratio:.2f}",
            "-" if cell.refused else f"{cell.repetition:.2f}",
        ]
        if judged:
            row += [
                "-" if cell.judge_trait is None else f"{cell.judge_trait:.1f}",
                "-" if cell.judge_coherence is None else f"{cell.judge_coherence:.1f}",
            ]
        table.add_row(*row)
    out.print(table)
    for kind in ("amplify", "suppress"):
        ch = result.choice.get(kind)
        if ch:
            out.print(
                f"{kind}: layer {ch['layer']}, coef {ch['coef']:.4g} "
                f"({100 * ch['coef_fraction_of_residual_norm']:.1f}% of residual norm): read-back "
                f"{ch['baseline_trait_readback']:.3f} -> {ch['trait_readback']:.3f}, "
                f"ppl ratio {ch['ppl_ratio']:.2f}",
                highlight=False,
            )
        else:
            out.print(f"{kind}: no cell changed the trait while passing the coherence guard", highlight=False)
    by = result.choice["chosen_by"]
    out.print(f"chosen by: {by['trait']}; guard: {by['guard']}", highlight=False)
    agr = result.agreement
    if any(v is not None for v in agr.values()):
        out.print(
            "agreement (Spearman across cells): "
            + ", ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in agr.items()),
            highlight=False,
        )


@app.command()
@friendly
def report(
    run_dir: Path = typer.Argument(..., help="A run folder (from extract and/or sweep)."),
    out_file: Path | None = typer.Option(None, "--out", help="HTML file (default RUN_DIR/report.html)."),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Model for the token heatmap when no sweep stored one (default: the run's).",
    ),
    no_model: bool = typer.Option(
        False, "--no-model", help="Do not load a model (no heatmap without a sweep)."
    ),
) -> None:
    """Write one self-contained offline HTML report for a run folder."""
    from personavec.core.models import EMBEDDED_ID
    from personavec.reports import write_report

    lm = None
    sweep_file = run_dir / "sweep.json"
    has_tokens = sweep_file.is_file() and '"tokens"' in sweep_file.read_text(encoding="utf-8")
    if not no_model and not has_tokens and (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        run_model = summary.get("model", {}).get("id")
        lm = load(model or (None if run_model in (None, EMBEDDED_ID) else run_model))
    path = write_report(run_dir, lm=lm, out=out_file)
    out.print(str(path), highlight=False)
