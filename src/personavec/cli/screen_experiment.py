"""``personavec screen-experiment``: does screening find trait-teaching samples planted in normal data?"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from personavec.cli import JSON_OPT, JUDGE_OPT, MODEL_OPT, app, emit_json, err, friendly, load, out
from personavec.core.errors import PersonavecError


@app.command("screen-experiment")
@friendly(resumable=True)
def screen_experiment_cmd(
    target: str = typer.Argument(..., help="A trait name / spec file, or an extraction run folder."),
    vector: str | None = typer.Option(
        None, "--vector", help="VECTOR[@LAYER] (default: RUN/vector.safetensors at its recommended layer)."
    ),
    model: str | None = MODEL_OPT,
    n: int | None = typer.Option(None, "--n", help="Planted rows, half blatant, half subtle (40)."),
    rate: float | None = typer.Option(None, "--rate", help="Planted share of the dataset (0.05)."),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="A small run for CI: 8 planted among 40 rows, 32-token answers, 4 own answers per prompt.",
    ),
    own_samples: int | None = typer.Option(
        None, "--own-samples", min=1, help="The screen's own answers per prompt (8; --quick 4; 1: greedy)."
    ),
    judge: str | None = JUDGE_OPT,
    seed: int = typer.Option(0, help="Chooses the questions, seeds sampling and the planted positions."),
    out_dir: Path | None = typer.Option(
        None, "--out", help="Results folder (default RUN/screen-experiment[-quick]; resumes)."
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Plant blatant and subtle trait samples in the model's own answers, screen, and score the ranking."""
    from personavec.cli.extract import default_run_dir, rich_progress
    from personavec.core.vectors import PersonaVector
    from personavec.judging import make_coherence_judge, make_trait_judge
    from personavec.screen.experiment import (
        QUICK,
        PlantConfig,
        run_screen_experiment,
        write_experiment_report,
    )
    from personavec.screen.vectors import resolve_vectors
    from personavec.traits import trait_for_vector

    given = Path(target)
    run_dir = given if given.is_dir() else default_run_dir(target, model)
    spec_text = vector or str(run_dir / "vector.safetensors")
    vector_path = _file_of(spec_text)
    if not Path(vector_path).is_file():
        name = given.name if given.is_dir() else given.stem
        raise PersonavecError(f"no persona vector at {vector_path}: run `personavec extract {name}` first")
    meta_trait = str(PersonaVector.load(vector_path).meta.trait)
    spec = trait_for_vector(meta_trait, vector_path, None if given.is_dir() else target)
    base = QUICK if quick else PlantConfig()
    cfg = replace(base, n=base.n if n is None else n, rate=base.rate if rate is None else rate, seed=seed)
    cfg = replace(cfg, own_samples=cfg.own_samples if own_samples is None else own_samples)
    cfg = cfg.check()
    folder = out_dir or run_dir / ("screen-experiment-quick" if quick else "screen-experiment")
    lm = load(model)
    (resolved,) = resolve_vectors([spec_text], lm.info)
    with err.status("loading judges ..."):
        judges = make_trait_judge(judge, spec, lm), make_coherence_judge(None, lm)
    log = lambda m: err.print(m, highlight=False, soft_wrap=True)  # noqa: E731
    with rich_progress() as progress:
        result = run_screen_experiment(
            lm, spec, resolved, folder, cfg, trait_judge=judges[0], coherence_judge=judges[1],
            progress=progress, log=log,
        )  # fmt: skip
    report = write_experiment_report(folder)
    err.print(f"report: {report}", highlight=False)
    if as_json:
        emit_json({"folder": str(folder), "report": str(report), **result})
        return
    out.print(_table(result))
    for note in result["notes"]:
        err.print(f"note: {note}", highlight=False, soft_wrap=True)


def _file_of(spec: str) -> str:
    """The file of a ``VECTOR[@LAYER]`` spec (an ``@`` not followed by a layer is part of the name)."""
    path, sep, layer = spec.rpartition("@")
    return path if sep and layer.strip().lstrip("-").isdigit() else spec


def _f(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _table(result: dict[str, Any]) -> Table:
    from personavec.screen.experiment import METHOD_LABELS, METHODS, SUBSETS

    c = result["counts"]
    table = Table(
        title=f"screening {c['rows']} rows with {c['blatant']} blatant + {c['subtle']} subtle plants "
        f"({100 * c['planted_share']:.1f} %)"
    )
    for col in ("plants", "ranking", "AUROC", "precision at k", "k"):
        table.add_column(col, justify="left" if col in ("plants", "ranking") else "right")
    for subset in SUBSETS:
        entry = result["metrics"][subset]
        for method in METHODS:
            m = entry["methods"][method]
            table.add_row(
                subset, METHOD_LABELS[method], _f(m["auroc"]), _f(m["precision_at_k"]), str(entry["k"])
            )
    return table
