"""Trainer run folders: ``output_dir/checkpoint-N/`` each holding an adapter, and
``trainer_state.json`` naming the best one. Choosing one is the user's call (``latest``, ``best``
or a step); folders are ordered by step number, never as text (``checkpoint-1000`` comes after
``checkpoint-500``).

transformers' ``get_last_checkpoint`` does the ordering too, but importing ``trainer_utils`` pulls
in torch, which the merge path never loads; the rule is one regular expression.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import D2ExportError, OptionError
from ..jsonfiles import TRAINER_STATE
from ..reading import read_json_object

CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")
STATE_NAME = "trainer_state.json"


def run_checkpoints(run: Path, config_name: str) -> list[Path]:
    """The ``checkpoint-N`` folders of ``run`` that hold an adapter, by step."""
    found = [p for p in run.iterdir() if p.is_dir() and CHECKPOINT_DIR.fullmatch(p.name)
             and (p / config_name).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_DIR.fullmatch(p.name).group(1)))


def choose_checkpoint(run: Path, choice: str, config_name: str) -> Path:
    """``latest``, ``best`` (``trainer_state.json``'s ``best_model_checkpoint``) or a step number."""
    checkpoints = run_checkpoints(run, config_name)
    if not checkpoints:
        raise D2ExportError(f"{run} holds no trainer checkpoint-N folder with an adapter")
    choice = str(choice).strip().lower()
    if choice == "latest":
        return checkpoints[-1]
    if choice == "best":
        return _best(run, checkpoints)
    if choice.isdigit():
        wanted = f"checkpoint-{int(choice)}"
        match = next((p for p in checkpoints if p.name == wanted), None)
        if match is None:
            raise OptionError("checkpoint", f"{choice}: {run} has no {wanted} (it has {names(checkpoints)})")
        return match
    raise OptionError("checkpoint", f"must be latest, best or a step number; got {choice!r}")


def names(checkpoints: list[Path]) -> str:
    return ", ".join(p.name for p in checkpoints)


def _best(run: Path, checkpoints: list[Path]) -> Path:
    """The best checkpoint as the last saved trainer state records it (each checkpoint holds the
    state as it was at its step; the latest one knows the best of all)."""
    states = [p / STATE_NAME for p in (*reversed(checkpoints), run) if (p / STATE_NAME).is_file()]
    if not states:
        raise OptionError("checkpoint", f"best: no {STATE_NAME} in {run} or its checkpoints")
    best = read_json_object(states[0], TRAINER_STATE).get("best_model_checkpoint")
    if not isinstance(best, str) or not best:
        raise OptionError("checkpoint", f"best: {states[0]} records no best_model_checkpoint (training ran "
                          "without metric_for_best_model?)")
    # recorded as a path on the training machine: only its last component is meaningful here
    name = Path(best).name
    match = next((p for p in checkpoints if p.name == name), None)
    if match is None:
        raise OptionError("checkpoint", f"best: {states[0]} names {name}, which {run} does not hold "
                          f"(it has {names(checkpoints)})")
    return match
