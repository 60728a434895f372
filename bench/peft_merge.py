"""PEFT's merge path, as a user runs it: load the base, wrap it in the adapter, merge_and_unload,
save_pretrained.   python bench/peft_merge.py BASE ADAPTER OUT"""

import sys
import warnings

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

warnings.simplefilter("ignore")
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
