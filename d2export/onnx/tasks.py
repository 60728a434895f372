"""Which optimum task to export a model folder for (optimum cannot infer it for a local folder)."""

from __future__ import annotations

from ..errors import D2ExportError, OptionError

# Architecture-name endings -> optimum task, most specific first ("LMHeadModel" before "Model").
ARCHITECTURE_TASKS = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForImageClassification", "image-classification"),
    ("Model", "feature-extraction"),  # bare encoders/decoders: BertModel, LlamaModel, ...
)
# Tasks whose single-graph outputs the validator below knows how to check.
VALIDATED_TASKS = {
    "text-generation", "text-generation-with-past", "text-classification", "token-classification",
    "question-answering", "fill-mask", "feature-extraction", "image-classification",
}
# head_kind() of the shared loader for the tasks it loads with the right Auto class.

def infer_task(config: dict, past: bool = True) -> str:
    """The optimum task for a model folder's ``config.json`` (optimum cannot infer it for a local folder)."""
    architectures = config.get("architectures") or []
    if not architectures:
        raise OptionError("task", "is needed: config.json names no architectures")
    arch = architectures[0]
    for ending, task in ARCHITECTURE_TASKS:
        if arch.endswith(ending):
            return f"{task}-with-past" if task == "text-generation" and past else task
    raise OptionError("task", f"is needed: no ONNX task is known for architecture {arch}")


def resolve_task(config: dict, task: str | None, past: bool, validate: bool = True) -> tuple[str, list[str]]:
    """The task to export (checked against what optimum supports for the model type) and notes.
    ``validate`` False: a task the validator cannot check is exported unchecked, as asked."""
    from optimum.exporters.tasks import TasksManager

    _register_onnx_configs()
    notes: list[str] = []
    model_type = config.get("model_type")
    if not model_type:
        raise D2ExportError("config.json has no model_type; not a transformers model config")
    if model_type not in TasksManager._SUPPORTED_MODEL_TYPE:
        raise D2ExportError(f"optimum cannot export model type {model_type!r} to ONNX (no ONNX config for it)")
    supported = list(TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers"))
    if task is None:
        task = infer_task(config, past)
        if task.endswith("-with-past") and task not in supported:
            task = task.removesuffix("-with-past")
            notes.append(f"optimum exports {model_type} without past key/values only")
    else:
        base = TasksManager.map_from_synonym(task.removesuffix("-with-past"))
        if base not in TasksManager.get_all_tasks():
            raise OptionError("task", f"{task!r} is unknown; {model_type} supports: {', '.join(supported)}")
        task = base + ("-with-past" if task.endswith("-with-past") else "")
        if task.endswith("-with-past") and not past:
            raise OptionError("task", f"{task} contradicts past=False (no past key/values); use {base}")
    if task not in supported:
        raise D2ExportError(f"optimum cannot export {model_type} for {task}; supported: {', '.join(supported)}")
    if task not in VALIDATED_TASKS and validate:
        known = ", ".join(sorted(VALIDATED_TASKS))
        article = "an" if task[0] in "aeiou" else "a"
        raise D2ExportError(f"d2export cannot validate {article} {task} export (it validates: {known}); "
                            "--no-validate exports it unchecked")
    return task, notes


def _register_onnx_configs() -> None:
    # optimum-onnx registers its per-architecture ONNX configs with TasksManager on import.
    import optimum.exporters.onnx.model_configs  # noqa: F401


