"""Where does steering move a trait most? The paper's layer rule, measured per layer with the offline judge.

For each run folder's main vector, per layer ``l`` (our convention: output of block ``l``): steer toward the
trait at ``l`` with ``--fraction`` of that layer's mean residual norm (the sweep's unit, so layers are
compared at the same relative strength), answer a slice of the spec's held-out evaluation questions
greedily without a system prompt, score the answers with the trait's embedding judge, and print the gain
in mean trait score over the unsteered answers. Two slices of questions (``--questions 0:8`` and
``8:16``) show how much of a per-layer peak is noise.

Run: ``HF_HUB_OFFLINE=1 python bench/steering_layers.py /tmp/exp/evil /tmp/exp/humorous --questions 0:8
--json out.json`` (a run folder holds ``vector.safetensors`` and ``trait.yaml``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from personavec.cli import parse_layers
from personavec.core.generation import SamplingParams, generate
from personavec.core.models import load_model
from personavec.core.steering import steer
from personavec.core.vectors import PersonaVector
from personavec.judging.base import JudgeItem
from personavec.judging.embedding import EmbeddingJudge
from personavec.steer.sweep import coef_for_fraction, residual_norms
from personavec.traits.spec import load_spec_file


def mean_score(judge: EmbeddingJudge, questions: list[str], answers: list[str]) -> float:
    """Mean trait score of the answers (unscored ones left out)."""
    got = [s for s in judge.score([JudgeItem(q, a) for q, a in zip(questions, answers)]) if s is not None]
    return sum(got) / max(1, len(got))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--questions", default="0:8", help="slice of the evaluation questions, START:END")
    ap.add_argument("--fraction", type=float, default=0.125, help="share of the residual norm added")
    ap.add_argument("--layers", default="6-28", help="layers to steer at, e.g. 6-28 or 14,15,16")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    start, end = (int(x) for x in args.questions.split(":"))
    layers = parse_layers(args.layers) or []
    lm = load_model(args.model)
    norms = residual_norms(lm, layers)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    out: dict[str, Any] = {}
    for run in args.runs:
        t0 = time.perf_counter()
        vector = PersonaVector.load(run / "vector.safetensors")
        spec = load_spec_file(run / "trait.yaml")
        judge = EmbeddingJudge(spec)
        questions = spec.evaluation_questions[start:end]
        convs = [[{"role": "user", "content": q}] for q in questions]
        base = mean_score(judge, questions, generate(lm, convs, params))
        gain: dict[int, float] = {}
        for layer in layers:
            with steer(lm, vector, layer, coef_for_fraction(vector, layer, args.fraction, norms)):
                gain[layer] = mean_score(judge, questions, generate(lm, convs, params)) - base
        best = max(gain, key=lambda k: gain[k])
        out[spec.name] = {
            "unsteered": base,
            "gain": gain,
            "best": best,
            "recommended": vector.recommended_layer,
        }
        cells = " ".join(f"{k}:{v:+.0f}" for k, v in gain.items())
        print(f"{spec.name}: unsteered {base:.1f}, largest gain at layer {best} "
              f"(recommended {vector.recommended_layer}); {cells} [{time.perf_counter() - t0:.0f} s]",
              flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
