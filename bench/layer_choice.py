"""Which layer should a persona vector recommend? Per-layer evidence for a set of vectors.

For each vector file, per layer ``l`` (1..L, our convention: output of block ``l``):

* ``ladder``: Spearman between the level of a graded persona ladder (``bench/data/ladders.yaml``, 8
  persona system prompts from the trait's opposite to the trait) and the mean last-prompt projection
  at that level (averaged over the ladder's questions). This is what monitoring must get right.
* ``ladder_check``: the same on a second ladder set written to check, never to choose
  (``bench/data/ladders_check.yaml``: other wording, other questions).
* ``handwritten``: AUROC of hand-written answers that show the trait vs its opposite
  (``bench/data/heldout/TRAIT.jsonl``, read as question + answer, response-mean projection), when a
  file for the trait exists.
* the summary's own per-layer evidence (held-out AUROC / effect size, and the layer-choice scores the
  pipeline records) for comparison.

Run: ``HF_HUB_OFFLINE=1 python bench/layer_choice.py runs/evil-smollm2-135m/vector.safetensors ...``
(``--json OUT`` writes every series).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from personavec.core.activations import capture_activations, last_prompt, response_mean
from personavec.core.models import load_model
from personavec.core.stats import spearman
from personavec.core.vectors import PersonaVector
from personavec.extract.extraction import auroc
from personavec.extract.pipeline import MAIN

DATA = Path(__file__).parent / "data"


def ladder_scores(lm: Any, vector: PersonaVector, ladder: list[str], questions: list[str]) -> list[float]:
    """Spearman(level, mean last-prompt projection) per layer 1..L."""
    convs = [
        [{"role": "system", "content": s}, {"role": "user", "content": q}] for s in ladder for q in questions
    ]
    acts = capture_activations(lm, convs, poolings=[last_prompt])["last_prompt"]  # [N, L+1, d]
    units = vector.data / vector.norms().clamp(min=1e-12).unsqueeze(-1)
    proj = torch.einsum("nld,ld->nl", acts, units).view(len(ladder), len(questions), -1).mean(1)
    levels = list(range(1, len(ladder) + 1))
    return [spearman(levels, proj[:, layer].tolist()) or 0.0 for layer in range(1, vector.meta.n_blocks + 1)]


def handwritten_scores(lm: Any, vector: PersonaVector, path: Path) -> list[float]:
    """AUROC per layer 1..L of hand-written trait vs opposite answers (label 1 = shows the trait)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    convs = [
        [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        for r in rows
    ]
    acts = capture_activations(lm, convs, poolings=[response_mean])["response_mean"]
    units = vector.data / vector.norms().clamp(min=1e-12).unsqueeze(-1)
    proj = torch.einsum("nld,ld->nl", acts, units)
    labels = torch.tensor([int(r["label"]) for r in rows])
    return [auroc(proj[:, layer], labels) for layer in range(1, vector.meta.n_blocks + 1)]


def load_ladders() -> dict[str, Any]:
    """Both ladder sets: ``ladder`` (used while comparing directions) and ``ladder_check``."""
    files = (("ladder", "ladders.yaml"), ("ladder_check", "ladders_check.yaml"))
    return {name: yaml.safe_load((DATA / file).read_text()) for name, file in files}


def parse_args(doc: str, inputs: str) -> argparse.Namespace:
    """The benchmark's arguments: input paths (named ``inputs``), ``--model`` and ``--json OUT``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument(inputs, nargs="+", type=Path)
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args()


def main() -> None:
    args = parse_args(__doc__ or "", "vectors")
    ladder_sets = load_ladders()
    lm = load_model(args.model)
    out: dict[str, Any] = {}
    for path in args.vectors:
        v = PersonaVector.load(path)
        trait = v.meta.trait
        res: dict[str, Any] = {"trait": trait, "recommended_layer": v.meta.extra.get("recommended_layer")}
        for name, spec in ladder_sets.items():
            if trait in spec["ladders"]:
                res[name] = ladder_scores(lm, v, spec["ladders"][trait], spec["questions"])
        hw = DATA / "heldout" / f"{trait}.jsonl"
        if hw.exists():
            res["handwritten"] = handwritten_scores(lm, v, hw)
        summary_path = path.parent / "summary.json"
        if summary_path.exists():
            s = json.loads(summary_path.read_text())
            evaluation = s["evaluation"]
            ev = evaluation[MAIN if v.meta.method == "persona" else v.meta.pooling]
            res["heldout_auroc"], res["heldout_d"] = ev["auroc"], ev["effect_size"]
            for name, series in (s.get("layer_choice") or {}).get("scores", {}).items():
                res[f"choice:{name}"] = series
        out[str(path)] = res
        rec = res["recommended_layer"]
        print(f"\n{path} ({trait}), recommended layer {rec}", file=sys.stderr)
        names = [k for k, val in res.items() if isinstance(val, list)]
        print("layer " + " ".join(f"{n[:12]:>12}" for n in names))
        for layer in range(1, v.meta.n_blocks + 1):
            vals = [res[n][layer - 1] for n in names]
            mark = " <" if layer == rec else ""
            print(
                f"{layer:5d} "
                + " ".join(f"{(x if x is not None else float('nan')):12.3f}" for x in vals)
                + mark
            )
        at = {n: round(res[n][rec - 1], 3) for n in names if rec and res[n][rec - 1] is not None}
        print(f"at the recommended layer {rec}: {json.dumps(at)}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
