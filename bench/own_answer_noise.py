"""How noisy is one own answer as the baseline of the projection difference, and how many should be averaged?

For each ``TRAIT=VECTOR[@LAYER]`` (``TRAIT`` naming ``data/heldout/TRAIT.jsonl``: hand-written answers that
show the trait or its opposite, two to each question), the embedded model answers every question ``K``
times (sampled, 64 tokens; temperature 1 and top-p 1 unless given) and once greedily. Reported per trait:

* the spread of one question's sampled answers' projections (within) against the spread of the
  questions' mean projections (between), and the greedy answers' spread;
* the AUROC of the projection difference ``projection - mean(own projections)`` against the labels, for
  k = 1, 2, 4, ... sampled answers, averaged over random k-subsets of the K answers (and its minimum),
  beside the greedy answer, the cheap stand-in (last prompt token) and the raw projection.

Run: ``HF_HUB_OFFLINE=1 python bench/own_answer_noise.py evil=RUN/vector.safetensors humorous=... [--k 16]
[--subsets 200] [--temperature 1.0 --top-p 1.0] [--json OUT]``
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from personavec.core.activations import capture_activations, last_prompt, response_mean
from personavec.core.generation import SamplingParams, generate
from personavec.core.models import LoadedModel, load_model
from personavec.core.steering import project
from personavec.screen.experiment import auroc
from personavec.screen.vectors import resolve_vectors

HELDOUT = Path(__file__).parent / "data" / "heldout"


def noise(
    lm: LoadedModel, trait: str, vector: str, k: int, subsets: int, sampling: SamplingParams
) -> dict[str, Any]:
    """One trait's spreads and AUROC by number of averaged own answers."""
    (sv,) = resolve_vectors([vector], lm.info)
    rows = [json.loads(x) for x in (HELDOUT / f"{trait}.jsonl").read_text(encoding="utf-8").splitlines() if x]
    questions = list(dict.fromkeys(r["question"] for r in rows))
    ask = [[{"role": "user", "content": q}] for q in questions]
    greedy = generate(lm, ask, SamplingParams(64, 0.0))
    sampled = generate(lm, [a for a in ask for _ in range(k)], sampling, batch_size=k)
    answers = [r["answer"] for r in rows] + greedy + sampled
    owners = [r["question"] for r in rows] + questions + [q for q in questions for _ in range(k)]
    convs = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in zip(owners, answers)
    ]
    acts = capture_activations(lm, convs, layers=[sv.layer], poolings=(response_mean, last_prompt))
    proj = project(acts.at("response_mean", sv.layer), sv.vector, sv.layer).numpy()
    prompt = project(acts.at("last_prompt", sv.layer), sv.vector, sv.layer).numpy()
    n, m = len(rows), len(questions)
    p, own_greedy, own = proj[:n], proj[n : n + m], proj[n + m :].reshape(m, k)
    qi = np.array([questions.index(r["question"]) for r in rows])
    labels = [int(r["label"]) for r in rows]
    rng = np.random.default_rng(0)
    by_k = {}
    for kk in (2**i for i in range(k.bit_length()) if 2**i <= k):
        values = [auroc((p - own[:, rng.choice(k, kk, replace=False)].mean(1)[qi]).tolist(), labels)
                  for _ in range(1 if kk == k else subsets)]  # fmt: skip
        by_k[kk] = {"mean": float(np.mean(values)), "min": float(np.min(values))}
    return {
        "trait": trait, "layer": sv.layer, "questions": m, "k": k,
        "sd_within_question": float(own.std(1, ddof=1).mean()),
        "sd_between_questions": float(own.mean(1).std()), "sd_greedy": float(own_greedy.std()),
        "auroc": {"raw": auroc(p.tolist(), labels), "cheap": auroc((p - prompt[:n]).tolist(), labels),
                  "greedy": auroc((p - own_greedy[qi]).tolist(), labels), "sampled": by_k},
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("vectors", nargs="+", help="TRAIT=VECTOR[@LAYER]")
    ap.add_argument("--k", type=int, default=16, help="Sampled answers per question.")
    ap.add_argument("--subsets", type=int, default=200, help="Random k-subsets averaged per k.")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    lm = load_model(args.model)
    results = []
    for item in args.vectors:
        trait, _, vector = item.partition("=")
        r = noise(
            lm, trait, vector, args.k, args.subsets, SamplingParams(64, args.temperature, args.top_p, 7)
        )
        results.append(r)
        a = r["auroc"]
        sampled = ", ".join(f"k={kk}: {v['mean']:.3f} (min {v['min']:.3f})" for kk, v in a["sampled"].items())
        print(f"{trait:<13} layer {r['layer']:>2}: sd within {r['sd_within_question']:.2f}, between "
              f"{r['sd_between_questions']:.2f}, greedy {r['sd_greedy']:.2f}; AUROC raw {a['raw']:.3f}, "
              f"cheap {a['cheap']:.3f}, greedy {a['greedy']:.3f}, sampled {sampled}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
