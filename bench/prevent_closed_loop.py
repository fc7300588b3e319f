"""A closed-loop preventative strength (tried, not adopted): adjust the strength every SEG steps.

Usage: python bench/prevent_closed_loop.py DATA.jsonl VECTOR LAYER SEG OUT_DIR [GAIN] [i|m]

The shift is read on the trait spec's extraction questions; the final shift is reported on both those
and the evaluation questions (what `personavec shift` reports). Mode ``i``: integral update
``c += GAIN * shift / |v|``; mode ``m``: a linear model of the per-segment rate of shift against the
strength, solved for a zero shift at the end of the run. Discussed in docs/results.md (fine-tuning and
preventative steering).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

from personavec.core.models import load_model
from personavec.core.steering import steer
from personavec.core.vectors import PersonaVector
from personavec.finetune.data import load_chat_dataset
from personavec.finetune.prevent import Intervention
from personavec.finetune.shift import projections
from personavec.finetune.training import (
    TrainConfig,
    assistant_loss,
    batch_order,
    encode_examples,
    make_optimizer,
    prepare,
)
from personavec.traits import trait_for_vector

History = list[tuple[int, float, float]]  # (step, strength used in the segment ending there, shift)


def model_update(hist: History, total: int, norm: float, gain: float) -> float:
    """Fit rate = a - b * c over the segments so far; choose c so the shift reaches 0 at the end."""
    step, c, s = hist[-1]
    prev = [(0, 0.0)] + [(t, x) for t, _, x in hist[:-1]]
    cs = np.array([h[1] for h in hist])
    rates = np.array([(x - p[1]) / (t - p[0]) for (t, _, x), p in zip(hist, prev)])
    if len(set(cs.tolist())) < 2:  # one strength seen: extrapolate the plain rate, hand it over as c|v|
        return min(max(rates[-1] * total / norm, 0.0), 4.0) if c == 0 else c * (1.5 if s > 0 else 0.67)
    (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(cs), -cs], 1), rates, rcond=None)
    if b <= 1e-6:
        return c * (1.5 if s > 0 else 0.67)
    return float(min(max((a + gain * s / max(total - step, 1)) / b, 0.0), 4.0))


def main() -> None:
    data, vec_path, out = sys.argv[1], sys.argv[2], sys.argv[5]
    layer, seg = int(sys.argv[3]), int(sys.argv[4])
    gain = float(sys.argv[6]) if len(sys.argv) > 6 else 1.0
    mode = sys.argv[7] if len(sys.argv) > 7 else "i"
    lm = load_model(None)
    vec = PersonaVector.load(vec_path)
    spec = trait_for_vector(str(vec.meta.trait), vec_path, None)
    ctl_q, eval_q = list(spec.extraction_questions), list(spec.evaluation_questions)
    cfg = TrainConfig()
    enc = encode_examples(lm, load_chat_dataset(data).conversations(), cfg.max_tokens)
    base_c, base_e = projections(lm, vec, ctl_q)[layer], projections(lm, vec, eval_q)[layer]
    trainee = prepare(lm, cfg)
    order = batch_order(len(enc), cfg)
    opt, sched = make_optimizer(trainee, cfg, len(order))
    norm = float(vec.at(layer).norm())
    hist: History = []
    coef, t0 = 0.0, time.time()
    lm.model.train()
    for step in range(len(order)):
        spec_now = Intervention(vec, vec_path, layer, coef, "prevent").spec(coef)
        with steer(lm, [spec_now]) if coef else nullcontext():
            loss = assistant_loss(lm, [enc[i] for i in order[step]])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % seg == 0 and step + 1 < len(order):
            lm.model.eval()
            with torch.no_grad():
                shift = projections(lm, vec, ctl_q)[layer] - base_c
            lm.model.train()
            hist.append((step + 1, coef, shift))
            if mode == "i":
                coef = min(max(coef + gain * shift / norm, 0.0), 4.0)
            else:
                coef = model_update(hist, len(order), norm, gain)
            print(f"step {step + 1} loss {loss.item():.3f} shift {shift:+.2f} -> coef {coef:.3f}", flush=True)
    lm.model.eval()
    final = {
        "final_ctl": projections(lm, vec, ctl_q)[layer] - base_c,
        "final_eval": projections(lm, vec, eval_q)[layer] - base_e,
        "hist": hist,
        "last_coef": coef,
        "seconds": time.time() - t0,
    }
    print(json.dumps(final))
    trainee.peft_model.save_pretrained(out)


if __name__ == "__main__":
    main()
