"""Calibration inputs for output-level checks: padded batches at several sequence lengths.

Rows in a batch have different real lengths and are right-padded, so every comparison exercises
the attention mask; only positions where ``attention_mask`` is 1 are compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import D2ExportError, OptionError

DEFAULT_LENGTHS = (8, 24, 64)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor | None  # [B, T] int64 (None for an image batch)
    attention_mask: torch.Tensor | None  # [B, T] int64, 1 = real token
    pixel_values: torch.Tensor | None = None  # [B, C, H, W] float32, for vision models

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """What the model's forward takes from this batch."""
        if self.pixel_values is not None:
            return {"pixel_values": self.pixel_values}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def describe(self) -> str:
        shape = self.pixel_values.shape if self.pixel_values is not None else self.input_ids.shape
        return "x".join(str(d) for d in shape)


def random_batches(
    vocab_size: int, *, lengths=DEFAULT_LENGTHS, batch_size: int = 4, seed: int = 0, pad_id: int = 0,
    max_length: int | None = None, avoid: tuple[int, ...] = (),
) -> list[Batch]:
    """Seeded random token batches, one per length; row ``i`` holds ``L - i*L/(2B)`` real tokens
    (so the longest row is unpadded and the shortest about half padding)."""
    generator = torch.Generator().manual_seed(seed)
    avoid_ids = torch.tensor(sorted({pad_id, *avoid}), dtype=torch.long)
    batches = []
    for length in lengths:
        length = min(length, max_length) if max_length else length
        ids = torch.randint(0, vocab_size, (batch_size, length), generator=generator)
        # Special tokens (pad, bos, eos) would make some rows mean something else; shift them off.
        clash = torch.isin(ids, avoid_ids)
        while clash.any():
            ids[clash] = (ids[clash] + 1) % vocab_size
            clash = torch.isin(ids, avoid_ids)
        mask = torch.zeros_like(ids)
        for row in range(batch_size):
            real = max(1, length - row * length // (2 * batch_size))
            mask[row, :real] = 1
        ids = ids.masked_fill(mask == 0, pad_id)
        batches.append(Batch(ids, mask))
    return batches


TEXT_MAX_TOKENS = 128  # a calibration line is cut to this many tokens


def text_batches(path: Path, tokenizer, *, batch_size: int = 4, max_length: int = TEXT_MAX_TOKENS) -> list[Batch]:
    """Non-empty lines of a text file, tokenised with the model's tokenizer (each cut to
    ``max_length`` tokens), right-padded."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise D2ExportError(f"calibration file {path}: cannot read ({exc})") from None
    if not lines:
        raise D2ExportError(f"calibration file {path} has no text lines")
    batches = []
    for start in range(0, len(lines), batch_size):
        enc = tokenize(tokenizer, lines[start:start + batch_size], max_length)
        batches.append(Batch(enc["input_ids"], enc["attention_mask"]))
    return batches


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict:
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:  # Llama-style tokenizers have none; the mask hides it anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def special_ids(config: dict) -> tuple[int, ...]:
    ids = []
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        value = config.get(key)
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list):
            ids.extend(v for v in value if isinstance(v, int))
    return tuple(ids)


def config_batches(config: dict, *, seed: int = 0, lengths=DEFAULT_LENGTHS, batch_size: int = 4) -> list[Batch]:
    """The random calibration batches for a model, from its config: its vocabulary, its pad and
    special tokens (avoided), and its position table (lengths clipped to it)."""
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab <= 0:
        raise OptionError("calibration", "is needed: config.json has no vocab_size to draw random tokens from")
    pad = config.get("pad_token_id")
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    return random_batches(vocab, lengths=lengths, batch_size=batch_size, seed=seed,
                          pad_id=pad if isinstance(pad, int) else 0,
                          max_length=limit if isinstance(limit, int) else None, avoid=special_ids(config))


def image_batches(config: dict, *, seed: int = 0, batches: int = 3, batch_size: int = 4) -> list[Batch]:
    """Seeded random images of the size and channels a vision model's config states (pixel values
    as a processor leaves them: roughly zero mean, unit spread)."""
    size, channels = config.get("image_size"), config.get("num_channels", 3)
    if isinstance(size, list | tuple) and len(size) == 2:
        height, width = size
    else:
        height = width = size
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (height, width, channels)):
        raise OptionError("calibration", "is needed: config.json states no image_size to draw random images of")
    generator = torch.Generator().manual_seed(seed)
    return [Batch(None, None, torch.randn(batch_size, channels, height, width, generator=generator))
            for _ in range(batches)]


def model_batches(config: dict, *, seed: int = 0) -> list[Batch]:
    """Random calibration batches for any model: tokens when it has a vocabulary, else images."""
    text = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return config_batches(config, seed=seed) if text is not None or "image_size" not in config else image_batches(
        config, seed=seed)
