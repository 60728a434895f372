"""``d2export.verification.files``: a folder whose weights are right but whose config.json,
tokenizer or sentence-transformers modules serve another model fails; settings that change nothing
computed are notes. On all-MiniLM-L6-v2 (real weights, tokenizer and modules) merged by d2export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from d2export import verify


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


CASES = {
    "pooling-cls": (lambda m: _edit(m / "1_Pooling" / "config.json", lambda d: d.update(
        pooling_mode_cls_token=True, pooling_mode_mean_tokens=False)),
        "files: 1_Pooling/config.json: pooling_mode_cls_token is true; the merge writes false"),
    "normalize-dropped": (lambda m: _edit(m / "modules.json", lambda d: d.pop()),
                          "files: modules.json: modules [.: Transformer, 1_Pooling: Pooling]; the merge writes"),
    "max-seq-length": (lambda m: _edit(m / "sentence_bert_config.json", lambda d: d.update(max_seq_length=8)),
                       "files: sentence_bert_config.json: max_seq_length is 8; the merge writes 256"),
    "not-lowercased": (lambda m: (_edit(m / "tokenizer_config.json", lambda d: d.update(do_lower_case=False)),
                                  _edit(m / "tokenizer.json", lambda d: d["normalizer"].update(lowercase=False))),
                       "files: tokenizer: 'The Movie was GREAT!' encodes as"),
    "vocabulary-swap": (lambda m: _edit(m / "tokenizer.json", lambda d: d["model"]["vocab"].update(
        great=d["model"]["vocab"]["movie"], movie=d["model"]["vocab"]["great"])),
        "files: tokenizer: 2 vocabulary entries differ from the merge's tokenizer"),
    "position-table": (lambda m: _edit(m / "config.json", lambda d: d.update(max_position_embeddings=16)),
                       "files: config.json: max_position_embeddings is 16; the merge writes 512"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_folder_that_serves_another_model_fails(merged, tmp_path, case):
    edit, failure = CASES[case]
    folder, out = merged("d2lora-minilm")
    copy = tmp_path / "m"
    shutil.copytree(out, copy)
    edit(copy)
    report = verify(copy, folder / "adapter", base=folder / "base")
    assert not report.passed
    assert any(f.startswith(failure) for f in report.failures), report.failures
    assert report.weights.passed  # every weight is still right: only the files say it


def test_run_settings_and_missing_files_are_notes(merged, tmp_path):
    """use_cache changes how the model runs, not what it computes, and a tokenizer's padding side
    and length limit are settings a training script changes on purpose; a folder without tokenizer
    or modules (another tool's save_pretrained) is less, not wrong."""
    folder, out = merged("d2lora-minilm")
    copy = tmp_path / "m"
    shutil.copytree(out, copy)
    _edit(copy / "config.json", lambda d: d.update(use_cache=False))
    _edit(copy / "tokenizer_config.json", lambda d: d.update(padding_side="left", model_max_length=1024))
    report = verify(copy, folder / "adapter", base=folder / "base")
    assert report.passed, report.failures
    notes = " ".join(report.notes)
    assert "config.json: use_cache is false; the merge writes true" in notes
    assert "tokenizer: padding_side is 'left'" in notes and "tokenizer: model_max_length is 1024" in notes
    for name in ("modules.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (copy / name).unlink()
    report = verify(copy, folder / "adapter", base=folder / "base")
    assert report.passed, report.failures
    notes = " ".join(report.notes)
    assert "the folder has no tokenizer" in notes and "has no modules.json" in notes
