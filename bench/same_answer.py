"""Ablation: what each part of the main vector adds, judged at the layer the pipeline would pick for it.

For each extraction run folder (made by ``personavec extract``), the parts saved by the run are
recombined: ``R`` (answers' response-mean difference of means, the paper's vector), ``P`` (the spec
prompts' last-prompt contrast, recomputed here), ``S`` (the same-answer contrast, saved as
``vector_same_answer.safetensors``) and ``I`` (persona intensity, removed). Variants:

* ``R``: the paper's vector alone;
* ``S``: the same-answer contrast alone;
* ``R+P-I``: the main vector before the same-answer contrast was added;
* ``R+P+S-I``: the main vector now (it must equal the run's ``vector.safetensors``; checked).

Each variant gets the pipeline's own layer rule (spec persona ladder on the run's evaluation questions,
:func:`~personavec.extract.layer_choice.choose_layer`), and is then scored there on data the rule
never saw: hand-written answers (``bench/data/heldout/TRAIT.jsonl``, AUROC) and the two graded
persona ladders (``bench/data/ladders*.yaml``, Spearman); ``hw mid`` is the AUROC range over the
model's middle layers (40 %-90 % of the depth: 12-27 of SmolLM2's 30).

Run: ``HF_HUB_OFFLINE=1 python bench/same_answer.py runs/evil runs/q_paranoid ... [--model GGUF]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from layer_choice import DATA, handwritten_scores, ladder_scores, load_ladders, parse_args

from personavec.core.models import load_model
from personavec.core.store import JsonlStore
from personavec.core.vectors import PersonaVector
from personavec.extract.extraction import (
    LayerEvaluation,
    persona_direction,
    prompt_contrast,
)
from personavec.extract.layer_choice import choose_layer, persona_ladder, read_ladder
from personavec.extract.responses import ResponseRow
from personavec.traits.spec import load_spec_file


def variants(lm: Any, run: Path) -> tuple[dict[str, PersonaVector], list[str], int]:
    """The variants of one run, its evaluation questions and its number of prompt pairs."""
    spec = load_spec_file(run / "trait.yaml")
    rows = [ResponseRow.from_record(r) for r in JsonlStore(run / "responses.jsonl").records()]
    extraction = [r for r in rows if r.split == "extraction"]
    n_pairs = max(r.pair for r in extraction) + 1
    questions = list(dict.fromkeys(r.question for r in extraction))
    eval_questions = list(dict.fromkeys(r.question for r in rows if r.split == "evaluation"))
    pairs = [(p.positive, p.negative) for p in spec.pairs[:n_pairs]]
    r = PersonaVector.load(run / "vector_response_mean.safetensors")
    s = PersonaVector.load(run / "vector_same_answer.safetensors")
    pc = prompt_contrast(lm, pairs, questions)
    new = persona_direction(r, pc, s.data)
    saved = PersonaVector.load(run / "vector.safetensors")
    if not torch.allclose(new.data, saved.data, atol=1e-3, rtol=1e-3):
        raise SystemExit(f"{run}: R+P+S-I does not reproduce the run's vector.safetensors")
    out = {"R": r, "S": s, "R+P-I": persona_direction(r, pc), "R+P+S-I": new}
    return out, eval_questions, n_pairs


def main() -> None:
    args = parse_args(__doc__ or "", "runs")
    sets = load_ladders()
    ladders = {"A": sets["ladder"], "B": sets["ladder_check"]}
    lm = load_model(args.model)
    n = lm.info.n_blocks
    no_eval = LayerEvaluation(list(range(1, n + 1)), [float("nan")] * n, [float("nan")] * n, 0, 0, "", 1)
    out: dict[str, Any] = {}
    print("run            variant  layer  hw     A      B      hw mid")
    for run in args.runs:
        spec = load_spec_file(run / "trait.yaml")
        found, eval_questions, n_pairs = variants(lm, run)
        rungs = persona_ladder(spec, n_pairs)
        out[str(run)] = {}
        for name, v in found.items():
            layer = choose_layer(no_eval, read_ladder(lm, v, rungs, eval_questions)).layer
            series: dict[str, list[float]] = {}
            hw = DATA / "heldout" / f"{spec.name}.jsonl"
            if hw.exists():
                series["hw"] = handwritten_scores(lm, v, hw)
            for key, lad in ladders.items():
                if spec.name in lad["ladders"]:
                    series[key] = ladder_scores(lm, v, lad["ladders"][spec.name], lad["questions"])
            at = {k: round(s[layer - 1], 3) for k, s in series.items()}
            mid = series.get("hw", [])[round(0.4 * n) - 1 : round(0.9 * n)]
            span = f"{min(mid):.2f}-{max(mid):.2f}" if mid else "-"
            cells = " ".join(f"{at[k]:.3f}" if k in at else "  -  " for k in ("hw", "A", "B"))
            print(f"{run.name:14s} {name:8s} {layer:5d}  {cells}  {span}", flush=True)
            out[str(run)][name] = {"layer": layer, "at_layer": at, "series": series}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
