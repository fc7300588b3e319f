"""Fine-tuning commands: ``finetune`` (LoRA with preventative steering or ablation) and ``shift``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from personavec.cli import JSON_OPT, MODEL_OPT, app, emit_json, err, friendly, load, out
from personavec.core.errors import PersonavecError


def _questions_for(vector_paths: list[str], trait: str | None) -> list[str] | None:
    """The evaluation questions of the (first) vector's trait, or None when none can be found."""
    from personavec.core.vectors import PersonaVector
    from personavec.traits import trait_for_vector

    if not vector_paths:
        return None
    path = vector_paths[0]
    return list(trait_for_vector(str(PersonaVector.load(path).meta.trait), path, trait).evaluation_questions)


@app.command("finetune")
@friendly(resumable=True)
def finetune_cmd(
    data: Path = typer.Argument(..., help="Chat JSONL, a datasets save_to_disk folder, or parquet."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder (a PEFT adapter folder)."),
    model: str | None = MODEL_OPT,
    epochs: int = typer.Option(2, help="Passes over the data."),
    lr: float = typer.Option(2e-4, help="Learning rate."),
    lora_r: int = typer.Option(16, "--lora-r", help="LoRA rank."),
    batch_size: int = typer.Option(8, help="Examples per optimizer step."),
    full: bool = typer.Option(
        False, "--full", help="Train every weight; writes a transformers model folder."
    ),
    prevent: list[str] = typer.Option(
        [], "--prevent", help="VECTOR[@LAYER][:COEF]: add the vector while training (no COEF: automatic)."
    ),
    ablate_: list[str] = typer.Option(
        [], "--ablate", help="VECTOR[@LAYER]: ablate its direction while training."
    ),
    trait: str | None = typer.Option(None, help="Trait whose evaluation questions measure the shift."),
    limit: int | None = typer.Option(None, help="Use only the first N valid examples."),
    seed: int = typer.Option(0, help="Seed for the adapter and the data order."),
    as_json: bool = JSON_OPT,
) -> None:
    """Fine-tune on chat data; --prevent steers toward a trait while training so it is not learned."""
    from personavec.finetune.data import load_chat_dataset
    from personavec.finetune.prevent import parse_intervention
    from personavec.finetune.run import finetune
    from personavec.finetune.training import TrainConfig

    if epochs < 1 or lr <= 0 or lora_r < 1 or batch_size < 1:
        raise PersonavecError("--epochs, --lr, --lora-r and --batch-size must be positive")
    dataset = load_chat_dataset(data, limit=limit)
    if dataset.skipped:
        err.print(f"skipped {len(dataset.skipped)} malformed rows: " + "; ".join(dataset.skipped_lines()[:3]))
    lm = load(model)
    shape = (lm.info.n_blocks, lm.info.hidden_size, lm.info.id)
    ivs = [parse_intervention(p, "prevent", *shape) for p in prevent]
    ivs += [parse_intervention(a, "ablate", *shape) for a in ablate_]
    questions = _questions_for([iv.path for iv in ivs], trait)
    cfg = TrainConfig(epochs=epochs, lr=lr, lora_r=lora_r, batch_size=batch_size, full=full, seed=seed)
    columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("{task.fields[info]}"), console=err) as progress:
        task = progress.add_task("training", total=cfg.steps(len(dataset)), info="")

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total, info=f"loss {loss:.3f}")

        def on_probe(coef: float, shift: float) -> None:
            err.print(f"strength trial (last third): coef {coef:.3f} -> shift {shift:+.3f}", highlight=False)

        result = finetune(
            lm, dataset.conversations(), out_dir, cfg, interventions=ivs, questions=questions,
            data_info=dataset.summary(), on_step=on_step, on_probe=on_probe,
        )  # fmt: skip
    receipt = result.receipt
    if as_json:
        emit_json({"out": str(out_dir), **receipt})
        return
    out.print(_finetune_table(receipt, out_dir))


def _finetune_table(receipt: dict[str, Any], out_dir: Path) -> Table:
    table = Table(title=f"fine-tuned -> {out_dir} ({receipt['format']})")
    table.add_column("what")
    table.add_column("value")
    losses = receipt["losses"]
    table.add_row("examples", str(receipt["data"].get("n", "?")))
    table.add_row("steps", f"{len(losses)} (resumed from {receipt['resumed_from_step']})")
    table.add_row("loss", f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "-")
    for iv in receipt["interventions"]:
        coef = "" if iv["kind"] == "ablate" else f" coef {iv['coef']:.3f}"
        table.add_row(iv["kind"], f"{iv['trait']} @ layer {iv['layer']}{coef}")
    if receipt["auto_search"]:
        search = receipt["auto_search"]
        trials = ", ".join(f"{c:.3f}: {s:+.2f}" for c, s in search["probes"])
        table.add_row(
            "automatic strength",
            f"{search['coef']:.3f} from step {search['fork_step']} (trials {trials}); "
            f"{search['trunk_coef']:.3f} from step {search['first_step']} to {search['fork_step']}",
        )
    for path, shift in receipt["shift_at_layer"].items():
        table.add_row("shift", f"{shift:+.3f} ({Path(path).name})")
    table.add_row("time", f"{receipt['seconds']:.0f}s")
    return table


@app.command("shift")
@friendly
def shift_cmd(
    base_model: str = typer.Argument(..., help="Base model: smollm2-135m, a HF id, a folder or a .gguf."),
    tuned: Path = typer.Argument(..., help="The fine-tuned model: a PEFT adapter folder or a model folder."),
    vector: list[Path] = typer.Option(..., "--vector", "-v", help="Persona vector file(s)."),
    trait: str | None = typer.Option(None, help="Trait (name or spec) whose questions to use, if not found."),
    layer: int | None = typer.Option(None, help="Layer of the headline shift (default: recommended)."),
    judge: str | None = typer.Option(None, help="Trait judge: embedding (default), openai:M, anthropic:M."),
    generate: bool = typer.Option(True, "--generate/--no-generate", help="Also measure trait expression."),
    capability: bool = typer.Option(True, "--capability/--no-capability", help="Run the capability probe."),
    mmlu: Path | None = typer.Option(None, help="A local MMLU copy for the capability probe."),
    as_json: bool = JSON_OPT,
) -> None:
    """How far fine-tuning moved a model along each persona vector, and what it cost in capability."""
    from personavec.finetune.measure import measure_shifts

    lm = load(base_model)
    report = measure_shifts(
        lm, tuned, [str(v) for v in vector], trait=trait, layer=layer, judge=judge, generate=generate,
        capability=capability, mmlu=mmlu, log=lambda m: err.print(m, highlight=False),
    )  # fmt: skip
    if as_json:
        emit_json(report)
        return
    out.print(_shift_table(report))


def _shift_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"shift: {report['tuned']} vs {report['base']}")
    for col in ("vector", "layer", "shift", "read-back base -> tuned", "judge base -> tuned"):
        table.add_column(col)
    for r in report["vectors"]:
        e = r["expression"]

        def pair(key: str, e: dict[str, Any] = e) -> str:
            b, t = (e.get("base") or {}).get(key), (e.get("tuned") or {}).get(key)
            return "-" if b is None or t is None else f"{b:.2f} -> {t:.2f} ({t - b:+.2f})"

        table.add_row(r["trait"], str(r["layer"]), f"{r['shift']:+.3f}", pair("readback"), pair("judge"))
    cap = report.get("capability")
    if cap:
        b, t = cap["base"], cap["tuned"]
        table.caption = (
            f"capability: multiple choice {b['mc']['accuracy']:.3f} -> {t['mc']['accuracy']:.3f}, "
            f"neutral perplexity {b['perplexity']:.2f} -> {t['perplexity']:.2f}"
        )
    return table


@app.command("prevent-experiment")
@friendly(resumable=True)
def prevent_experiment_cmd(
    target: str = typer.Argument(..., help="A trait name / spec file, or an extraction run folder."),
    vector: Path | None = typer.Option(
        None, "--vector", help="Vector file (default: RUN/vector.safetensors)."
    ),
    model: str | None = MODEL_OPT,
    judge: str | None = typer.Option(None, help="Trait judge: embedding (default), openai:M, anthropic:M."),
    n: int | None = typer.Option(None, "--n", min=4, help="Training examples per dataset (default 96)."),
    quick: bool = typer.Option(
        False, "--quick", help="A small run: 24 examples, strong and control, 6 questions."
    ),
    plain_only: bool = typer.Option(
        False, "--plain-only", help="Only the plain fine-tunes (strong, mild, control): shift vs expression."
    ),
    mmlu: Path | None = typer.Option(None, help="A local MMLU copy for the capability probe."),
    out_dir: Path | None = typer.Option(None, "--out", help="Results folder (default RUN/prevent; resumes)."),
    as_json: bool = JSON_OPT,
) -> None:
    """Fine-tune on the trait's own data with and without preventative steering, and compare."""
    from dataclasses import replace

    from personavec.cli.extract import default_run_dir, rich_progress
    from personavec.core.vectors import PersonaVector
    from personavec.finetune.experiment import QUICK, PreventConfig, run_prevent_experiment
    from personavec.finetune.measure import judge_fn
    from personavec.reports import write_prevent_report
    from personavec.traits import trait_for_vector

    given = Path(target)
    run_dir = given if given.is_dir() else default_run_dir(target, model)
    vector_path = vector or run_dir / "vector.safetensors"
    if not vector_path.is_file():
        name = given.name if given.is_dir() else given.stem
        raise PersonavecError(f"no persona vector at {vector_path}: run `personavec extract {name}` first")
    vec = PersonaVector.load(vector_path)
    spec = trait_for_vector(str(vec.meta.trait), vector_path, None if given.is_dir() else target)
    cfg = QUICK if quick else PreventConfig()
    cfg = replace(cfg, n=n or cfg.n, mmlu=mmlu)
    if plain_only:
        cfg = replace(cfg, prevent=False, ablate=False, steer_inference=False)
    folder = out_dir or run_dir / "prevent"
    lm = load(model)
    vec.check_model(lm.info.n_blocks, lm.info.hidden_size, lm.info.id)
    log = lambda m: err.print(m, highlight=False)  # noqa: E731
    with rich_progress() as progress:
        maker = _data_maker(lm, spec, cfg.n, folder, judge, progress, log)
        result = run_prevent_experiment(
            lm, spec, vec, str(vector_path), folder, maker, cfg, judge=judge_fn(judge, spec, lm), log=log,
        )  # fmt: skip
    report = write_prevent_report(folder)
    err.print(f"report: {report}", highlight=False)
    if as_json:
        emit_json({"folder": str(folder), "report": str(report), **result})
        return
    out.print(_prevent_table(result))


def _data_maker(lm: Any, spec: Any, n: int, folder: Path, judge: str | None, progress: Any, log: Any) -> Any:
    """Makes each training set once (kept in FOLDER/data/KIND.jsonl and reused on a rerun)."""
    from personavec.finetune.trait_data import DataConfig, make_trait_dataset
    from personavec.judging import make_coherence_judge, make_trait_judge

    def make(kind: str) -> Path:
        path = folder / "data" / f"{kind}.jsonl"
        if path.is_file():
            return path
        log(f"making the {kind} training set ({n} examples) ...")
        cfg = DataConfig(n=n, strength="mild" if kind == "mild" else "strong", control=kind == "control")
        make_trait_dataset(
            lm, spec, cfg, trait_judge=make_trait_judge(judge, spec, lm),
            coherence_judge=make_coherence_judge(None, lm), out=path, progress=progress,
        )  # fmt: skip
        return path

    return make


def _prevent_table(result: dict[str, Any]) -> Table:
    table = Table(title="preventative steering experiment (changes against the base model)")
    for col in ("condition", "coef", "shift", "expression", "judge", "MC acc", "perplexity"):
        table.add_column(col)

    def f(x: Any, spec: str = "+.2f") -> str:
        return "-" if x is None else format(x, spec)

    for name, r in result.get("table", {}).items():
        cells = [
            f(r["coef"], ".3f"),
            f(r["shift"]),
            f(r["expression"]),
            f(r["judge"]),
            f(r["mc_accuracy"], ".3f"),
        ]
        table.add_row(name, *cells, f(r["perplexity"], ".2f"))
    corr = result.get("correlation") or {}
    table.caption = (
        f"shift vs expression change across datasets: r = {f(corr.get('r'))} ({corr.get('points')} points)"
    )
    return table
