"""How well each offline judge agrees with hand labels (bench/data/judge_labels.jsonl).

Trait judges (the embedding judge, and the embedded SmolLM2 model answering each trait's rubric as a
local judge) are compared with ``trait_score``: Spearman correlation, accuracy at the 50 threshold
(predicted >= 50 vs label >= 50) and AUROC of positive- vs negative-labelled answers, over all traits
and per trait. Incoherent answers are left out of those numbers and reported on their own. Coherence
judges (perplexity under SmolLM2; SmolLM2 answering the coherence rubric) are compared with the
``coherence`` labels over every answer.

Writes bench/results/judges.json and prints a markdown table::

    python bench/judges.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

from personavec.core.models import load_model
from personavec.judging import Judge, JudgeItem
from personavec.judging.coherence import PerplexityCoherence
from personavec.judging.embedding import EmbeddingJudge
from personavec.judging.llm import LocalJudge, coherence_prompt
from personavec.traits.spec import TraitSpec, load_spec_file

ROOT = Path(__file__).resolve().parents[1]
LABELS = ROOT / "bench" / "data" / "judge_labels.jsonl"
BUILTIN = ROOT / "src" / "personavec" / "traits" / "builtin"
OUT = ROOT / "bench" / "results" / "judges.json"


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        return None
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def metrics(rows: Sequence[dict[str, Any]], preds: Sequence[float | None], key: str) -> dict[str, Any]:
    """Agreement of ``preds`` with ``row[key]`` over the scored rows."""
    pairs = [(p, r) for p, r in zip(preds, rows) if p is not None]
    out: dict[str, Any] = {"n": len(rows), "unscored": len(rows) - len(pairs)}
    if len(pairs) < 2:
        return out
    pred = [float(p) for p, _ in pairs]
    gold = [float(r[key]) for _, r in pairs]
    rho = spearmanr(pred, gold).statistic if len(set(gold)) > 1 and len(set(pred)) > 1 else math.nan
    out["spearman"] = None if math.isnan(rho) else float(rho)
    out["acc50"] = sum((p >= 50) == (g >= 50) for p, g in zip(pred, gold)) / len(pred)
    out["mean_pred"] = sum(pred) / len(pred)
    if key == "trait_score":
        labelled = [
            (p, r["label"] == "positive")
            for p, (_, r) in zip(pred, pairs)
            if r["label"] in ("positive", "negative")
        ]
        out["auroc"] = auroc([p for p, _ in labelled], [y for _, y in labelled])
    return out


def run_trait_judge(
    make: Callable[[TraitSpec], Judge], specs: dict[str, TraitSpec], rows: list[dict[str, Any]]
) -> tuple[list[float | None], float, str]:
    preds: list[float | None] = [None] * len(rows)
    start = time.perf_counter()
    name = ""
    for trait, spec in specs.items():
        idx = [i for i, r in enumerate(rows) if r["trait"] == trait]
        if not idx:
            continue
        judge = make(spec)
        name = judge.name.rsplit(":", 1)[0] if judge.name.startswith("embedding:") else judge.name
        for i, s in zip(idx, judge.score([JudgeItem(rows[i]["question"], rows[i]["answer"]) for i in idx])):
            preds[i] = s
        print(f"  {name} {trait}: {len(idx)} scored", flush=True)
    return preds, time.perf_counter() - start, name


def trait_report(rows: list[dict[str, Any]], preds: list[float | None], traits: list[str]) -> dict[str, Any]:
    coherent = [i for i, r in enumerate(rows) if r["label"] != "incoherent"]
    incoherent = [i for i, r in enumerate(rows) if r["label"] == "incoherent"]
    report: dict[str, Any] = {
        "all": metrics([rows[i] for i in coherent], [preds[i] for i in coherent], "trait_score"),
        "incoherent": metrics([rows[i] for i in incoherent], [preds[i] for i in incoherent], "trait_score"),
        "per_trait": {},
    }
    for t in traits:
        idx = [i for i in coherent if rows[i]["trait"] == t]
        report["per_trait"][t] = metrics([rows[i] for i in idx], [preds[i] for i in idx], "trait_score")
    return report


def fmt(x: Any) -> str:
    return "-" if x is None else (f"{x:.2f}" if isinstance(x, float) else str(x))


def table(results: dict[str, Any]) -> str:
    lines = [
        "| role | judge | subset | n | Spearman | acc@50 | AUROC pos/neg | mean score | unscored | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rep in results["trait"].items():
        secs = f"{rep['seconds']:.0f}"
        subsets = [("all (coherent)", rep["all"])]
        subsets += [(t, m) for t, m in rep["per_trait"].items()]
        subsets += [("incoherent only", rep["incoherent"])]
        for subset, m in subsets:
            cells = [m["n"], m.get("spearman"), m.get("acc50"), m.get("auroc"), m.get("mean_pred")]
            shown = secs if subset.startswith("all") else ""
            row = " | ".join(fmt(c) for c in cells)
            lines.append(f"| trait | {name} | {subset} | {row} | {m['unscored']} | {shown} |")
    for name, rep in results["coherence"].items():
        m = rep["all"]
        lines.append(
            f"| coherence | {name} | all | {m['n']} | {fmt(m.get('spearman'))} | {fmt(m.get('acc50'))} | - | "
            f"{fmt(m.get('mean_pred'))} | {m['unscored']} | {rep['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy box)")
    ap.add_argument("--skip-local", action="store_true", help="skip the (slow) local SmolLM2 rubric judges")
    ap.add_argument(
        "--limit", type=int, default=None, help="use only the first N labelled answers (smoke test)"
    )
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = [json.loads(line) for line in LABELS.read_text().splitlines() if line.strip()]
    if args.limit:
        rows = rows[: args.limit]
    traits = sorted({r["trait"] for r in rows})
    specs = {t: load_spec_file(BUILTIN / f"{t}.yaml") for t in traits}
    items = [JudgeItem(r["question"], r["answer"]) for r in rows]
    results: dict[str, Any] = {
        "data": str(LABELS.relative_to(ROOT)),
        "n_answers": len(rows),
        "labels": {
            lab: sum(r["label"] == lab for r in rows)
            for lab in ("positive", "negative", "neutral", "incoherent")
        },
        "torch_threads": torch.get_num_threads(),
        "trait": {},
        "coherence": {},
    }

    print("embedding trait judge", flush=True)
    preds, secs, name = run_trait_judge(EmbeddingJudge, specs, rows)
    results["trait"]["embedding:all-MiniLM-L6-v2"] = trait_report(rows, preds, traits) | {"seconds": secs}

    lm = load_model()
    print("perplexity coherence", flush=True)
    start = time.perf_counter()
    ppl = PerplexityCoherence(lm)
    preds = ppl.score(items)
    results["coherence"][ppl.name] = {
        "all": metrics(rows, preds, "coherence"),
        "seconds": time.perf_counter() - start,
        "calibration": ppl.calibration,
    }

    if not args.skip_local:
        print("local trait judge (SmolLM2 + each trait's rubric)", flush=True)
        preds, secs, name = run_trait_judge(lambda spec: LocalJudge(lm, spec.judge_prompt), specs, rows)
        results["trait"][name] = trait_report(rows, preds, traits) | {"seconds": secs}
        print("local coherence judge (SmolLM2 + COHERENCE_RUBRIC)", flush=True)
        start = time.perf_counter()
        local = LocalJudge(lm, coherence_prompt)
        preds = local.score(items)
        results["coherence"][local.name] = {
            "all": metrics(rows, preds, "coherence"),
            "seconds": time.perf_counter() - start,
        }

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}\n")
    print(table(results))


if __name__ == "__main__":
    main()
