"""Which direction orders a graded persona ladder best at the last prompt token? (issue #12 evidence)

For each extraction run folder, per layer 12..27 and at the recommended layer: ladder Spearman
(``data/ladders.yaml``) and hand-written AUROC (``data/heldout/TRAIT.jsonl``) of

* ``R``: the run's response-mean vector (the vector file);
* ``P``: spec eliciting minus suppressing prompts, mean last-prompt activation over the extraction
  questions (no generation);
* ``R+P``: the mean of the two after normalising each layer's row;
* ``LP``: the run's last-prompt vector of the kept answers (``vector_last_prompt.safetensors``).

Run: ``HF_HUB_OFFLINE=1 python bench/monitor_directions.py RUN_DIR... [--json OUT]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from personavec.core.activations import capture_activations, last_prompt, response_mean
from personavec.core.models import load_model
from personavec.core.vectors import PersonaVector
from personavec.extract.extraction import auroc
from personavec.steer.sweep import spearman
from personavec.traits.spec import load_spec_file

DATA = Path(__file__).parent / "data"


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-9)


def directions(lm: Any, run: Path) -> dict[str, torch.Tensor]:
    spec = load_spec_file(run / "trait.yaml")
    convs = [
        [{"role": "system", "content": s}, {"role": "user", "content": q}]
        for p in spec.pairs
        for q in spec.extraction_questions
        for s in (p.positive, p.negative)
    ]
    acts = capture_activations(lm, convs, poolings=[last_prompt])["last_prompt"]
    r = unit(PersonaVector.load(run / "vector.safetensors").data)
    p = unit(acts[0::2].mean(0) - acts[1::2].mean(0))
    lp = unit(PersonaVector.load(run / "vector_last_prompt.safetensors").data)
    return {"R": r, "P": p, "R+P": unit(r + p), "LP": lp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    lm = load_model()
    ladders = yaml.safe_load((DATA / "ladders.yaml").read_text())
    n_layers = lm.info.n_blocks
    out: dict[str, Any] = {}
    for run in args.runs:
        spec = load_spec_file(run / "trait.yaml")
        rec = PersonaVector.load(run / "vector.safetensors").require_recommended_layer()
        ladder = ladders["ladders"].get(spec.name)
        hw = DATA / "heldout" / f"{spec.name}.jsonl"
        la = ha = labels = None
        if ladder:
            convs = [[{"role": "system", "content": s}, {"role": "user", "content": q}]
                     for s in ladder for q in ladders["questions"]]  # fmt: skip
            la = capture_activations(lm, convs, poolings=[last_prompt])["last_prompt"]
        if hw.exists():
            rows = [json.loads(x) for x in hw.read_text().splitlines() if x.strip()]
            convs = [
                [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
                for r in rows
            ]
            ha = capture_activations(lm, convs, poolings=[response_mean])["response_mean"]
            labels = torch.tensor([int(r["label"]) for r in rows])
        res: dict[str, Any] = {"recommended_layer": rec}
        print(f"\n{run} ({spec.name}), recommended layer {rec}; columns: layers 12..27")
        for name, u in directions(lm, run).items():
            if la is not None:
                means = torch.einsum("nld,ld->nl", la, u).view(len(ladder), -1, n_layers + 1).mean(1)
                lad = [
                    spearman(list(range(len(ladder))), means[:, k].tolist()) or 0.0
                    for k in range(1, n_layers + 1)
                ]
                res[f"{name}:ladder"] = lad
                print(
                    f"  {name:4s} ladder @rec {lad[rec - 1]:5.2f} | "
                    + " ".join(f"{x:4.2f}" for x in lad[11:27])
                )
            if ha is not None and labels is not None:
                proj = torch.einsum("nld,ld->nl", ha, u)
                hwa = [auroc(proj[:, k], labels) for k in range(1, n_layers + 1)]
                res[f"{name}:handwritten"] = hwa
                print(
                    f"  {name:4s} hw     @rec {hwa[rec - 1]:5.2f} | "
                    + " ".join(f"{x:4.2f}" for x in hwa[11:27])
                )
        out[str(run)] = res
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
