"""Which direction orders graded persona ladders best at the last prompt token? (issue #12 evidence)

For each extraction run folder, per layer and at the layer each direction's own rule would pick
(largest smoothed held-out last-prompt separation, layers 40-90 % of the depth): Spearman on both
ladder sets (``data/ladders.yaml``, used while choosing; ``data/ladders_check.yaml``, written to
check), hand-written AUROC (``data/heldout/TRAIT.jsonl``) and held-out answer AUROC (the run's own
held-out answers and labels), for

* ``R``: the paper's response-mean vector (``vector_response_mean.safetensors``, or ``vector.safetensors``
  in runs made before it was split out);
* ``P``: the spec's eliciting minus suppressing prompts, mean last-prompt activation over the
  extraction questions (no generation);
* ``R+P``: the mean of the two unit directions;
* ``X-I``: each of them made orthogonal to persona intensity (both prompts' mean minus plain assistant
  prompts); ``R+P-I`` is what the pipeline now saves as ``vector.safetensors``.

Run: ``HF_HUB_OFFLINE=1 python bench/monitor_directions.py RUN_DIR... [--json OUT]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from personavec.core.activations import capture_activations, last_prompt, response_mean
from personavec.core.models import LoadedModel, load_model
from personavec.core.stats import spearman
from personavec.core.store import JsonlStore
from personavec.core.vectors import PersonaVector
from personavec.extract.extraction import auroc, cohens_d, persona_direction, prompt_contrast
from personavec.extract.filtering import Thresholds
from personavec.extract.layer_choice import default_candidates, smooth
from personavec.extract.pipeline import heldout_groups
from personavec.extract.responses import ResponseRow
from personavec.traits.spec import load_spec_file

DATA = Path(__file__).parent / "data"
LADDERS = {"ladder": "ladders.yaml", "check": "ladders_check.yaml"}


def unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-9)


def without(u: Tensor, i: Tensor) -> Tensor:
    i = unit(i)
    return unit(u - (u * i).sum(-1, keepdim=True) * i)


def directions(lm: LoadedModel, run: Path) -> dict[str, Tensor]:
    spec = load_spec_file(run / "trait.yaml")
    paper = run / "vector_response_mean.safetensors"
    response = PersonaVector.load(paper if paper.exists() else run / "vector.safetensors")
    pc = prompt_contrast(lm, [(p.positive, p.negative) for p in spec.pairs], spec.extraction_questions)
    r, p = unit(response.data), unit(pc.contrast)
    base = {"R": r, "P": p, "R+P": unit(r + p)}
    others = {f"{k}-I": without(u, pc.intensity) for k, u in base.items() if k != "R+P"}
    # R+P-I is the pipeline's own function, so this measures exactly what runs save.
    return {**base, **others, "R+P-I": unit(persona_direction(response, pc).data)}


def heldout(run: Path) -> tuple[list[list[dict[str, str]]], Tensor, list[list[dict[str, str]]], Tensor]:
    """The run's held-out answers labelled as the pipeline labels them, and their prompts by polarity."""
    records = JsonlStore(run / "responses.jsonl").records()
    rows = [ResponseRow(**{f: r[f] for f in ResponseRow.__dataclass_fields__}) for r in records]
    rows = [r for r in rows if r.split == "evaluation"]
    scores: dict[str, dict[str, float | None]] = {"trait": {}, "coherence": {}}
    for s in JsonlStore(run / "scores.jsonl").records():
        scores.setdefault(s["kind"], {})[s["response_key"]] = s["score"]
    t = Thresholds(**json.loads((run / "summary.json").read_text())["config"]["thresholds"])
    pos, neg, _ = heldout_groups(rows, scores["trait"], scores["coherence"], t)
    answers = [r.conversation(with_system=False) for r in [*pos, *neg]]
    labels = torch.tensor([1] * len(pos) + [0] * len(neg))
    polarity = torch.tensor([int(r.polarity == "pos") for r in rows])
    return answers, labels, [r.conversation()[:-1] for r in rows], polarity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    lm = load_model()
    n = lm.info.n_blocks
    ladders = {k: yaml.safe_load((DATA / f).read_text()) for k, f in LADDERS.items()}
    out: dict[str, Any] = {}
    for run in args.runs:
        name = load_spec_file(run / "trait.yaml").name
        acts: dict[str, tuple[Tensor, Tensor]] = {}
        for key, lad in ladders.items():
            if name in lad["ladders"]:
                levels = lad["ladders"][name]
                convs = [[{"role": "system", "content": s}, {"role": "user", "content": q}]
                         for s in levels for q in lad["questions"]]  # fmt: skip
                lp = capture_activations(lm, convs, poolings=[last_prompt])["last_prompt"]
                acts[key] = (lp, torch.tensor([float(len(levels))]))
        hw = DATA / "heldout" / f"{name}.jsonl"
        if hw.exists():
            rows = [json.loads(x) for x in hw.read_text().splitlines() if x.strip()]
            convs = [
                [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
                     for r in rows]  # fmt: skip
            acts["handwritten"] = (
                capture_activations(lm, convs, poolings=[response_mean])["response_mean"],
                torch.tensor([int(r["label"]) for r in rows]),
            )
        answers, labels, prompts, pol = heldout(run)
        if len(labels):
            acts["heldout"] = (
                capture_activations(lm, answers, poolings=[response_mean])["response_mean"],
                labels,
            )
        prompt_acts = capture_activations(lm, prompts, poolings=[last_prompt])["last_prompt"]
        res: dict[str, Any] = {}
        print(f"\n{run} ({name}): value at the layer the rule picks for each direction [layer]")
        for dname, u in directions(lm, run).items():
            series: dict[str, list[float]] = {}
            for key, (a, lab) in acts.items():
                proj = torch.einsum("nld,ld->nl", a, u)
                if key in LADDERS:
                    k = int(lab.item())
                    means = proj.view(k, -1, n + 1).mean(1)
                    series[key] = [
                        spearman(list(range(k)), means[:, i].tolist()) or 0.0 for i in range(1, n + 1)
                    ]
                else:
                    series[key] = [auroc(proj[:, i], lab) for i in range(1, n + 1)]
            sep = torch.einsum("nld,ld->nl", prompt_acts, u)
            d = smooth([cohens_d(sep[:, i], pol) for i in range(1, n + 1)])
            layer = max(default_candidates(n), key=lambda c: d[c - 1] or float("-inf"))
            res[dname] = {"layer": layer, **series}
            print(
                f"  {dname:6s} [{layer:2d}] "
                + "  ".join(f"{k} {v[layer - 1]:.2f}" for k, v in series.items())
            )
        out[str(run)] = res
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
