"""Does a training set's dataset-level projection difference predict the finetuning shift it causes?

Reads ``prevent-experiment`` folders (``personavec prevent-experiment TRAIT [--plain-only]``): each holds
its training sets (``data/{strong,mild,control}.jsonl``) and the measured shift of the plain fine-tune on
each (``table["plain:KIND"]["shift"]`` in ``prevent_experiment.json``: the change against the base model
of the mean last-prompt projection on the evaluation questions, at the settings' layer). Every training
set is screened with the experiment's own vector at that layer (``personavec.screen.run.screen``), and
Pearson r between the dataset's mean projection difference and the shift is reported per trait (its
three sets) and pooled. The paper reports a strong correlation (its Figure 4 / Appendix I).

Full mode generates the model's own answer to every prompt (about 1 s each on 2 CPU cores); ``cheap``
stands the prompt's last token in for it. Screens are kept under ``--out`` and resume.

Run: ``python bench/screen_shift_correlation.py /tmp/exp/evil/prevent ... --out /tmp/screen-shift
[--mode full|cheap|both] [--json OUT]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from personavec.core.models import LoadedModel, load_model
from personavec.finetune.experiment import DATASETS, RESULT_NAME, pearson
from personavec.screen.run import screen
from personavec.screen.scoring import ScreenPlan
from personavec.screen.vectors import resolve_vectors


def dataset_points(lm: LoadedModel, folder: Path, out_root: Path, *, cheap: bool) -> list[dict[str, Any]]:
    """Screen each training set of one prevent-experiment folder; one point per set with its shift."""
    result = json.loads((folder / RESULT_NAME).read_text())
    settings, table = result["settings"], result.get("table") or {}
    (vector,) = resolve_vectors([f"{settings['vector']}@{settings['layer']}"], lm.info)
    points = []
    for kind in DATASETS:
        data, row = folder / "data" / f"{kind}.jsonl", table.get(f"plain:{kind}")
        if not data.is_file() or row is None:
            continue
        mode = "cheap" if cheap else "full"
        t0 = time.perf_counter()
        res = screen(lm, data, ScreenPlan((vector,), cheap=cheap), out_root / vector.name / f"{kind}-{mode}",
                     report=False)  # fmt: skip
        stats = res.summary["vectors"][vector.name]
        points.append({
            "trait": vector.name, "dataset": kind, "mode": mode, "samples": res.summary["rows"]["screened"],
            "mean_projection_difference": stats["mean_projection_difference"], "ci95": stats["ci95"],
            "mean_projection": stats["mean_projection"], "shift": row["shift"],
            "expression": row["expression"], "seconds": round(time.perf_counter() - t0, 1),
        })  # fmt: skip
        line = f"{vector.name:<12} {kind:<8} {mode:<5} mean diff {stats['mean_projection_difference']:+.3f}"
        print(f"{line} shift {row['shift']:+.3f} ({points[-1]['seconds']:.0f}s)", file=sys.stderr, flush=True)
    return points


def correlations(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Pearson r of mean projection difference against shift: per trait, and pooled over every set."""

    def r(rows: list[dict[str, Any]]) -> float | None:
        return pearson([p["mean_projection_difference"] for p in rows], [p["shift"] for p in rows])

    traits = dict.fromkeys(p["trait"] for p in points)
    return {
        "per_trait": {t: r([p for p in points if p["trait"] == t]) for t in traits},
        "pooled": r(points),
        "n": len(points),
    }


def _r(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="prevent-experiment folders")
    ap.add_argument("--out", type=Path, default=Path("runs/screen-shift"), help="where the screens go")
    ap.add_argument("--mode", choices=("full", "cheap", "both"), default="both")
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    lm = load_model(args.model)
    modes = {"full": [False], "cheap": [True], "both": [True, False]}[args.mode]
    out: dict[str, Any] = {}
    for cheap in modes:
        mode = "cheap" if cheap else "full"
        points = [p for f in args.folders for p in dataset_points(lm, f, args.out, cheap=cheap)]
        out[mode] = {"points": points, **correlations(points)}
    for mode, res in out.items():
        print(f"\n{mode} mode: mean projection difference against finetuning shift")
        for p in res["points"]:
            lo, hi = p["ci95"]
            print(f"  {p['trait']:<12} {p['dataset']:<8} {p['mean_projection_difference']:+7.3f} "
                  f"[{lo:+.3f}, {hi:+.3f}]  shift {p['shift']:+.3f}  ({p['seconds']:.0f}s)")  # fmt: skip
        per = ", ".join(f"{t} {_r(v)}" for t, v in res["per_trait"].items())
        print(f"  Pearson r per trait (3 sets each): {per}; pooled over {res['n']}: {_r(res['pooled'])}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
