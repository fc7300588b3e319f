"""The extraction command: describe a trait, get a persona vector."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
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
    parse_layers,
)


@contextmanager
def rich_progress() -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """A progress factory drawing one rich bar per stage on stderr."""
    columns = (
        TextColumn("{task.description:<34}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:

        def factory(label: str, total: int) -> Callable[[int], None]:
            task = progress.add_task(label, total=total)
            return lambda n: progress.advance(task, n)

        yield factory


def default_run_dir(trait: str, model: str | None) -> Path:
    """The run folder ``runs/TRAIT-MODEL`` that ``extract`` writes when ``--out`` is not given."""
    short = re.sub(r"[^A-Za-z0-9_.-]+", "-", (model or "smollm2-135m").rstrip("/").split("/")[-1])
    return Path("runs") / f"{Path(trait).stem}-{short}"


@app.command()
@friendly(resumable=True)
def extract(
    trait: str = typer.Argument(..., help="A built-in trait name, or the path of a trait spec file."),
    model: str | None = MODEL_OPT,
    judge: str | None = JUDGE_OPT,
    coherence_judge: str | None = COHERENCE_JUDGE_OPT,
    author: str | None = typer.Option(
        None,
        help="With --description: who writes the artifacts (openai:M, anthropic:M; default offline).",
    ),
    description: str | None = typer.Option(
        None, help="Make a new trait named TRAIT from this one-sentence description."
    ),
    out_dir: Path | None = typer.Option(
        None, "--out", help="Run folder (default runs/TRAIT-MODEL); reused to resume."
    ),
    rollouts: int = typer.Option(1, min=1, help="Answers per (prompt pair, polarity, question)."),
    layers: str | None = typer.Option(None, help="Layers the recommendation may pick from, e.g. 8-24."),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="A small run for demos and CI (2 pairs x 8 questions; 3 x 20 for a template-written trait).",
    ),
    max_new_tokens: int | None = typer.Option(None, min=1, help="Answer length in tokens."),
    filter_name: str = typer.Option(
        "auto",
        "--filter",
        help="Which answers to keep: auto (absolute, else polarity), absolute, relative, polarity.",
    ),
    min_trait: float = typer.Option(
        50.0, "--min-trait", help="absolute: keep trait-prompted answers >= this."
    ),
    max_trait: float = typer.Option(50.0, "--max-trait", help="absolute: keep suppressed answers < this."),
    min_coherence: float = typer.Option(
        50.0, "--min-coherence", help="Drop answers less coherent than this."
    ),
    margin: float = typer.Option(
        10.0, help="relative: a trait-prompted answer must outscore its twin by this many points."
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Build a trait's vector: generate, judge, filter, extract and evaluate (resumable)."""
    from dataclasses import replace

    from personavec.extract.filtering import Thresholds, make_filter
    from personavec.extract.pipeline import RunConfig, quick_config, run_extraction
    from personavec.judging import make_coherence_judge, make_trait_judge
    from personavec.traits import build_artifacts, load_trait

    t0 = time.perf_counter()
    if description is not None:
        spec = build_artifacts(trait, description, author)
        err.print(f"built artifacts for '{spec.name}' with {spec.metadata.get('author', 'template')}")
    else:
        if author is not None:
            err.print("note: --author only applies with --description (a new trait); ignored")
        spec = load_trait(trait)
    thresholds = Thresholds(
        positive_min=min_trait, negative_max=max_trait, coherence_min=min_coherence, margin=margin
    )
    config = quick_config(spec) if quick else RunConfig()
    config = replace(
        config,
        rollouts=rollouts,
        candidate_layers=parse_layers(layers),
        thresholds=thresholds,
        filter=make_filter(filter_name, thresholds),
    )
    if max_new_tokens is not None:
        config = replace(config, sampling=replace(config.sampling, max_new_tokens=max_new_tokens))
    lm = load(model)
    with err.status("loading judges ..."):
        trait_judge = make_trait_judge(judge, spec, lm)
        coh_judge = make_coherence_judge(coherence_judge, lm)
    target = out_dir or default_run_dir(spec.name, model)
    with rich_progress() as progress:
        result = run_extraction(
            lm,
            spec,
            target,
            trait_judge=trait_judge,
            coherence_judge=coh_judge,
            config=config,
            progress=progress,
        )
    summary = result.summary
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    if as_json:
        emit_json(summary)
        return
    out.print(summary_table(summary, f"{spec.name} on {lm.info.id}", result.out_dir))


def summary_table(summary: dict[str, Any], title: str, run_dir: Path) -> Table:
    """The extraction summary as the table ``extract`` prints (counts, layer, quality, warnings)."""
    from personavec.extract.pipeline import MAIN  # imported here: the CLI starts without torch

    counts = summary["counts"]
    table = Table(title=title, show_header=False)
    table.add_row("run folder", str(run_dir))
    table.add_row("answers (extraction / held-out)", f"{counts['responses']} / {counts['heldout']}")
    kept = f"{counts['kept_pos']} / {counts['kept_neg']} ({counts['filter']} filter)"
    table.add_row("kept positive / negative", kept)
    for pol in ("pos", "neg"):
        table.add_row(
            f"dropped {pol}: trait / incoherent / unscored",
            f"{counts[f'dropped_trait_{pol}']} / {counts[f'dropped_incoherent_{pol}']} / "
            f"{counts[f'dropped_unscored_{pol}']}",
        )
    table.add_row("judges", f"{summary['trait_judge']}  |  {summary['coherence_judge']}")
    table.add_row("recommended layer", f"{summary['recommended_layer']} (why: layer_choice in summary.json)")
    table.add_row(
        "held-out AUROC / effect size there",
        f"{summary['recommended_layer_auroc']:.3f} / {summary['recommended_layer_effect_size']:.2f}",
    )
    table.add_row("held-out labels", summary["evaluation"][MAIN]["labels"])
    quality = summary["quality"]
    table.add_row("quality", quality["level"])
    for warning in quality["warnings"]:
        table.add_row("warning", warning)
    if "total_seconds" in summary:
        table.add_row("time", f"{summary['total_seconds']} s")
    return table
