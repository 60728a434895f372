"""The reference ladder's model runs (:mod:`.outputs` has the rungs): the unmerged model, the
folder, the correctly rounded merge and PEFT's model, loaded one at a time and run two at once."""

from __future__ import annotations

import gc
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import replace

import numpy as np
import torch

from ..algebra import round_to_dtype
from ..arrays import numpy_dtype
from ..errors import D2ExportError
from ..job import Job
from ..names import find_name
from ..options import MergeOptions, VerifyOptions
from ..plan import Action, build_plan
from ..progress import Stopped, stop_check
from ..reading import ModelFolder
from ..runtime.calibration import Batch
from ..runtime.comparison import OutputComparison
from ..runtime.models import (
    TORCH_DTYPES,
    head_kind,
    load_model,
    merged_model,
    model_output,
    peft_model,
    unmerged_model,
)
from ..runtime.streaming import checked_on_load
from .folds import Folds
from .outputs import (
    FLOOR_CEILING_UNITS,
    FOLDER,
    NUDGED,
    PEFT,
    ROUNDED,
    UNMERGED,
    OutputCheck,
    compare_runs,
    followed_figures,
    judge_fidelity,
    judge_loading,
    judge_references,
    percent,
)
from .peft_reading import peft_reference, read_by_peft
from .report import FP32_OUTPUT_RTOL, MIN_TOP1, ULP, VerifyReport, output_rtol
from .rounding import nudged
from .runs import GENERATION_STEPS, ModelRun, batch_order, generation_prompts, run_model
from .weights import WeightReport


class Ladder:
    """The models of the reference ladder (:mod:`.outputs`), each run once per dtype and compared.

    The unmerged model and the folder run side by side, each on its own thread with torch on one
    thread (:func:`.runs.one_thread`): a streamed forward is a chain of small operations that two
    threads of one model spend waiting on each other, while two models keep both cores busy. The
    folder follows the unmerged model's greedy continuation as soon as it is generated; the
    correctly rounded merge runs once the weight check says how to build it. Models are loaded one
    at a time (transformers' loading sets process-wide state, such as the default dtype)."""

    def __init__(self, job: Job, report: VerifyReport, folder: ModelFolder, batches: list[Batch],
                 options: VerifyOptions, weights: Callable[..., WeightReport | None], stop: threading.Event):
        """``folder``: the merged folder, open; ``weights``: the weight report once the check is done
        (at most ``timeout`` seconds, then TimeoutError); ``stop``: set when any part of verify fails."""
        self.job, self.report, self.folder, self.batches = job, report, folder, batches
        self.options, self.weights = options, weights
        config = folder.config
        kind = head_kind(config)
        # question answering's start/end logits are distributions over positions, not over their last axis
        self.distributions = kind not in ("encoder", "question-answering")
        self.prompts = generation_prompts(batches, config) if kind == "causal-lm" else None
        self.order = batch_order(len(batches), self.prompts)
        self.resident = options.resident
        self.peft = peft_reference(job, options.peft_reference, self.resident)
        self.output = "hidden states" if kind == "encoder" else "logits"
        self.runs: dict[tuple[str, str, bool], ModelRun] = {}
        self.continuation: dict[str, torch.Tensor | None] = {}
        self.folds: dict[str, Folds] = {}
        self.stop, self.loading, self._check = stop, threading.Lock(), stop_check(stop)
        # PEFT's reading of the adapter, read while the models run (this thread only waits for them then)
        self.peft_reading: Future | None = None
        if self.peft.reading:
            reader = ThreadPoolExecutor(1, "peft")
            self.peft_reading = reader.submit(self._read_by_peft)
            reader.shutdown(wait=False)  # the thread ends with its one task

    def halt(self) -> None:
        """Called between forwards and blocks: ends a run once another part of verify has failed."""
        self._check()

    def run(self, name: str, dtype: str, probe: bool = False) -> ModelRun:
        """One model's run, kept for other comparisons; the model itself is dropped at once.
        ``probe``: on the first calibration batch only, without the continuation."""
        whole = self.runs.get((name, dtype, False))
        if whole is not None and any(output is None for output in whole.outputs[:1 if probe else None]):
            del self.runs[name, dtype, False]  # outputs dropped as no rung then needed them: run it again
        elif probe and whole is not None:  # the full run's first batch is that probe
            return ModelRun(whole.outputs[:1])
        if (name, dtype, probe) not in self.runs:
            if name != UNMERGED and not probe and dtype not in self.continuation:
                self.run(UNMERGED, dtype)  # the continuation it follows
            self._run(name, dtype, probe, lambda: self.continuation.get(dtype))
        return self.runs[name, dtype, probe]

    def side_by_side(self, dtype: str) -> None:
        """The unmerged model and the folder on two threads, then the correctly rounded merge on
        the first thread free: its probe when the weight check finds every tensor exact, else its
        full run in two parts, the second on the next thread free. A full run is several passes
        over the model (each computing the merge again where the folder is not correctable), and
        run as one model after *U* and *F* are done it left a core idle for most of that run
        (docs/design.md §6, *Cost*)."""
        generated: Future = Future()
        fold = self.folds[dtype] = Folds(self, keep_unmerged=self._keeps_unmerged(dtype))
        with ThreadPoolExecutor(2, "models") as pool:
            try:
                running = [pool.submit(self._run, UNMERGED, dtype, False, generated.result, generated, fold=fold),
                           pool.submit(self._run, FOLDER, dtype, False, generated.result, fold=fold)]
                weights = self._weights_unless_failed(running)
                fold.settle(weights is not None and weights.all_exact)
                if weights is not None and weights.all_exact:
                    running.append(pool.submit(self._run, ROUNDED, dtype, True, generated.result))
                    parts = []
                else:
                    parts = [pool.submit(self._run, ROUNDED, dtype, False, generated.result, only=part, fold=fold)
                             for part in self._halves()]
                for future in as_completed(running + parts):
                    future.result()  # the first error, as it happened (the others then stop)
                if parts:
                    self.runs[ROUNDED, dtype, False] = _joined([part.result() for part in parts])
            except BaseException:
                self.stop.set()
                if not generated.done():
                    generated.set_exception(Stopped())
                raise

    def _halves(self) -> list[frozenset[int]]:
        """The batches of a full run in two parts of about as many passes over the model (each pass
        reads every weight, and computes the merge where the folder is not correctable): the first
        holds the prompts' batch and the teacher-forced continuation, a pass of its own."""
        first = self.prompts.batch if self.prompts is not None else 0
        parts = [{first}, set()]
        passes = [1 + (self.prompts is not None), 0]
        for i in range(len(self.batches)):
            if i != first:
                lighter = int(passes[1] <= passes[0])
                parts[lighter].add(i)
                passes[lighter] += 1
        return [frozenset(part) for part in parts if part]

    def _weights_unless_failed(self, running: list[Future]) -> WeightReport | None:
        """The weight report once the check is done, or the error of a model run that ends first
        (at 7B the weight check takes minutes; a folder transformers cannot load fails at once)."""
        while True:
            for future in running:
                if future.done() and future.exception() is not None:
                    future.result()
            try:
                return self.weights(0.2)
            except TimeoutError:
                continue

    def _run(self, name: str, dtype: str, probe: bool, continuation: Callable[[], torch.Tensor | None],
             generated: Future | None = None, only: frozenset[int] | None = None,
             fold: Folds | None = None) -> ModelRun:
        """Load ``name``, run it on the batches and, for a full run, along the unmerged model's
        greedy ``continuation`` (a function: it waits until the unmerged model has generated it).
        The unmerged model generates it first and hands it to ``generated``. ``only``: a part of a
        full run, these batches only (returned, not kept), the continuation with the prompts' batch.
        ``fold``: the rungs, handed each output as it comes."""
        torch_dtype, job = TORCH_DTYPES[dtype], self.job

        def publish(tokens: torch.Tensor | None) -> None:
            self.continuation[dtype] = tokens
            if generated is not None:
                generated.set_result(tokens)

        try:
            with self.loading:
                self.halt()
                if name == UNMERGED:
                    model = unmerged_model(job.base.path, job.spec, torch_dtype, resident_bytes=self.resident)
                elif name in (ROUNDED, NUDGED):
                    model = self._rounded(torch_dtype, nudge=name == NUDGED)
                elif name == FOLDER:
                    model = load_model(self.report.merged, torch_dtype, resident_bytes=self.resident)
                else:
                    model = peft_model(job.base.path, job.spec, torch_dtype)
            if name == UNMERGED and self.prompts is None:
                publish(None)
            with checked_on_load(self.halt):  # a large model's forward is long: stop between blocks
                run = run_model(model, self.batches[:1] if probe else self.batches, halt=self.halt,
                                prompts=None if probe else self.prompts, steps=GENERATION_STEPS, only=only,
                                publish=publish if name == UNMERGED else None, follow=continuation,
                                outputs=None if fold is None else fold.outputs[name],
                                delivered=None if fold is None else fold.delivered)
        except BaseException as exc:
            if generated is not None and not generated.done():
                generated.set_exception(exc)  # what the models waiting for the continuation raise too
            raise
        if only is None:
            self.runs[name, dtype, probe] = run
        del model
        gc.collect()
        return run

    def _rounded(self, dtype: torch.dtype, nudge: bool = False):
        """The correctly rounded merge. When the weight check found every tensor of the folder equal
        to its correctly rounded value, those tensors *are* that merge's: the model is assembled
        from the base with the folder's tensors read in (d2export's own assembly, not transformers'
        loading of the folder), instead of computing every merged tensor a second time. When it
        found a few elements off (another tool's merge), it kept their correctly rounded values,
        and the folder's tensors with those set are that merge's, likewise. (Streamed, a computed
        merge is computed again at every pass over the model.) ``nudge``: every merged tensor's
        elements then moved a unit at random (:func:`.rounding.nudged`)."""
        weights = self.weights()
        plan = _rounded_plan(self.job, self.report.merged_dtype)
        attention = self.folder.config.get("attn_implementation") or self.folder.config.get("_attn_implementation")
        if isinstance(attention, str):
            # the folder's config.json names its attention code: the merge it is compared with runs the
            # same code, since another attention's float32 round-off is no loading fault
            plan = replace(plan, config_updates={**plan.config_updates, "attn_implementation": attention})
        run_dtype = numpy_dtype(dtype)

        def moved(t, values) -> np.ndarray:
            if not (nudge and t.action is Action.MERGE):
                return values
            # a unit of the dtype the model runs in, where that is the coarser: a float32 folder run
            # in bfloat16 has its weights rounded to bfloat16 as it loads
            values = np.asarray(values)
            if run_dtype.itemsize < values.dtype.itemsize:
                values = round_to_dtype(values, run_dtype)
            return nudged(values, seed=zlib.crc32(t.name.encode()))

        if weights is None or not weights.correctable:  # an exact folder is correctable, with nothing to correct
            if not nudge:
                return merged_model(plan, dtype, resident_bytes=self.resident)
            from ..merging import produce

            return merged_model(plan, dtype, resident_bytes=self.resident,
                                values=lambda t: moved(t, produce(plan, t)[0]))
        folder, prefix = self.folder, plan.arch.base_model_prefix
        corrections = {t.name: t.corrections for t in weights.tensors if t.corrections is not None}

        def value(t) -> np.ndarray:
            name = find_name(t.name, folder.tensors, prefix)
            if name is None:  # a buffer the folder leaves to transformers (weights.rebuilt_by_loader)
                return plan.base.read(t.source)
            stored = folder.read(name)
            if t.name in corrections:
                where, rounded = corrections[t.name]
                stored = np.array(stored)
                stored.reshape(-1)[where] = rounded.astype(stored.dtype)
            return moved(t, stored)

        return merged_model(plan, dtype, resident_bytes=self.resident, values=value)

    def compare(self, rung: str, candidate: str, reference: str, dtype: str, probe: bool = False,
                comparison: OutputComparison | None = None) -> OutputCheck:
        """``comparison``: the outputs' figures where they are folded already (:class:`Folds`; the
        full runs are done, and their outputs may be gone)."""
        if comparison is None:
            ref, cand = self.run(reference, dtype, probe), self.run(candidate, dtype, probe)
            comparison = compare_runs(ref, cand, self.batches[:1] if probe else self.batches,
                                      [0] if probe else self.order, distributions=self.distributions)
        else:
            cand = self.runs[candidate, dtype, False]
        generation = None
        if reference == UNMERGED and not probe:
            generation = followed_figures(self.continuation.get(dtype), cand.followed)
        return OutputCheck(rung, candidate, reference, dtype, self.output, comparison, generation)

    def checks(self, dtype: str, say) -> list[OutputCheck]:
        report, thresholds = self.report, self.options.thresholds
        try:
            self.side_by_side(dtype)
        except RuntimeError as exc:
            if dtype != "float32" and self._fails_in_transformers(dtype):
                raise D2ExportError(f"transformers cannot run this model in {dtype} ({exc}); the output checks run "
                                    "in float32 unless --dtypes asks otherwise") from exc
            raise
        folds = self.folds.pop(dtype)
        fidelity = self.compare("fidelity", FOLDER, UNMERGED, dtype, comparison=folds.folded("fidelity"))
        weights = self.weights()
        exact = weights is not None and weights.all_exact
        # When every tensor of the folder is the correctly rounded value, the folder *is* the
        # correctly rounded merge, provided it loads as that model: one batch shows that (a re-tied
        # head or an ignored tensor changes every output), and the folder's own
        # figures are then the floor, so the merge is not run over every input a second time.
        loading = self.compare("loading", FOLDER, ROUNDED, dtype, probe=exact,
                               comparison=None if exact else folds.folded("loading"))
        judge_loading(loading, exact)
        if exact and loading.passed:
            cost = replace(fidelity, rung="rounding cost", candidate=ROUNDED)
        elif exact:  # the folder's outputs were taken as the merge's: the merge and the reference run again
            cost = self.compare("rounding cost", ROUNDED, UNMERGED, dtype)
        else:
            cost = self.compare("rounding cost", ROUNDED, UNMERGED, dtype, comparison=folds.folded("rounding cost"))
        cost.rule = "figures only: what writing the folder's dtype costs"
        explicit = thresholds.atol is not None or thresholds.min_top1 is not None
        scale = fidelity.comparison.scale
        fixed_abs = thresholds.atol if thresholds.atol is not None else output_rtol(dtype, report.merged_dtype) * scale
        min_top1 = thresholds.min_top1 if thresholds.min_top1 is not None else MIN_TOP1[dtype]
        unit = ULP.get(report.merged_dtype)
        ceiling = None if unit is None else FLOOR_CEILING_UNITS * unit * scale
        checks = [fidelity, loading, cost]
        c, f = fidelity.comparison, cost.comparison
        beyond_fixed = c.max_abs > fixed_abs or (c.top1 is not None and c.top1 < min_top1)
        probe = None
        if (not explicit and beyond_fixed and (ceiling is None or f.max_abs > ceiling) and weights is not None
                and weights.passed and not weights.extra and (loading.passed or not exact)):
            probe = self._sensitivity(dtype, exact)
            checks.append(probe)
        sensitivity = None if probe is None else probe.comparison.max_abs
        judge_fidelity(fidelity, cost, fixed_abs=fixed_abs, min_top1=min_top1, explicit=explicit, ceiling=ceiling,
                       sensitivity=sensitivity, off_rounded=None if exact else loading.comparison.max_abs,
                       weight_units=None if weights is None else weights.summary()["max_units"])
        if fidelity.passed and beyond_fixed:
            report.notes.append(_rounding_note(dtype, report.merged_dtype, c, f, sensitivity))
        for key in [k for k in self.runs if k[1] == dtype and (k[0] != UNMERGED or not self._keeps_unmerged(dtype))]:
            del self.runs[key]
        return checks

    def _sensitivity(self, dtype: str, exact: bool) -> OutputCheck:
        """The floor is past what rounding explains at this scale: how far does the model move for
        rounding-sized changes? (outputs.FLOOR_CEILING_UNITS)"""
        probe = self.compare("rounding sensitivity", NUDGED, FOLDER if exact else ROUNDED, dtype)
        probe.rule = "figures only: how far the outputs move when every merged element moves a unit"
        probe.generation = None
        return probe

    def _fails_in_transformers(self, dtype: str) -> bool:
        """Whether the folder, loaded by transformers alone (no d2export layer in it), fails its first
        batch in ``dtype``: a model whose code mixes dtypes there (DeBERTa v1 in bfloat16 keeps its
        query and value biases in float32) is transformers' limit, not a failed check."""
        try:
            model_output(load_model(self.report.merged, TORCH_DTYPES[dtype], resident_bytes=self.resident),
                         self.batches[0])
        except RuntimeError:
            return True
        return False

    def _keeps_unmerged(self, dtype: str) -> bool:
        """Whether the unmerged model's run is kept past its dtype's rungs: for the PEFT comparison."""
        return self.peft.model and dtype == "float32"

    def _read_by_peft(self):
        with self.loading:  # as a model's loading: transformers sets process-wide state there
            return read_by_peft(self.job)

    def peft_checks(self, say) -> list[OutputCheck]:
        """PEFT's unmerged model against ours in float32, or its reading of the adapter, as
        :func:`.peft_reading.peft_reference` decided."""
        if self.peft.note is not None:
            self.report.notes.append(self.peft.note)
        if self.peft_reading is not None:
            say("PEFT's reading of the adapter")
            reading = self.report.peft_reading = self.peft_reading.result()
            if reading.error is not None:
                self.report.notes.append(f"PEFT's reading of the adapter not compared: PEFT could not build its "
                                         f"layers on an empty model ({reading.error})")
        if not self.peft.model:
            return []
        say("PEFT reference in float32")
        check = self.compare("references", PEFT, UNMERGED, "float32")
        check.generation = None
        judge_references(check, FP32_OUTPUT_RTOL * check.comparison.scale)
        return [check]


def _joined(parts: list[ModelRun]) -> ModelRun:
    """One run from the runs of disjoint parts of the batches."""
    outputs = [next((p.outputs[i] for p in parts if p.outputs[i] is not None), None)
               for i in range(len(parts[0].outputs))]
    return ModelRun(outputs, next((p.followed for p in parts if p.followed is not None), None))


def _rounding_note(dtype: str, merged_dtype: str, c, f, sensitivity: float | None) -> str:
    """The note for a folder past the fixed limits that the floor lets pass (``c`` its figures,
    ``f`` the correctly rounded merge's)."""
    return (f"outputs ({dtype}): the folder (max |d| {c.max_abs:.3g}, top-1 {percent(c.top1)}) is beyond the "
            f"fixed limits, but within what the correctly rounded {merged_dtype} merge's own distance "
            f"from the unmerged model allows (max |d| {f.max_abs:.3g}, top-1 {percent(f.top1)}): the difference "
            f"is the rounding of the output dtype, not the merge"
            + ("" if sensitivity is None else
               f", amplified by this model (a merge nudged a unit per element moves its outputs by "
               f"{sensitivity:.3g})"))


def _rounded_plan(job: Job, dtype: str):
    """The plan of the correctly rounded merge into ``dtype`` (the folder's): the job's own when it
    writes that dtype already."""
    floats = {str(t.out_dtype) for t in job.plan.tensors if t.update is not None or t.replacement is not None}
    if floats <= {dtype}:
        return job.plan
    return build_plan(job.spec, job.base, MergeOptions(dtype=dtype, compute_dtype="float64"))
