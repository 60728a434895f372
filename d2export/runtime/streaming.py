"""Models that never hold all their weights: layer-streamed loading for the output checks
(docs/design.md §6).

transformers loads the model with accelerate's disk offload: modules beyond a resident budget stay
on the meta device and accelerate's hooks read their tensors from the folder's own safetensors
files just before each forward and drop them after it (no copy of the model is written). Added
here:

* :func:`override_weights`: an offloaded module's tensors take other values than its files hold,
  computed when the forward reaches them (the correctly rounded merge, an adapter's replacement);
* :func:`hoist`: a wrapper around an offloaded module (d2export's ``AdapterLayer``) gets the
  module's weights for its whole forward, since it reads ``base.weight`` itself (row norms, the
  low-rank path), not only through the wrapped module's forward;
* :func:`materialized`: the same, for code run outside a forward (building the wrapper);
* :func:`reuse_buffers`: streamed 16-bit weights converted into float32 buffers reused from block
  to block, and :func:`leave_offloaded_weights_unread`: transformers' loading does not read them;

and, in :mod:`.rows`, linear layers and embeddings that read a block of weight rows at a time
instead of the whole weight.
"""

from __future__ import annotations

import functools
import re
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

READ_CHUNK = 4 * 2**20  # bytes of a streamed 16-bit weight read and converted at a time


def offload_hooks(module: nn.Module) -> list:
    """accelerate's hooks that load ``module``'s own tensors before its forward (none when the
    module is resident)."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
    return [h for h in hooks if getattr(h, "offload", False)]


def is_streamed(module: nn.Module) -> bool:
    return bool(offload_hooks(module))


class _Overlay(Mapping):
    """An offload hook's weights map with some tensors computed on access instead of read. Over a
    map of reused buffers (:class:`_Reused`), a computed 16-bit tensor is converted into one of its
    float32 buffers too: accelerate would convert it into fresh memory at every forward (the
    correctly rounded merge of a folder verify cannot correct is computed at every pass)."""

    def __init__(self, inner: Mapping, values: dict[str, Callable[[], torch.Tensor]],
                 rows: dict[str, Callable[[int, int], torch.Tensor]] | None = None):
        self.inner, self.values, self.rows = inner, values, rows or {}

    def __getitem__(self, key: str) -> torch.Tensor:
        make = self.values.get(key)
        if make is None:
            return self.inner[key]
        value = make()
        if not isinstance(self.inner, _Reused) or value.dtype not in (torch.bfloat16, torch.float16):
            return value
        return self.inner.buffer_for(key, tuple(value.shape)).copy_(value)

    def __iter__(self) -> Iterator[str]:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class _Reused(Mapping):
    """An offload hook's weights map that reads 16-bit safetensors tensors and converts them to
    float32 in buffers reused from block to block. accelerate's loader reads and converts each tensor
    into fresh memory, used for one forward and freed: a page fault per page of every weight at every
    pass, with large blocks mapped apart (cli.process.tune_malloc). A buffer handed to a module is
    reused only when nothing but the pool holds it (the forward that used it done, accelerate having
    set the parameter back to meta); else another is made and kept in the pool. Anything else (a float32 file, a spill
    folder, a loader of another form) goes through accelerate's own loader."""

    def __init__(self, inner: Mapping, pool: dict):
        self.inner, self.pool = inner, pool

    def __getitem__(self, key: str) -> torch.Tensor:
        check_stop()
        stored = self.stored(key)
        if stored is None:
            return self.inner[key]
        file, offset, dtype, shape = stored
        out = self.buffer_for(key, shape)
        with open(file, "rb", buffering=0) as handle:
            self.read_into(handle, offset, dtype, out.view(-1))
        return out

    def read_into(self, handle, offset: int, dtype: torch.dtype, out: torch.Tensor) -> None:
        """Read ``out.numel()`` values of ``dtype`` at ``offset`` of the open file into the float32
        ``out``: a chunk at a time into one small reused buffer (safetensors' own reader would make
        a fresh tensor-sized one), each chunk converted into ``out``, so that a staging buffer the
        size of the largest tensor (an embedding) does not stay per model."""
        raw = self.buffer(("raw", READ_CHUNK), torch.uint8)
        step = READ_CHUNK // dtype.itemsize
        handle.seek(offset)
        for start in range(0, out.numel(), step):
            count = min(step, out.numel() - start)
            chunk = raw[:count * dtype.itemsize]
            if handle.readinto(memoryview(chunk.numpy())) != chunk.numel():
                raise OSError(f"{handle.name}: file ends inside a tensor")
            out[start:start + count].copy_(chunk.view(dtype))

    def buffer_for(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 buffer for the weight ``key`` that no module holds any more."""
        return self.buffer((key, shape), torch.float32, shared=True)

    def buffer(self, slot: tuple, dtype: torch.dtype, shared: bool = False) -> torch.Tensor:
        """A buffer of the pool's for ``slot`` (its size in bytes or its shape) that no other tensor
        holds (``shared``: handed out to a module; others are used here only), a new one kept in the
        pool when every one is held: a block loads all its weights at once (q, k, v and o share a
        shape), so the pool holds as many buffers of a shape as one block uses, made once."""
        buffers = self.pool.setdefault(slot, [])
        for buffer, count in buffers:
            if not shared or _use_count(buffer) <= count:
                return buffer
        size = slot[1] if isinstance(slot[1], tuple) else (slot[1],)
        buffer = torch.empty(size, dtype=dtype)
        buffers.append((buffer, _use_count(buffer)))
        return buffer

    def stored(self, key: str, with_float32: bool = False) -> tuple[str, int, torch.dtype, tuple[int, ...]] | None:
        """(file, byte offset, dtype, shape) of the weight ``key`` where accelerate's loader would
        read it from a safetensors file as a 16-bit tensor (or a float32 one: ``with_float32``);
        None otherwise."""
        from ..reading import _header

        source = self._source(key)
        if source is None:
            return None
        file, name = source

        headers = self.pool.setdefault("headers", {})
        if file not in headers:
            headers[file] = _header(Path(file))
        header, start = headers[file]
        entry = header.get(name)
        dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, **({"F32": torch.float32} if with_float32 else {})}
        dtype = dtypes.get(entry.get("dtype")) if entry else None
        if dtype is None:
            return None
        return file, start + entry["data_offsets"][0], dtype, tuple(entry["shape"])

    def _source(self, key: str) -> tuple[str, str] | None:
        """(file, tensor name) of a tensor accelerate's loader reads from safetensors as float32."""
        loader, prefix = getattr(self.inner, "dataset", None), getattr(self.inner, "prefix", None)
        if loader is None or prefix is None or getattr(loader, "device", None) not in (None, "cpu"):
            return None
        full = prefix + key
        info = getattr(loader, "index", {}).get(full)
        if full in getattr(loader, "state_dict", {}) or not isinstance(info, dict) or info.get("dtype") != "float32":
            return None
        file = info.get("safetensors_file")
        return None if file is None else (file, info.get("weight_name", full))

    def __iter__(self) -> Iterator[str]:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)


_ON_LOAD = threading.local()


def check_stop() -> None:
    """The check of :func:`checked_on_load`, where this thread has one."""
    check = getattr(_ON_LOAD, "check", None)
    if check is not None:
        check()


@contextmanager
def checked_on_load(check: Callable[[], None]):
    """Call ``check`` (it raises to stop) each time this thread's streamed models load a weight:
    a forward of a large model takes many seconds, and a stop is then seen at the next block."""
    _ON_LOAD.check = check
    try:
        yield
    finally:
        _ON_LOAD.check = None


def _use_count(tensor: torch.Tensor) -> int:
    """How many tensors share ``tensor``'s memory (compared with its count when it was made)."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


def reuse_buffers(model: nn.Module) -> nn.Module:
    """Read ``model``'s streamed 16-bit weights into reused float32 buffers (:class:`_Reused`)."""
    pool: dict = {}
    for module in model.modules():
        for hook in offload_hooks(module):
            if not getattr(hook, "tied_params_names", None):  # accelerate tracks tied weights by address
                hook.weights_map = _Reused(hook.weights_map, pool)
    return model


def override_weights(module: nn.Module, values: dict[str, Callable[[], torch.Tensor]],
                     rows: dict[str, Callable[[int, int], torch.Tensor]] | None = None) -> None:
    """Give an offloaded ``module``'s tensors (names relative to it: ``weight``) the values the
    callables return, each time its forward loads them; accelerate casts them to the model dtype.
    ``rows``: for a weight, a function giving its rows ``start:stop`` alone, for a forward that
    reads by rows (:class:`_ByRows`)."""
    for hook in offload_hooks(module):
        hook.weights_map = _Overlay(hook.weights_map, values, rows)


@contextmanager
def materialized(module: nn.Module):
    """``module``'s own tensors loaded for the duration (a no-op for a resident module)."""
    hooks = offload_hooks(module)
    for hook in hooks:
        hook.pre_forward(module)
    try:
        yield module
    finally:
        for hook in hooks:
            hook.post_forward(module, None)


def hoist(wrapper: nn.Module, inner: nn.Module) -> None:
    """Load ``inner``'s tensors around ``wrapper``'s forward instead of around ``inner``'s own."""
    from accelerate.hooks import remove_hook_from_module

    hooks = offload_hooks(inner)
    if not hooks:
        return
    remove_hook_from_module(inner)

    def load(_module, _args):
        for hook in hooks:
            hook.pre_forward(inner)

    def drop(_module, _args, output):
        for hook in hooks:
            hook.post_forward(inner, None)
        return output

    wrapper.register_forward_pre_hook(load)
    wrapper.register_forward_hook(drop)


def streaming_kwargs(cls, folder: Path, dtype: torch.dtype, resident_bytes: int | None, overrides: dict,
                     stream_leaves: bool = True) -> dict:
    """``from_pretrained`` arguments that stream the model's repeated blocks (decoder layers) when
    it is larger than ``resident_bytes`` (None: never), and then its largest embeddings and heads
    too, largest first, while what stays in memory exceeds ``resident_bytes`` (through the chunked
    conversion of :class:`_Reused` that costs no measurable time; docs/design.md §6, *Bounded
    memory*). Everything else (norms, small heads) stays resident: accelerate cannot run a model
    whose every module is on disk. ``stream_leaves`` False keeps embeddings and heads resident (a
    vocabulary resized after loading needs their values). An embedding or head tied to another
    module stays resident: accelerate tracks tied weights by address. The spill folder only receives
    tensors that are not in safetensors files (a ``.bin`` base); it lives as long as the model."""
    if resident_bytes is None:
        return {}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, **overrides)
    # torch's device context holds for this thread alone, where accelerate's init_empty_weights
    # patches every module's parameter registration, a host's other threads' included
    with torch.device("meta"):
        skeleton = cls.from_config(config, dtype=dtype)
    # from_pretrained ties after loading, from_config does not
    skeleton.tie_weights()
    size = sum(p.numel() for p in skeleton.parameters()) * dtype.itemsize
    blocks = set(getattr(skeleton, "_no_split_modules", None) or ())
    if size <= resident_bytes or not blocks:
        return {}
    movable = _movable(skeleton) if stream_leaves else set()
    device_map = _block_map(skeleton, blocks, movable)

    modules = dict(skeleton.named_modules())

    def held(name: str) -> int:  # 0 for a buffer's own entry: no parameters
        module = modules.get(name)
        return 0 if module is None else sum(p.numel() for p in module.parameters()) * dtype.itemsize

    resident = sum(held(name) for name, place in device_map.items() if place == "cpu")
    for name in sorted((n for n in device_map if n in movable), key=held, reverse=True):
        if resident <= resident_bytes:
            break
        device_map[name] = "disk"
        resident -= held(name)
    if "disk" not in device_map.values() or "cpu" not in device_map.values():
        return {}
    leave_offloaded_weights_unread()
    return {"device_map": device_map, "offload_folder": tempfile.mkdtemp(prefix="d2export-offload-")}


def leave_offloaded_weights_unread() -> None:
    """Make transformers' loading skip the weights it offloads to disk from a safetensors shard.

    With a device map, transformers (4.57) skips a shard holding only offloaded weights, but in a
    shard that also holds one kept in memory it reads every weight from the file's mapping, casts
    it to the model's dtype and then drops the offloaded ones: accelerate reads them from the same
    file at each forward. Checkpoints ship a few large shards (5 GB is transformers' default), so
    a streamed model read and converted all its weights at load, and the mapped pages of a whole
    shard counted in the process's memory (docs/design.md §6, *Bounded memory*, has the 7B
    figures). What is
    skipped had no effect: an offloaded weight from safetensors is neither kept nor written.
    Installed once, process-wide; a no-op where transformers' internals are not the ones expected."""
    from transformers import modeling_utils

    load = getattr(modeling_utils, "_load_state_dict_into_meta_model", None)
    if load is None or getattr(load, "d2export_skips_offloaded", False):
        return

    @functools.wraps(load)
    def skipping(model, state_dict, shard_file, *args, device_map=None, hf_quantizer=None, device_mesh=None,
                 **kwargs):
        if (device_map and "disk" in device_map.values() and hf_quantizer is None and device_mesh is None
                and isinstance(shard_file, str) and shard_file.endswith(".safetensors")):
            # the module a weight belongs to, found as transformers finds it
            pattern = re.compile("|".join(re.escape(k) for k in sorted(device_map, reverse=True)))

            def offloaded(name: str) -> bool:
                found = pattern.search(name)
                return found is not None and device_map[found.group()] == "disk"

            state_dict = {name: value for name, value in state_dict.items() if not offloaded(name)}
        return load(model, state_dict, shard_file, *args, device_map=device_map, hf_quantizer=hf_quantizer,
                    device_mesh=device_mesh, **kwargs)

    skipping.d2export_skips_offloaded = True
    modeling_utils._load_state_dict_into_meta_model = skipping


def _movable(model: nn.Module) -> set[str]:
    """Names of the embeddings and linear layers whose weights no other module shares."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    return {name for name, m in model.named_modules() if isinstance(m, nn.Embedding | nn.Linear)
            and all(uses[id(p)] == 1 for p in m.parameters(recurse=False))}


def _block_map(module: nn.Module, blocks: set[str], movable: set[str], prefix: str = "") -> dict[str, str]:
    """Every module of a class in ``blocks`` on "disk", the rest on "cpu", with the ``movable``
    modules outside blocks as entries of their own; a module holding both blocks (or movable
    modules) and parameters of its own stays whole on "cpu" (accelerate places modules, not
    tensors)."""
    name = prefix.rstrip(".")
    if type(module).__name__ in blocks:
        return {name: "disk"}
    own = next(module.parameters(recurse=False), None) is not None
    holds = any(type(m).__name__ in blocks for m in module.modules()) or any(
        f"{prefix}{n}".rstrip(".") in movable for n, _ in module.named_modules())
    if own or not holds:
        return {name: "cpu"}
    # a buffer of a module split among its children (BART's final_logits_bias) has its own entry:
    # without one, transformers' loading finds no place for it and fails
    device_map: dict[str, str] = {f"{prefix}{n}": "cpu" for n, _ in module.named_buffers(recurse=False)}
    for child_name, child in module.named_children():
        device_map.update(_block_map(child, blocks, movable, f"{prefix}{child_name}."))
    return device_map


def keep_spill_folder(model: nn.Module, kwargs: dict) -> nn.Module:
    spill = kwargs.get("offload_folder")
    if spill is not None:
        weakref.finalize(model, shutil.rmtree, Path(spill), True)
    return model


__all__ = ["check_stop", "checked_on_load", "hoist", "is_streamed", "materialized", "override_weights",
           "reuse_buffers", "streaming_kwargs"]
