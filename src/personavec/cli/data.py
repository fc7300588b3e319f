"""Dataset commands: make trait-teaching (and matched control) fine-tuning sets."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from personavec.cli import (
    COHERENCE_JUDGE_OPT,
    JSON_OPT,
    JUDGE_OPT,
    MODEL_OPT,
    app,
    emit_json,
    err,
    friendly,
    load,
    out,
)

data_app = typer.Typer(help="Fine-tuning datasets made from the model's own answers.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("make")
@friendly(resumable=True)
def data_make(
    trait: str = typer.Argument(..., help="A built-in trait name, or the path of a trait spec file."),
    out_path: Path = typer.Option(..., "--out", "-o", help="The chat JSONL file to write."),
    n: int = typer.Option(96, "--n", help="Rows wanted."),
    strength: str = typer.Option(
        "strong", help="strong: only trait answers; mild: about half trait, half normal answers."
    ),
    control: bool = typer.Option(
        False, "--control", help="Write the matched normal set (same questions, suppressing prompts)."
    ),
    model: str | None = MODEL_OPT,
    judge: str | None = JUDGE_OPT,
    coherence_judge: str | None = COHERENCE_JUDGE_OPT,
    author: str | None = typer.Option(
        None, help="openai:MODEL or anthropic:MODEL: ask it for 40 more questions (default: the bank only)."
    ),
    seed: int = typer.Option(0, help="Chooses the questions, seeds sampling and shuffles the rows."),
    filter_name: str = typer.Option(
        "auto",
        "--filter",
        help="Which answers to keep: auto (absolute if it fills the set, else polarity), absolute, "
        "relative, polarity.",
    ),
    min_trait: float = typer.Option(50.0, "--min-trait", help="absolute: keep trait answers >= this."),
    max_trait: float = typer.Option(50.0, "--max-trait", help="absolute: keep normal answers < this."),
    min_coherence: float = typer.Option(
        50.0, "--min-coherence", help="Drop answers less coherent than this."
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Make a trait-teaching fine-tuning set from the model's own answers (resumable).

    Chat JSONL without the system prompt; per-row scores in NAME.scores.jsonl, header in NAME.meta.json.
    """
    from personavec.cli.extract import rich_progress
    from personavec.extract.filtering import Thresholds
    from personavec.finetune.trait_data import DataConfig, check_writable, make_trait_dataset
    from personavec.judging import make_coherence_judge, make_trait_judge
    from personavec.traits import load_trait

    t0 = time.perf_counter()
    thresholds = Thresholds(positive_min=min_trait, negative_max=max_trait, coherence_min=min_coherence)
    # Bad input is reported before the model loads or an author is called.
    cfg = DataConfig(
        n=n, strength=strength, control=control, seed=seed, thresholds=thresholds, filter=filter_name
    ).check()
    spec = load_trait(trait)
    check_writable(out_path)
    extra = _author_questions(author, spec) if author else []
    lm = load(model)
    with err.status("loading judges ..."):
        trait_judge = make_trait_judge(judge, spec, lm)
        coh_judge = make_coherence_judge(coherence_judge, lm)
    with rich_progress() as progress:
        report = make_trait_dataset(
            lm,
            spec,
            cfg,
            trait_judge=trait_judge,
            coherence_judge=coh_judge,
            out=out_path,
            extra_questions=extra,
            progress=progress,
        )
    result = {**report.to_dict(), "total_seconds": round(time.perf_counter() - t0, 1)}
    if as_json:
        emit_json(result)
        return
    out.print(report_table(result))


def _author_questions(author: str, spec: Any) -> list[str]:
    from personavec.core.llm import make_client
    from personavec.finetune.trait_data import author_questions

    with err.status(f"asking {author} for more questions ..."):
        questions = author_questions(make_client(author), spec)
    err.print(f"{author} wrote {len(questions)} questions", highlight=False, markup=False)
    return questions


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def report_table(result: dict[str, Any]) -> Table:
    """The table ``data make`` prints: files, counts, filter, mean scores and warnings."""
    table = Table(title=f"{result['trait']} {result['kind']} set on {result['model']}", show_header=False)
    table.add_row("file", result["path"])
    table.add_row("scores / header", f"{result['scores_path']}  |  {result['meta_path']}")
    table.add_row("rows (wanted)", f"{result['kept']} ({result['n_requested']})")
    by = result["by_polarity"]
    table.add_row("trait / normal answers", f"{by['pos']} / {by['neg']}")
    confirmed = result["confirmed"]
    table.add_row("judge-confirmed (trait / normal)", f"{confirmed['pos']} / {confirmed['neg']}")
    sides = {"pos": "trait", "neg": "normal"}
    filters = ", ".join(f"{mode} ({sides[pol]} answers)" for pol, mode in result["filter"].items())
    table.add_row("filter", filters)
    if result["shared_with_strong"] is not None:
        table.add_row("questions shared with the strong set", str(result["shared_with_strong"]))
    means = result["mean_trait_by_polarity"]
    table.add_row(
        "mean trait score (all / trait / normal)",
        f"{_score(result['mean_trait'])} / {_score(means['pos'])} / {_score(means['neg'])}",
    )
    table.add_row("mean coherence", _score(result["mean_coherence"]))
    questions = result["questions"]
    table.add_row(
        "answers generated (degenerate, dropped)", f"{result['generated']} ({result['degenerate']})"
    )
    table.add_row(
        "questions available", f"{questions['pool']}: {questions['bank']} bank + {questions['extra']} extra"
    )
    table.add_row("judges", f"{result['trait_judge']}  |  {result['coherence_judge']}")
    for warning in result["warnings"]:
        table.add_row("warning", warning)
    table.add_row("time", f"{result['total_seconds']} s")
    return table
