"""Synthetic Llama-shaped bf16 models and adapters for the benchmarks, written to disk shard by
shard (the whole model is never in memory), plus the measuring of a command's wall time and peak
RSS. Shared by the scripts in this folder; not part of the package."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MB = 1e6


@dataclass(frozen=True)
class Shape:
    layers: int = 20
    hidden: int = 1024
    intermediate: int = 2816
    vocab: int = 32000
    heads: int = 16
    kv_heads: int = 16

    @property
    def params(self) -> int:
        return sum(math.prod(s) for _, s in tensor_shapes(self))

    @property
    def key(self) -> str:
        return f"L{self.layers}-h{self.hidden}-i{self.intermediate}-v{self.vocab}-kv{self.kv_heads}"

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """[out, in] of each adapted linear layer."""
        kv = self.hidden * self.kv_heads // self.heads
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


PRESETS = {
    "320m": Shape(),  # hidden 1024, intermediate 2816, 20 layers, vocab 32000: 322M parameters
    "7b": Shape(layers=32, hidden=4096, intermediate=11008, vocab=32000, heads=32, kv_heads=32),  # 6.7B
}


def tensor_shapes(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, shape.hidden))]
    dims = shape.linear_dims()
    for i in range(shape.layers):
        p = f"model.layers.{i}"
        out += [(f"{p}.self_attn.{n}.weight", dims[n]) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        out += [(f"{p}.mlp.{n}.weight", dims[n]) for n in ("gate_proj", "up_proj", "down_proj")]
        out += [(f"{p}.{n}.weight", (shape.hidden,)) for n in ("input_layernorm", "post_attention_layernorm")]
    return [*out, ("model.norm.weight", (shape.hidden,)), ("lm_head.weight", (shape.vocab, shape.hidden))]


def llama_config(shape: Shape) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": shape.vocab,
        "hidden_size": shape.hidden, "intermediate_size": shape.intermediate, "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads, "hidden_act": "silu",
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", "attention_bias": False, "mlp_bias": False,
    }


def write_base(folder: Path, shape: Shape, *, shard_bytes: int = 200 * 10**6, seed: int = 0) -> int:
    """A bf16 Llama in the Hugging Face layout (weights N(0, 0.02), norms 1); returns its bytes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(llama_config(shape), indent=2) + "\n")
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in tensor_shapes(shape):
        nbytes = 2 * math.prod(dims)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for k, group in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, dims in group:
            tensors[name] = (torch.ones(dims, dtype=torch.bfloat16) if len(dims) == 1 else
                             torch.randn(dims, generator=generator, dtype=torch.bfloat16).mul_(0.02))
            weight_map[name] = file
        save_file(tensors, folder / file, metadata={"format": "pt"})
        del tensors
    total = sum(2 * math.prod(d) for _, d in tensor_shapes(shape))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def write_adapter(folder: Path, base: Path, shape: Shape, method: str, *, r: int = 16, seed: int = 1) -> None:
    """A rank-``r`` adapter on every linear layer of every block, with non-zero float32 factors:
    ``lora`` / ``dora`` in PEFT's saved format, ``d2lora`` in D2-LoRA's."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(shape.layers):
        for kind, (out, inp) in shape.linear_dims().items():
            group = "self_attn" if kind in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{i}.{group}.{kind}"
            bound = 1 / math.sqrt(inp)
            for suffix in (("_pos", "_neg") if method == "d2lora" else ("",)):
                a = torch.rand((r, inp), generator=generator) * 2 * bound - bound
                tensors[f"{prefix}.lora_A{suffix}.weight"] = a
                tensors[f"{prefix}.lora_B{suffix}.weight"] = torch.randn((out, r), generator=generator) * 0.01
            if method == "dora":  # about the rows' norms (0.02 sqrt(in)), each moved a little
                tensors[f"{prefix}.lora_magnitude_vector"] = 0.02 * math.sqrt(inp) * (
                    1 + 0.05 * torch.randn(out, generator=generator))
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    common = {"r": r, "lora_alpha": 2 * r, "target_modules": list(LINEAR), "base_model_name_or_path": str(base)}
    if method == "d2lora":
        config = {"peft_type": "D2LORA", "tau": 0.5, "norm_projection": True, **common}
    else:
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "use_dora": method == "dora", "lora_dropout": 0.0,
                  "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, **common}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def build(workdir: Path, shape: Shape, methods: tuple[str, ...], *, r: int = 16) -> tuple[Path, dict[str, Path]]:
    """The base and one adapter per method under ``workdir``, reused when already built."""
    folder = workdir / shape.key
    base = folder / "base"
    if not (base / "config.json").is_file():
        started = time.perf_counter()
        partial = folder / "base.partial"
        if partial.exists():
            import shutil

            shutil.rmtree(partial)
        write_base(partial, shape)
        os.replace(partial, base)
        print(f"built the base ({shape.params / 1e6:,.0f}M parameters) in {time.perf_counter() - started:.0f} s",
              flush=True)
    adapters = {}
    for method in methods:
        adapter = folder / f"adapter-{method}-r{r}"
        if not (adapter / "adapter_config.json").is_file():
            write_adapter(adapter, base, shape, method, r=r)
        adapters[method] = adapter
    return base, adapters


@dataclass
class Measured:
    command: list[str]
    wall_s: float
    peak_rss: int  # bytes: the process's maximum resident set (GNU time's %M, from wait4)
    returncode: int
    killed_at_cap: bool = False
    stderr_tail: str = ""
    cpu_s: float = 0.0  # user + system CPU time of the whole process, all threads

    def to_dict(self) -> dict:
        return asdict(self)


def measure(command: list[str], *, cap_bytes: int | None = None, env: dict | None = None,
            stdout: Path | None = None, cold: bool = False) -> Measured:
    """Run ``command`` under GNU time: wall time and peak RSS of the whole process (``wait4``'s
    ``ru_maxrss``; ``time`` itself is tiny, so nothing large is inherited through ``exec``). With
    ``cap_bytes`` the process is killed as soon as its RSS passes the cap (polled every 50 ms).
    ``stdout``: a file that receives the command's output (else it is dropped). ``cold``: the page
    cache is emptied first (:func:`drop_page_cache`), so every input byte comes from the disk."""
    os.sync()  # the kernel's writeback of files written just before would land inside the timing
    if cold:
        drop_page_cache()
    full = ["/usr/bin/time", "-f", "__TIME__ %e %M %U %S", *command]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", **(env or {})}
    with open(stdout, "w") if stdout is not None else contextlib.nullcontext(subprocess.DEVNULL) as sink:
        proc = subprocess.Popen(full, stdout=sink, stderr=subprocess.PIPE, text=True, env=env)
        killed = threading.Event()
        if cap_bytes is not None:
            threading.Thread(target=_watch, args=(proc.pid, cap_bytes, killed), daemon=True).start()
        _, stderr = proc.communicate()
    match = re.search(r"__TIME__ ([\d.]+) (\d+) ([\d.]+) ([\d.]+)", stderr)
    if not match:
        raise SystemExit(f"could not measure {' '.join(command)}:\n{stderr[-2000:]}")
    tail = "\n".join(line for line in stderr.splitlines() if "__TIME__" not in line)[-1500:]
    # GNU time exits with the command's status; a killed command shows as "terminated by signal".
    return Measured(command, float(match.group(1)), int(match.group(2)) * 1024, proc.returncode, killed.is_set(), tail,
                    float(match.group(3)) + float(match.group(4)))


def drop_page_cache() -> None:
    """Empty the kernel's page cache (Linux, as root): a cold start, the usual case for a 7B base
    on a machine with less free memory than the model, and the same for every command timed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as exc:
        raise SystemExit(f"cannot empty the page cache ({exc.strerror or exc}): --cold needs root on Linux") from None


def _watch(time_pid: int, cap: int, killed: threading.Event) -> None:
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        parent = psutil.Process(time_pid)
        while parent.is_running():
            for child in parent.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    if child.memory_info().rss > cap:
                        killed.set()
                        child.kill()
            time.sleep(0.05)


def machine() -> dict:
    import torch

    info = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}
    with contextlib.suppress(ImportError):
        import psutil

        info["ram_bytes"] = psutil.virtual_memory().total
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as cpuinfo:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    for module in ("numpy", "transformers", "safetensors", "peft", "d2export"):
        with contextlib.suppress(ImportError):
            info[module] = __import__(module).__version__
    return info


PEFT_MERGE = Path(__file__).with_name("peft_merge.py")


def peft_command(base: Path, adapter: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(PEFT_MERGE), str(base), str(adapter), str(out), *extra]


def d2export_command(base: Path, adapter: Path, out: Path, *extra: str) -> list[str]:
    return ["d2export", "merge", str(adapter), "--base", str(base), "--out", str(out), "--force", *extra]


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A Markdown table (what bench/README.md quotes)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def write_results(name: str, record: dict) -> Path:
    import datetime as dt

    path = Path(__file__).with_name("results") / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    record = {"benchmark": name, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "machine": machine(), **record}
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return path
