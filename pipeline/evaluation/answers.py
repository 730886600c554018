"""Answer evaluation: score a run's output against reference answers, labels and gold documents.

Metrics (each overall and per ``rag_status``):

- **EM** (exact match) and **token F1** with the SQuAD answer normalisation, as in the official SQuAD v1.1
  evaluation script (Rajpurkar et al., "SQuAD: 100,000+ Questions for Machine Comprehension of Text", EMNLP
  2016) and FlashRAG's ``ExactMatch``/``F1_Score`` (Jin et al., "FlashRAG: A Modular Toolkit for Efficient
  Retrieval-Augmented Generation Research", 2024): lowercase, remove ASCII punctuation, remove the articles
  a/an/the, collapse whitespace. ``F1 = 2 P R / (P + R)`` over the multiset of normalised tokens
  (``P = common / |prediction tokens|``, ``R = common / |reference tokens|``; 0 when nothing is common; 1 when
  both are empty). With several reference answers a record scores the maximum over them.
- **Label accuracy** for classification-style references (e.g. yes/no/maybe). The label of a prediction is
  parsed by this rule (:func:`parse_label`): if the row has a ``generation_json`` object with a string field
  named like the references' label field, that value (normalised) is the label; otherwise the first word of the
  normalised prediction text that is one of the allowed labels (``labels``, default: every label seen in the
  references; multi-word labels are matched as whole phrases, earliest first). No allowed label found: the
  prediction is unparsed and counts as wrong.
- **Context recall** for references with gold document ids: the share of records whose ``contexts`` hold at
  least one gold document.

A record counts once: references without an output row are reported as ``missing`` and not scored; output
rows without a reference are ``unreferenced``. A row whose prediction is null (generation failed or skipped)
scores 0 on EM, F1 and accuracy.

Memory: the references are held as ``{id: reference}`` (answers, label, gold ids only); the output is read
part by part, batch by batch, projecting only the needed columns (``contexts.doc_id``, not the passage texts).
"""

from __future__ import annotations

import collections
import json
import re
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.evaluation.jsonl import iter_json_objects

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)

READ_BATCH_ROWS = 1024
"""Rows per Parquet record batch read from the output."""


# --- formulas ------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop articles (a, an, the), collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals one normalised reference, else 0.0."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """Best SQuAD token F1 of the prediction over the references (module docstring), in [0, 1]."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for ref in references:
        gold = normalize_answer(ref).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
        if common == 0:
            continue
        precision, recall = common / len(pred), common / len(gold)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def parse_label(prediction: str | None, labels: Sequence[str], structured: Any = None,
                label_field: str = "label") -> str | None:
    """The label of a prediction by the documented rule (module docstring); None if none is found.

    Args:
        prediction: the generated text (None: no prediction).
        labels: the allowed labels (any case; compared normalised).
        structured: the parsed ``generation_json`` value of the row, if any.
        label_field: the key looked up in ``structured``.
    """
    allowed = {normalize_answer(lab): lab for lab in labels}
    if isinstance(structured, dict) and isinstance(structured.get(label_field), str):
        got = normalize_answer(structured[label_field])
        return got if got in allowed else None
    if not prediction:
        return None
    words = normalize_answer(prediction).split()
    best: tuple[int, str] | None = None
    for norm in allowed:
        parts = norm.split()
        if not parts:
            continue
        for i in range(len(words) - len(parts) + 1):
            if words[i : i + len(parts)] == parts:
                if best is None or i < best[0]:
                    best = (i, norm)
                break
    return best[1] if best else None


# --- references -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """One record's reference: answers (possibly several), label, gold document ids (each optional)."""

    answers: tuple[str, ...] = ()
    label: str | None = None
    doc_ids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ReferenceFields:
    """Field names in the references JSONL."""

    id: str = "id"
    answer: str = "answer"
    label: str = "label"
    doc_ids: str = "doc_ids"


def load_references(path: str | Path, fields: ReferenceFields = ReferenceFields()) -> dict[str, Reference]:
    """Read references: JSONL, one object a line with the id and any of answer (string or list of strings),
    label (string) and gold document ids (list of strings/integers).

    Raises:
        pipeline.errors.InputError: missing file, non-UTF-8, invalid JSON, a missing id, a field of the wrong
            type, a line with none of answer/label/doc_ids, a duplicate id, or no reference (file:line: field).
    """
    p = Path(path)
    refs: dict[str, Reference] = {}
    for where, rec in iter_json_objects(p, "references file"):
        rid = rec.get(fields.id)
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
            raise InputError(f"{where}: field '{fields.id}' is missing or not a string/integer")
        ans = rec.get(fields.answer)
        if isinstance(ans, str):
            answers: tuple[str, ...] = (ans,)
        elif ans is None:
            answers = ()
        elif isinstance(ans, list) and ans and all(isinstance(a, str) for a in ans):
            answers = tuple(ans)
        else:
            raise InputError(f"{where}: field '{fields.answer}' must be a string or a non-empty list of strings")
        label = rec.get(fields.label)
        if label is not None and not isinstance(label, str):
            raise InputError(f"{where}: field '{fields.label}' must be a string")
        docs = rec.get(fields.doc_ids)
        if docs is not None and (not isinstance(docs, list) or not all(
                isinstance(d, (str, int)) and not isinstance(d, bool) for d in docs)):
            raise InputError(f"{where}: field '{fields.doc_ids}' must be a list of document ids")
        if not answers and label is None and not docs:
            raise InputError(
                f"{where}: none of the fields '{fields.answer}', '{fields.label}', '{fields.doc_ids}' is present")
        if str(rid) in refs:
            raise InputError(f"{where}: duplicate id {rid!r}")
        refs[str(rid)] = Reference(answers, label, frozenset(str(d) for d in docs or ()))
    if not refs:
        raise InputError(f"{p}: no references")
    return refs


# --- aggregation --------------------------------------------------------------------------------------
@dataclass
class _Sums:
    records: int = 0
    em: float = 0.0
    f1: float = 0.0
    answered: int = 0  # records with reference answers
    correct: int = 0
    labelled: int = 0  # records with a reference label
    unparsed: int = 0
    hit: int = 0
    with_gold: int = 0  # records with gold document ids

    def add(self, ref: Reference, prediction: str | None, label: str | None, context_docs: set[str]) -> None:
        self.records += 1
        if ref.answers:
            self.answered += 1
            self.em += exact_match(prediction or "", ref.answers)
            self.f1 += token_f1(prediction or "", ref.answers)
        if ref.label is not None:
            self.labelled += 1
            self.unparsed += label is None
            self.correct += label is not None and label == normalize_answer(ref.label)
        if ref.doc_ids:
            self.with_gold += 1
            self.hit += bool(ref.doc_ids & context_docs)

    def result(self) -> dict[str, Any]:
        def mean(x: float, n: int) -> float | None:
            return x / n if n else None

        return {
            "records": self.records,
            "exact_match": mean(self.em, self.answered), "f1": mean(self.f1, self.answered),
            "answers": self.answered,
            "label_accuracy": mean(self.correct, self.labelled), "labels": self.labelled,
            "unparsed_labels": self.unparsed,
            "context_recall": mean(self.hit, self.with_gold), "gold_doc_records": self.with_gold,
        }


@dataclass
class AnswerReport:
    """What :func:`evaluate_answers` measured. ``overall`` and each ``by_rag_status[status]`` hold
    ``records``, ``exact_match``, ``f1`` (over ``answers`` records), ``label_accuracy`` (over ``labels``),
    ``unparsed_labels``, ``context_recall`` (over ``gold_doc_records``); a metric without records is None."""

    overall: dict[str, Any]
    by_rag_status: dict[str, dict[str, Any]]
    prediction: str
    labels: list[str]
    references: int
    missing: int
    unreferenced: int
    missing_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for ``--json``."""
        return {"prediction": self.prediction, "labels": self.labels, "references": self.references,
                "missing": self.missing, "unreferenced": self.unreferenced, "missing_ids": self.missing_ids,
                "overall": self.overall, "by_rag_status": self.by_rag_status}


def _output_batches(output: str | Path, columns: list[str]) -> Iterator[dict[str, list]]:
    """Column lists of the committed rows, one Parquet record batch at a time (only ``columns``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.errors import RunError
    from pipeline.output import part_paths, run_dirs

    for d in run_dirs(output):
        for part in part_paths(d):
            try:
                pf = pq.ParquetFile(part)
                names = set(pf.schema_arrow.names)
                cols = [c for c in columns if c.split(".", 1)[0] in names]
                for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=cols):
                    yield batch.to_pydict()
            except (OSError, pa.ArrowException) as exc:
                raise RunError(f"{part}: cannot read committed part: {exc}") from None


def evaluate_answers(
    output: str | Path,
    references: dict[str, Reference],
    *,
    prediction: str = "generation",
    labels: Sequence[str] | None = None,
    label_field: str = "label",
    max_missing_ids: int = 20,
) -> AnswerReport:
    """Score the committed rows of a run (or sharded root) against references (module docstring).

    Args:
        output: a run directory or a root of ``shard-I-of-N`` directories.
        references: from :func:`load_references`.
        prediction: the output column holding the prediction (``generation`` or ``rag_answer``).
        labels: allowed labels; None = every label of the references.
        label_field: key of the label in a row's ``generation_json`` object.
        max_missing_ids: most missing ids listed in the report.

    Raises:
        pipeline.errors.InputError: not an output directory, an unknown prediction column, or no output row
            has a reference.
        pipeline.errors.RunError: a committed part is unreadable.
    """
    if prediction not in ("generation", "rag_answer"):
        raise InputError(f"prediction column must be 'generation' or 'rag_answer', got {prediction!r}")
    allowed = list(labels) if labels else sorted({r.label for r in references.values() if r.label is not None})
    overall = _Sums()
    per_status: dict[str, _Sums] = collections.defaultdict(_Sums)
    seen: set[str] = set()
    unreferenced = 0
    columns = ["id", prediction, "rag_status", "generation_json", "contexts.list.element.doc_id"]
    for batch in _output_batches(output, columns):
        n = len(batch["id"])
        preds = batch.get(prediction, [None] * n)
        statuses = batch.get("rag_status", [None] * n)
        structured = batch.get("generation_json", [None] * n)
        contexts = batch.get("contexts", [None] * n)
        for i in range(n):
            rid = batch["id"][i]
            ref = references.get(rid)
            if ref is None:
                unreferenced += 1
                continue
            if rid in seen:
                continue  # a merged output never repeats an id; be safe with hand-made directories
            seen.add(rid)
            obj = None
            if structured[i]:
                try:
                    obj = json.loads(structured[i])
                except json.JSONDecodeError:
                    obj = None
            label = parse_label(preds[i], allowed, obj, label_field) if ref.label is not None else None
            docs = {c["doc_id"] for c in contexts[i] or () if c and c.get("doc_id") is not None}
            overall.add(ref, preds[i], label, docs)
            per_status[statuses[i] or "unknown"].add(ref, preds[i], label, docs)
    if not seen:
        raise InputError(f"{output}: no output row has a reference (check the id field and the run directory)")
    missing = [rid for rid in references if rid not in seen]
    return AnswerReport(
        overall=overall.result(),
        by_rag_status={k: v.result() for k, v in sorted(per_status.items())},
        prediction=prediction, labels=allowed, references=len(references), missing=len(missing),
        unreferenced=unreferenced, missing_ids=missing[:max_missing_ids],
    )


def format_report(report: AnswerReport) -> str:
    """The report as a text table: one row per group (all, then each rag_status), one column per metric."""

    def cell(v: Any, pct: bool = True) -> str:
        return f"{'-':>9}" if v is None else (f"{v:>9.4f}" if pct else f"{v:>9d}")

    head = f"{'rag_status':<12}{'records':>9}{'EM':>9}{'F1':>9}{'label_acc':>10}{'ctx_recall':>11}"
    lines = [head]
    groups = [("all", report.overall)] + list(report.by_rag_status.items())
    for name, r in groups:
        lines.append(f"{name:<12}{cell(r['records'], False)}{cell(r['exact_match'])}{cell(r['f1'])} "
                     f"{cell(r['label_accuracy'])}  {cell(r['context_recall'])}")
    lines.append(f"prediction column: {report.prediction}; references {report.references}, missing rows "
                 f"{report.missing}, rows without reference {report.unreferenced}; "
                 f"unparsed labels {report.overall['unparsed_labels']}"
                 + (f"; labels: {', '.join(report.labels)}" if report.labels else ""))
    return "\n".join(lines)
