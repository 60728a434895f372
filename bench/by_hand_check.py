"""The check a user writes by hand before trusting a merged folder: PEFT's unmerged model and the
merged folder through transformers, in the folder's dtype, on one 4x64 batch of random tokens; prints
max |d logit| and top-1 agreement.   python bench/by_hand_check.py BASE ADAPTER MERGED"""

import sys
import warnings

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

warnings.simplefilter("ignore")
base, adapter, merged = sys.argv[1:4]
with torch.no_grad():
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype="auto"), adapter).eval()
    tokens = torch.randint(3, unmerged.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    want = unmerged(input_ids=tokens).logits.float()
    del unmerged
    got = AutoModelForCausalLM.from_pretrained(merged, dtype="auto").eval()(input_ids=tokens).logits.float()
print(f"max |d logit| {float((want - got).abs().max()):.4g}, "
      f"top-1 agreement {float((want.argmax(-1) == got.argmax(-1)).float().mean()):.2%}")
