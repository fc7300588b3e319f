"""What preventative steering costs a LoRA training step, and how long default fine-tuning takes.

* ``step``: optimizer steps of the default LoRA (r 16, batch 8) plain, with the vector added at one layer
  (``--prevent``) and ablated (``--ablate``), interleaved: round k runs one step of every variant on
  batch k, in rotating order, each from the same weights (reset before the step), so load changes hit
  all variants alike; the ratio is the median of per-round paired ratios.
* ``--runs``: wall time of ``personavec finetune`` as a user runs it (96 examples, 2 epochs), plain and
  with the automatic preventative strength, each in a new process.

Run: ``HF_HUB_OFFLINE=1 python bench/bench_finetune.py --data TRAIN.jsonl --vector V.safetensors [--runs]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from personavec.core.models import load_model
from personavec.core.steering import SteeringSpec, ablate, add
from personavec.core.vectors import PersonaVector
from personavec.finetune.data import load_chat_dataset
from personavec.finetune.training import TrainConfig, assistant_loss, encode_examples, prepare


def step_times(data: Path, vector: Path, rounds: int) -> dict[str, Any]:
    """Per-step wall time of plain, prevent and ablate training on identical batches."""
    lm = load_model()
    vec = PersonaVector.load(vector)
    layer = vec.require_recommended_layer()
    enc = encode_examples(lm, load_chat_dataset(data).conversations(), 512)
    cfg = TrainConfig()
    trainee = prepare(lm, cfg)
    variants: dict[str, list[SteeringSpec]] = {
        "plain": [],
        "prevent": [SteeringSpec(vec, [layer], 0.2, "all", add)],
        "ablate": [SteeringSpec(vec, [layer], 0.0, "all", ablate)],
    }
    opt = torch.optim.AdamW(list(trainee.params.values()), lr=cfg.lr)
    times: dict[str, list[float]] = {k: [] for k in variants}
    g = torch.Generator().manual_seed(0)
    from personavec.core.steering import steer

    for r in range(rounds + 1):  # round 0 warms up
        batch = [enc[int(i)] for i in torch.randperm(len(enc), generator=g)[: cfg.batch_size]]
        names = list(variants)
        for name in names[r % 3 :] + names[: r % 3]:  # rotate, so no variant always goes first
            specs = variants[name]
            trainee.reset()  # every variant steps from the same weights
            lm.model.train()
            t0 = time.perf_counter()
            with steer(lm, specs) if specs else _null():
                loss = assistant_loss(lm, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            if r:
                times[name].append(dt)
    ratios = {
        k: statistics.median(t / p for t, p in zip(times[k], times["plain"])) for k in ("prevent", "ablate")
    }
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"layer": layer, "rounds": rounds, "median_s": medians, "ratio_vs_plain": ratios, "all_s": times}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_a: object) -> None:
        return None


def cli_run(data: Path, extra: list[str]) -> float:
    """Wall time of one ``personavec finetune`` process."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cmd = [
            sys.executable,
            "-m",
            "personavec",
            "finetune",
            str(data),
            "--out",
            f"{tmp}/ad",
            *extra,
            "--json",
        ]
        subprocess.run(cmd, check=True, capture_output=True)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--vector", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--runs", action="store_true", help="Also time whole finetune runs (about 10 minutes).")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    res: dict[str, Any] = {"step": step_times(args.data, args.vector, args.rounds)}
    if args.runs:
        res["runs_s"] = {
            "plain": cli_run(args.data, []),
            "prevent_auto": cli_run(args.data, ["--prevent", str(args.vector)]),
        }
        res["runs_s"]["auto_over_plain"] = res["runs_s"]["prevent_auto"] / res["runs_s"]["plain"]
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
