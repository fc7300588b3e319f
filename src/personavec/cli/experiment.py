"""The monitoring experiment command: does the prompt projection predict the answer's trait?"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from personavec.cli import JSON_OPT, MODEL_OPT, app, emit_json, err, friendly, load, out
from personavec.core.errors import PersonavecError

if TYPE_CHECKING:
    from personavec.core.models import LoadedModel
    from personavec.core.vectors import PersonaVector
    from personavec.judging.base import Judge
    from personavec.monitor.experiment import ExperimentConfig
    from personavec.traits.spec import TraitSpec


def _r(x: Any) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


@app.command("monitor-experiment")
@friendly(resumable=True)
def monitor_experiment_cmd(
    target: str = typer.Argument(..., help="A trait name / spec file, or an extraction run folder."),
    vector: Path | None = typer.Option(
        None, "--vector", help="Vector file (default: RUN_DIR/vector.safetensors)."
    ),
    model: str | None = MODEL_OPT,
    judge: str | None = typer.Option(
        None, help="Also score answers with a trait judge: embedding, local[:MODEL], openai:M, anthropic:M."
    ),
    author: str | None = typer.Option(
        None, help="Have an LLM write the graded system prompts (openai:M, anthropic:M; default templates)."
    ),
    questions: int | None = typer.Option(None, "--questions", min=2, help="Evaluation questions per level."),
    rollouts: int | None = typer.Option(None, "--rollouts", min=1, help="Answers per (level, question)."),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", min=1, help="Answer length in tokens."
    ),
    quick: bool = typer.Option(False, "--quick", help="A small run (5 questions, 32-token answers)."),
    out_dir: Path | None = typer.Option(
        None, "--out", help="Where results go (default: the run folder; reused to resume)."
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Graded system prompts and many-shot prompts: Pearson r of last-prompt projection vs trait."""
    from personavec.cli.extract import rich_progress
    from personavec.monitor.experiment import run_monitor_experiment

    t0 = time.perf_counter()
    run_dir, vec, spec = _resolve_target(target, vector, model)
    config = _experiment_config(quick, questions, rollouts, max_new_tokens)
    lm = load(model)
    trait_judge = _load_judge(judge, spec, lm) if judge is not None else None
    folder = out_dir or run_dir
    with rich_progress() as progress:
        result = run_monitor_experiment(
            lm,
            spec,
            vec,
            folder,
            config=config,
            judge=trait_judge,
            author=author,
            examples_from=run_dir if run_dir.is_dir() else None,
            progress=progress,
        )
    _write_report(folder, lm)
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    result["folder"] = str(folder)
    if as_json:
        emit_json({k: v for k, v in result.items()})
        return
    out.print(_r_table(result, spec.name, lm.info.id))
    for name in ("ladder", "many_shot"):
        if name in result:
            out.print(_levels_table(name, result[name]["levels"], trait_judge is not None))
    err.print(f"wrote {folder / 'monitor_experiment.json'} in {result['total_seconds']} s", highlight=False)


def _resolve_target(
    target: str, vector: Path | None, model: str | None
) -> tuple[Path, PersonaVector, TraitSpec]:
    """The run folder, the persona vector and the trait spec that TARGET (and --vector) name."""
    from personavec.cli.extract import default_run_dir
    from personavec.core.vectors import PersonaVector
    from personavec.traits import load_trait
    from personavec.traits.spec import load_spec_file

    given = Path(target)
    run_dir = given if given.is_dir() else default_run_dir(target, model)
    vector_path = vector or run_dir / "vector.safetensors"
    if not vector_path.is_file():
        trait_name = given.name if given.is_dir() else given.stem
        raise PersonavecError(
            f"no persona vector at {vector_path}: run `personavec extract {trait_name}` first "
            "(or pass --vector FILE)"
        )
    vec = PersonaVector.load(vector_path)
    if (run_dir / "trait.yaml").is_file():
        spec = load_spec_file(run_dir / "trait.yaml")
    elif given.is_dir():
        spec = load_trait(vec.meta.trait)
    else:
        spec = load_trait(target)
    return run_dir, vec, spec


def _experiment_config(
    quick: bool, questions: int | None, rollouts: int | None, max_new_tokens: int | None
) -> ExperimentConfig:
    """The experiment's size and sampling: --quick or the defaults, with the flags given on top."""
    from personavec.monitor.experiment import QUICK, ExperimentConfig

    config = QUICK if quick else ExperimentConfig()
    if questions is not None:
        config = replace(config, n_questions=questions)
    if rollouts is not None:
        config = replace(config, rollouts=rollouts)
    if max_new_tokens is not None:
        config = replace(config, sampling=replace(config.sampling, max_new_tokens=max_new_tokens))
    if rollouts and rollouts > 1 and config.sampling.temperature == 0:
        err.print("note: greedy sampling makes every rollout identical")
    return config


def _load_judge(judge: str, spec: TraitSpec, lm: LoadedModel) -> Judge:
    """The trait judge --judge names, loaded behind a status line."""
    from personavec.judging import make_trait_judge

    with err.status("loading the judge ..."):
        return make_trait_judge(judge, spec, lm)


def _write_report(folder: Path, lm: LoadedModel) -> None:
    """Write the run folder's report; a failure is only a note."""
    try:
        from personavec.reports import write_report

        write_report(folder, lm=lm)
    except Exception as e:  # the results are saved; the report is a convenience
        err.print(f"note: report not written: {e}", highlight=False)


def _r_table(result: dict[str, Any], trait: str, model_id: str) -> Table:
    """The r values of every experiment and measure."""
    table = Table(title=f"monitoring '{trait}' on {model_id}, layer {result['layer']}")
    table.add_column("experiment")
    table.add_column("measure")
    table.add_column("r (samples)", justify="right")
    table.add_column("r (level means)", justify="right")
    table.add_column("r (within questions)", justify="right")
    for name in ("ladder", "many_shot"):
        if name in result:
            for measure, r in result[name]["r"].items():
                table.add_row(
                    name.replace("_", "-"),
                    measure,
                    _r(r["samples"]),
                    _r(r["levels"]),
                    _r(r.get("within_questions")),
                )
    return table


def _levels_table(name: str, levels: list[dict[str, Any]], judged: bool) -> Table:
    """One experiment's level means: projection, read-back and, when judged, the judge's score."""
    lv = Table(title=name.replace("_", "-"))
    lv.add_column("level", justify="right")
    lv.add_column("prompt")
    lv.add_column("mean projection", justify="right")
    lv.add_column("mean read-back", justify="right")
    if judged:
        lv.add_column("mean judge", justify="right")
    for level in levels:
        label = level["label"] if len(level["label"]) <= 60 else level["label"][:59] + "…"
        cells = [
            str(level["level"]),
            label,
            _fmt(level["mean_projection"]),
            _fmt(level["mean_readback"]),
        ]
        if judged:
            cells.append(_fmt(level.get("mean_judge")))
        lv.add_row(*cells)
    return lv


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
