"""The merged model's card keeps the base card's metadata.

A merged model is still the base model (its license, language, datasets, library and pipeline
tag), so the base's ``README.md`` front matter is carried over and only d2export's additions are
merged in: its tags, ``base_model`` pointing at the base, and the merge details as the body.
huggingface_hub's ``ModelCard`` parses and writes the front matter, as the Hub does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

OUR_TAGS = ("d2export", "merged-adapter")
CARD_NAME = "README.md"
# A Hub repository id ("org/name" or a legacy "name"); anything else (a local path) is no base_model.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def with_base_card(ours: str, report: dict) -> str:
    """``ours`` (d2export's card text, front matter and body) with the base card's front matter
    merged into its own."""
    readme = Path(report["base"]["path"]) / CARD_NAME
    if not readme.is_file():
        return _own_card(ours, report)
    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard(ours, ignore_metadata_errors=True)
    data = _base_metadata(readme)
    library = data.get("library_name") or _library(report)
    tags = data.get("tags") or []
    tags = [tags] if isinstance(tags, str) else [str(t) for t in tags]
    data.update(library_name=library, tags=list(dict.fromkeys([*tags, *OUR_TAGS])))
    base_id = base_model_id(report)
    data.pop("base_model", None)  # the base's own parent is not this model's base
    if base_id is not None:
        data["base_model"] = base_id
    card.data = ModelCardData(**data)
    return str(card)


def _own_card(ours: str, report: dict) -> str:
    """The card when the base has none: d2export's own front matter, written here. Nothing is merged,
    so huggingface_hub's ModelCard (an import that weighs on a small merge) is not
    needed; every value is a JSON string, which YAML reads as that string."""
    body = ours.split("---\n", 2)[2] if ours.startswith("---\n") else ours
    base_id = base_model_id(report)
    lines = ["---", *([f"base_model: {json.dumps(base_id)}"] if base_id else []),
             f"library_name: {json.dumps(_library(report))}", "tags:", *(f"- {json.dumps(t)}" for t in OUR_TAGS), "---"]
    return "\n".join(lines) + "\n" + body


def _library(report: dict) -> str:
    return "sentence-transformers" if report.get("sentence_transformers") else "transformers"


def _base_metadata(readme: Path) -> dict:
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # a card whose front matter does not parse is not carried; the merge does not depend on it
        return {}


def base_model_id(report: dict) -> str | None:
    """The base as a Hub id: the cache repository it was found in, else one read from its cache
    path, else the adapter's ``base_model_name_or_path`` when that is an id and not a local
    folder. None when unknown."""
    repo = report["base"].get("repo_id")
    if isinstance(repo, str) and repo:
        return repo
    base = Path(report["base"]["path"]).absolute()
    for path in (base, *base.parents):
        if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
            return path.parent.parent.name.removeprefix("models--").replace("--", "/", 1)
    name = report["adapter"].get("config", {}).get("base_model_name_or_path")
    adapter = Path(report["adapter"]["path"])
    if isinstance(name, str) and _HUB_ID.fullmatch(name) and not (Path(name).exists() or (adapter / name).exists()):
        return name
    return None
