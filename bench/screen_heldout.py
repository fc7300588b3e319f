"""Does screening rank hand-written answers that show a trait above those that show its opposite?

Each ``data/heldout/TRAIT.jsonl`` holds 12 + 12 hand-written answers (``question``, ``answer``, ``label``:
1 shows the trait, 0 its opposite; questions not in the specs). Each file is written as a chat dataset
(question as the user turn, answer as the assistant turn), screened with that trait's vector
(``personavec.screen.run.screen``), and scored by AUROC against the labels: the projection difference
(full mode: against the model's own answers; cheap mode: against the prompt's last token) and the
raw projection. Full mode runs once per ``--own-samples`` value (own answers averaged per prompt; 1 is the
single greedy answer), so the settings compare side by side. Screens are kept under ``--out`` and resume.

Run: ``python bench/screen_heldout.py evil=RUN/vector.safetensors humorous=...@17 --out /tmp/screen-heldout
[--mode full|cheap|both] [--own-samples 1 8] [--json OUT]``
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from personavec.core.models import LoadedModel, load_model
from personavec.finetune.data import write_chat_jsonl
from personavec.screen.experiment import auroc
from personavec.screen.records import iter_jsonl
from personavec.screen.run import screen
from personavec.screen.scoring import ScreenPlan
from personavec.screen.vectors import resolve_vectors

HELDOUT = Path(__file__).parent / "data" / "heldout"


def heldout_dataset(trait: str, folder: Path) -> tuple[Path, list[int]]:
    """Write ``TRAIT.jsonl``'s answers as chat JSONL in ``folder``; returns the file and the labels."""
    text = (HELDOUT / f"{trait}.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    path = folder / f"{trait}.jsonl"
    write_chat_jsonl(
        path, [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
               for r in rows],
    )  # fmt: skip
    return path, [int(r["label"]) for r in rows]


def within_question(scores: list[float], labels: list[int], questions: list[str]) -> float:
    """Share of (trait, opposite) answer pairs to the same question ordered right (ties half).

    Within one question the model's own answer is the same for both, so this is what subtracting it
    cannot disturb; the pooled AUROC also compares answers across questions.
    """
    wins = pairs = 0.0
    for q in dict.fromkeys(questions):
        mine = [(s, y) for s, y, qq in zip(scores, labels, questions) if qq == q]
        for sp, _ in (m for m in mine if m[1] == 1):
            for sn, _ in (m for m in mine if m[1] == 0):
                wins += 1.0 if sp > sn else 0.5 if sp == sn else 0.0
                pairs += 1
    return wins / pairs if pairs else float("nan")


def screen_heldout(
    lm: LoadedModel, trait: str, vector: str, out: Path, *, cheap: bool, own_samples: int = 8
) -> dict[str, Any]:
    """Screen one trait's hand-written answers; AUROC of each reading against the labels."""
    data, labels = heldout_dataset(trait, out / "data")
    (sv,) = resolve_vectors([vector], lm.info)
    mode = "cheap" if cheap else f"full-k{own_samples}"
    plan = ScreenPlan((sv,), cheap=cheap, own_samples=own_samples)
    res = screen(lm, data, plan, out / f"{trait}-{mode}", report=False)
    records = list(iter_jsonl(res.records_path))
    readings = [r["vectors"][sv.name] for r in records]
    diffs = [r["projection_difference"] for r in readings]
    return {
        "trait": trait, "mode": mode, "layer": sv.layer, "n": len(labels), "positives": sum(labels),
        "auroc_projection_difference": auroc(diffs, labels),
        "within_question": within_question(diffs, labels, [r["prompt"] for r in records]),
        "auroc_projection": auroc([r["projection"] for r in readings], labels),
        "seconds": res.summary["timing"]["seconds"],
    }  # fmt: skip


def _print(r: dict[str, Any]) -> None:
    sizes = f"{r['positives']} + {r['n'] - r['positives']}"
    head = f"{r['trait']:<13} layer {r['layer']:>2} {r['mode']:<8} {sizes}"
    diff, raw, paired = r["auroc_projection_difference"], r["auroc_projection"], r["within_question"]
    print(f"{head}: AUROC projection difference {diff:.3f} (within questions {paired:.3f}), raw projection "
          f"{raw:.3f} ({r['seconds']:.0f}s)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("vectors", nargs="+", help="TRAIT=VECTOR[@LAYER], TRAIT naming data/heldout/TRAIT.jsonl")
    ap.add_argument("--out", type=Path, default=Path("runs/screen-heldout"))
    ap.add_argument("--mode", choices=("full", "cheap", "both"), default="both")
    ap.add_argument(
        "--own-samples", type=int, nargs="+", default=[1, 8], help="Full mode's own answers per prompt."
    )
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    lm = load_model(args.model)
    full = [(False, k) for k in args.own_samples]
    modes = {"full": full, "cheap": [(True, 1)], "both": [(True, 1), *full]}[args.mode]
    results = []
    for item in args.vectors:
        trait, _, vector = item.partition("=")
        for cheap, k in modes:
            r = screen_heldout(lm, trait, vector, args.out, cheap=cheap, own_samples=k)
            results.append(r)
            _print(r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
