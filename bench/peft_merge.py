"""PEFT's merge path, as a user runs it: load the base, wrap it in the adapter, merge_and_unload,
save_pretrained.   python bench/peft_merge.py BASE ADAPTER OUT [--bf16-factors]

``--bf16-factors``: the adapter's factors in the model's bf16 instead of PEFT's default float32
(``autocast_adapter_dtype=False``; what a PeftModel moved with ``.to(torch.bfloat16)`` holds): the
update is then computed from rounded factors and rounded before it is added, a merge a unit off in
many elements."""

import sys
import warnings

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

warnings.simplefilter("ignore")
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter, autocast_adapter_dtype="--bf16-factors" not in sys.argv[4:])
model.merge_and_unload().save_pretrained(out)
