"""Does the finetuning shift predict the change in trait expression, across traits and datasets?

Reads ``prevent_experiment.json`` files (``personavec prevent-experiment TRAIT [--plain-only]``), takes
every plain fine-tune (strong, mild, control; each measured against its own base model), and reports
Pearson r between shift and expression change (read-back, and the judge where scored), per trait and
pooled. The paper reports r = 0.76-0.97 between the shift and the trait score after fine-tuning.

Run: ``python bench/shift_correlation.py runs/evil-smollm2-135m/prevent runs/sycophantic-.../prevent ...``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from personavec.finetune.experiment import RESULT_NAME, pearson


def points(folder: Path) -> list[dict[str, Any]]:
    """The plain fine-tunes of one experiment folder, with its trait."""
    result = json.loads((folder / RESULT_NAME).read_text())
    trait = Path(result["settings"]["vector"]).parent.name
    return [
        {"trait": trait, "condition": name, **row}
        for name, row in result.get("table", {}).items()
        if name.startswith("plain:")
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = [p for f in args.folders for p in points(f)]
    for r in rows:
        judge = "-" if r["judge"] is None else f"{r['judge']:+.2f}"
        head = f"{r['trait']:<32} {r['condition']:<14}"
        print(f"{head} shift {r['shift']:+.3f}  read-back {r['expression']:+.3f}  judge {judge}")
    out: dict[str, Any] = {"points": rows, "per_trait_r_readback": {}}
    # Per trait, as the paper reports it: its plain fine-tunes and the base model itself (shift 0, change 0).
    for trait in dict.fromkeys(r["trait"] for r in rows):
        mine = [r for r in rows if r["trait"] == trait]
        xs, ys = [0.0] + [r["shift"] for r in mine], [0.0] + [r["expression"] for r in mine]
        out["per_trait_r_readback"][trait] = pearson(xs, ys)
        r_trait = out["per_trait_r_readback"][trait]
        print(f"{trait}: r(shift, read-back change) over base + {len(mine)} fine-tunes = {r_trait}")
    out["pooled_r_readback"] = pearson([r["shift"] for r in rows], [r["expression"] for r in rows])
    judged = [r for r in rows if r["judge"] is not None]
    out["pooled_r_judge"] = pearson([r["shift"] for r in judged], [r["judge"] for r in judged])
    print(f"pooled over {len(rows)} fine-tunes: r(shift, read-back change) = {out['pooled_r_readback']}, "
          f"r(shift, judge change) = {out['pooled_r_judge']}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
