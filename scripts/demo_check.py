"""Demo step: load the merged folder with transformers and compare its fp32 logits with the
run-time (unmerged) D2-LoRA model on seeded token batches. Exit 1 if they differ beyond 1e-5 of
the logit scale (the float32 round-off bound the tests use; see tests/test_merge.py)."""

from __future__ import annotations

import sys
import warnings

import torch
from transformers import AutoModelForCausalLM

from d2export import load_adapter
from d2export.layers import inject_adapter

RTOL = 1e-5


def main(adapter: str, base: str, merged: str) -> int:
    warnings.simplefilter("ignore")
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    unmerged = inject_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), load_adapter(adapter))
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = torch.randint(3, merged_model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = merged_model(ids).logits, unmerged.eval()(ids).logits, plain(ids).logits
    gap, scale, effect = float((a - b).abs().max()), float(b.abs().max()), float((b - c).abs().max())
    top1 = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    print(f"merged vs unmerged D2-LoRA: max |dlogit| {gap:.2e} (logit scale {scale:.3f}, "
          f"adapter effect {effect:.2e}), top-1 agreement {top1:.2%}")
    if gap > RTOL * scale:
        print(f"FAIL: above {RTOL:g} of the logit scale", file=sys.stderr)
        return 1
    print("OK: the merged model computes what the adapted model computed")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
