"""Answer evaluation: score a run's output against reference answers, labels and gold documents.

Metrics (each overall and per ``rag_status``):

- **EM** (exact match) and **token F1** with the SQuAD answer normalisation, as in the official SQuAD v1.1
  evaluation script (Rajpurkar et al., "SQuAD: 100,000+ Questions for Machine Comprehension of Text", EMNLP
  2016) and FlashRAG's ``ExactMatch``/``F1_Score`` (Jin et al., "FlashRAG: A Modular Toolkit for Efficient
  Retrieval-Augmented Generation Research", 2024): lowercase, remove ASCII punctuation, remove the articles
  a/an/the, collapse whitespace. ``F1 = 2 P R / (P + R)`` over the multiset of normalised tokens
  (``P = common / |prediction tokens|``, ``R = common / |reference tokens|``; 0 when nothing is common; 1 when
  both are empty). With several reference answers a record scores the maximum over them.
- **Label accuracy** for classification-style references (e.g. yes/no/maybe), by this rule
  (:func:`read_label`). Labels and texts are compared as *label words*: lowercase, every ASCII punctuation
  character becomes a space (so ``yes/no`` is two words and ``NOT_ENOUGH_INFO`` reads ``not enough info``), the
  articles a/an/the dropped, whitespace collapsed (:func:`label_words`); a label's name in the report is its label
  words joined by one space. The allowed labels are ``labels`` (default: every label seen in the references).

  1. If the row has a ``generation_json`` object with a string field named like the references' label field
     (``--label-field``, default ``label``), that value is the prediction's label when it is an allowed label, and
     **no label found** otherwise; the text is not read.
  2. Otherwise the text is scanned left to right; at each word the longest allowed label that starts there (a
     multi-word label matched as a whole phrase) is a match and the scan goes on after it, so a label inside a
     longer matching label does not count (``not supported`` is one match of ``not supported``, not also one of
     ``supported``). Exactly one distinct label matched (however often): that label. **More than one distinct
     label matched** (``yes, no``: the model echoing the instruction; ``yes ... but maybe``): **ambiguous**. None
     matched (or no prediction: generation failed or skipped): **no label found**.

  Ambiguous and no-label predictions are *unparsed*: they count as wrong and are reported apart. Per group the
  report gives ``label_records`` (records with a reference label: the denominator of ``label_accuracy``), the
  count per predicted label (``predicted_labels``, with the columns ``(ambiguous)`` and ``(no label)``), the
  confusion matrix ``confusion[reference][predicted]`` with the same columns, and a majority-class baseline:
  ``majority_baseline`` = the accuracy of always predicting ``majority_label``, the group's most frequent
  reference label (ties: the first in the report's label order), so an accuracy at or below it says the
  predictions carry no more than the label distribution.
- **Context recall** for references with gold document ids: the share of records whose passages sent to the
  model (the first ``contexts_used`` of ``contexts``; none when it is null; every one in parts written before the
  column existed) hold at least one gold document. Retrieval alone is scored by ``eval-retrieval``.

A record counts once: references without an output row are reported as ``missing`` and not scored; output
rows without a reference are ``unreferenced``. A row whose prediction is null (generation failed or skipped)
scores 0 on EM, F1 and accuracy.

Memory: the references are held as ``{id: reference}`` (answers, label, gold ids only); the output is read
part by part, batch by batch, projecting only the needed columns (``contexts_used``, ``contexts.doc_id``, not the
passage texts).
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


AMBIGUOUS = "(ambiguous)"
"""Report column of predictions in which more than one distinct allowed label matched."""
NO_LABEL = "(no label)"
"""Report column of predictions in which no allowed label was found (or that are null)."""

_PUNCT_TO_SPACE = str.maketrans({c: " " for c in string.punctuation})


def label_words(text: str) -> list[str]:
    """The label words of ``text`` (module docstring): lowercase, ASCII punctuation -> space, no a/an/the.

    ``"Yes/No."`` -> ``["yes", "no"]``; ``"NOT_ENOUGH_INFO"`` -> ``["not", "enough", "info"]``.
    """
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCT_TO_SPACE)).split()


def label_name(label: str) -> str:
    """The name of a label in the report and in comparisons: its label words joined by one space."""
    return " ".join(label_words(label))


@dataclass(frozen=True)
class LabelRead:
    """What :func:`read_label` found in one prediction.

    Attributes:
        label: the label name when exactly one allowed label was found, else None.
        found: the distinct label names matched, in order of first match (empty: none; 2 or more: ambiguous).
        source: ``"json"`` (from ``generation_json``), ``"text"`` (scanned), ``"none"`` (no prediction).
    """

    label: str | None
    found: tuple[str, ...] = ()
    source: str = "text"

    @property
    def column(self) -> str:
        """The report column: the label name, :data:`AMBIGUOUS` or :data:`NO_LABEL`."""
        if self.label is not None:
            return self.label
        return AMBIGUOUS if len(self.found) > 1 else NO_LABEL


def read_label(prediction: str | None, labels: Sequence[str], structured: Any = None,
               label_field: str = "label") -> LabelRead:
    """The label of a prediction by the documented rule (module docstring).

    Args:
        prediction: the generated text (None: no prediction).
        labels: the allowed labels (any case and punctuation; compared as label names, :func:`label_name`).
        structured: the parsed ``generation_json`` value of the row, if any.
        label_field: the key looked up in ``structured``.

    Returns:
        A :class:`LabelRead`: one label, ambiguous (several found) or no label found.
    """
    allowed = {n for n in (label_name(lab) for lab in labels) if n}
    if isinstance(structured, dict) and isinstance(structured.get(label_field), str):
        got = label_name(structured[label_field])
        return LabelRead(got, (got,), "json") if got in allowed else LabelRead(None, (), "json")
    if not prediction:
        return LabelRead(None, (), "none")
    phrases = sorted((n.split() for n in allowed), key=len, reverse=True)  # longest first at each word
    words = label_words(prediction)
    found: list[str] = []
    i = 0
    while i < len(words):
        for parts in phrases:
            if words[i : i + len(parts)] == parts:
                name = " ".join(parts)
                if name not in found:
                    found.append(name)
                i += len(parts)
                break
        else:
            i += 1
    return LabelRead(found[0] if len(found) == 1 else None, tuple(found), "text")


def parse_label(prediction: str | None, labels: Sequence[str], structured: Any = None,
                label_field: str = "label") -> str | None:
    """The label name of a prediction (:func:`read_label`), or None when it is ambiguous or has no label."""
    return read_label(prediction, labels, structured, label_field).label


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
def label_order(allowed: Sequence[str], references: Sequence[str] = ()) -> list[str]:
    """The label names in report order: the allowed labels as given (duplicates and empty names dropped), then
    reference labels that are not allowed, sorted (they can be scored, never predicted)."""
    order: list[str] = []
    for lab in allowed:
        n = label_name(lab)
        if n and n not in order:
            order.append(n)
    extra = sorted({n for n in (label_name(r) for r in references) if n and n not in order})
    return order + extra


def majority_baseline(reference_counts: dict[str, int], order: Sequence[str] = ()) -> tuple[str | None, float | None]:
    """``(label, accuracy)`` of always predicting the most frequent reference label.

    Args:
        reference_counts: label name -> records with that reference label.
        order: tie-break order (the first of the tied labels in it wins; labels not in it come after, sorted).

    Returns:
        ``(None, None)`` when there is no reference label, else the label and its share of all reference labels.
    """
    total = sum(reference_counts.values())
    if not total:
        return None, None
    rank = {n: i for i, n in enumerate(order)}
    label = min(reference_counts, key=lambda n: (-reference_counts[n], rank.get(n, len(rank)), n))
    return label, reference_counts[label] / total


@dataclass
class AnswerTally:
    """Running sums of one group of records (all records, or those of one ``rag_status``); pure.

    Feed it with :meth:`add` one record at a time; :meth:`result` gives the group's metrics.
    """

    records: int = 0
    em: float = 0.0
    f1: float = 0.0
    answered: int = 0  # records with reference answers
    correct: int = 0
    labelled: int = 0  # records with a reference label
    hit: int = 0
    with_gold: int = 0  # records with gold document ids
    confusion: dict[str, collections.Counter] = field(default_factory=dict)  # reference name -> Counter(column)

    def add(self, ref: Reference, prediction: str | None, label: LabelRead | None, context_docs: set[str]) -> None:
        """Count one record.

        Args:
            ref: its reference.
            prediction: its prediction text (None: no prediction).
            label: :func:`read_label` of the prediction; needed when ``ref.label`` is set (None counts as no label
                found), ignored otherwise.
            context_docs: document ids of the contexts sent to the model.
        """
        self.records += 1
        if ref.answers:
            self.answered += 1
            self.em += exact_match(prediction or "", ref.answers)
            self.f1 += token_f1(prediction or "", ref.answers)
        if ref.label is not None:
            read = label or LabelRead(None, (), "none")
            gold = label_name(ref.label)
            self.labelled += 1
            self.correct += read.label is not None and read.label == gold
            self.confusion.setdefault(gold, collections.Counter())[read.column] += 1
        if ref.doc_ids:
            self.with_gold += 1
            self.hit += bool(ref.doc_ids & context_docs)

    def result(self, order: Sequence[str] = ()) -> dict[str, Any]:
        """The group's metrics (a metric without records is None).

        Args:
            order: label names in report order (:func:`label_order`): the predicted-label columns, in this order,
                then :data:`AMBIGUOUS` and :data:`NO_LABEL`.

        Returns:
            ``records``; ``exact_match``, ``f1`` over ``answers`` records; ``label_accuracy`` over
            ``label_records``, ``labels_correct``, ``unparsed_labels`` = ``ambiguous_labels`` + ``no_label``,
            ``predicted_labels`` {column: count}, ``confusion`` {reference: {column: count}} (only reference labels
            present), ``majority_label``, ``majority_baseline``; ``context_recall`` over ``gold_doc_records``.
        """
        def mean(x: float, n: int) -> float | None:
            return x / n if n else None

        refs_seen = set(self.confusion)
        rows = [n for n in order if n in refs_seen] + sorted(refs_seen - set(order))
        predicted_seen = {c for cnt in self.confusion.values() for c in cnt} - {AMBIGUOUS, NO_LABEL}
        columns = list(order) + sorted(predicted_seen - set(order)) + [AMBIGUOUS, NO_LABEL]
        confusion = {r: {c: self.confusion[r][c] for c in columns} for r in rows}
        predicted = {c: sum(confusion[r][c] for r in rows) for c in columns}
        majority, baseline = majority_baseline({r: sum(self.confusion[r].values()) for r in rows}, order)
        return {
            "records": self.records,
            "exact_match": mean(self.em, self.answered), "f1": mean(self.f1, self.answered),
            "answers": self.answered,
            "label_records": self.labelled, "label_accuracy": mean(self.correct, self.labelled),
            "labels_correct": self.correct,
            "unparsed_labels": predicted[AMBIGUOUS] + predicted[NO_LABEL],
            "ambiguous_labels": predicted[AMBIGUOUS], "no_label": predicted[NO_LABEL],
            "majority_label": majority, "majority_baseline": baseline,
            "predicted_labels": predicted, "confusion": confusion,
            "context_recall": mean(self.hit, self.with_gold), "gold_doc_records": self.with_gold,
        }


@dataclass
class AnswerReport:
    """What :func:`evaluate_answers` measured. ``overall`` and each ``by_rag_status[status]`` are
    :meth:`AnswerTally.result` dicts. ``labels``: the label names in report order; ``ambiguous_ids`` /
    ``no_label_ids``: the first ids (at most ``max_listed_ids``) of records with a reference label whose prediction
    was ambiguous / had no label, to look at."""

    overall: dict[str, Any]
    by_rag_status: dict[str, dict[str, Any]]
    prediction: str
    labels: list[str]
    references: int
    missing: int
    unreferenced: int
    missing_ids: list[str] = field(default_factory=list)
    ambiguous_ids: list[str] = field(default_factory=list)
    no_label_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for ``--json``."""
        return {"prediction": self.prediction, "labels": self.labels, "references": self.references,
                "missing": self.missing, "unreferenced": self.unreferenced, "missing_ids": self.missing_ids,
                "ambiguous_ids": self.ambiguous_ids, "no_label_ids": self.no_label_ids,
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
        max_missing_ids: most ids listed in the report for each of missing, ambiguous and no label found.

    Raises:
        pipeline.errors.InputError: not an output directory, an unknown prediction column, or no output row
            has a reference.
        pipeline.errors.RunError: a committed part is unreadable.
    """
    if prediction not in ("generation", "rag_answer"):
        raise InputError(f"prediction column must be 'generation' or 'rag_answer', got {prediction!r}")
    ref_labels = [r.label for r in references.values() if r.label is not None]
    allowed = list(labels) if labels else sorted(set(ref_labels))
    order = label_order(allowed, ref_labels)
    overall = AnswerTally()
    per_status: dict[str, AnswerTally] = collections.defaultdict(AnswerTally)
    seen: set[str] = set()
    listed: dict[str, list[str]] = {AMBIGUOUS: [], NO_LABEL: []}
    unreferenced = 0
    columns = ["id", prediction, "rag_status", "generation_json", "contexts_used", "contexts.list.element.doc_id"]
    for batch in _output_batches(output, columns):
        n = len(batch["id"])
        preds = batch.get(prediction, [None] * n)
        statuses = batch.get("rag_status", [None] * n)
        structured = batch.get("generation_json", [None] * n)
        contexts = batch.get("contexts", [None] * n)
        used = batch.get("contexts_used")  # None: a part written before the column (every context counts)
        for i in range(n):
            rid = batch["id"][i]
            ref = references.get(rid)
            if ref is None:
                unreferenced += 1
                continue
            if rid in seen:
                continue  # a merged output never repeats an id; be safe with hand-made directories
            seen.add(rid)
            read = None
            if ref.label is not None:
                obj = None
                if structured[i]:
                    try:
                        obj = json.loads(structured[i])
                    except json.JSONDecodeError:
                        obj = None
                read = read_label(preds[i], allowed, obj, label_field)
                ids = listed.get(read.column)
                if ids is not None and len(ids) < max_missing_ids:
                    ids.append(rid)
            sent = (contexts[i] or [])[: (used[i] or 0) if used is not None else None]
            docs = {c["doc_id"] for c in sent if c and c.get("doc_id") is not None}
            overall.add(ref, preds[i], read, docs)
            per_status[statuses[i] or "unknown"].add(ref, preds[i], read, docs)
    if not seen:
        raise InputError(f"{output}: no output row has a reference (check the id field and the run directory)")
    missing = [rid for rid in references if rid not in seen]
    return AnswerReport(
        overall=overall.result(order),
        by_rag_status={k: v.result(order) for k, v in sorted(per_status.items())},
        prediction=prediction, labels=order, references=len(references), missing=len(missing),
        unreferenced=unreferenced, missing_ids=missing[:max_missing_ids],
        ambiguous_ids=listed[AMBIGUOUS], no_label_ids=listed[NO_LABEL],
    )


def format_report(report: AnswerReport) -> str:
    """The report as text: one row per group (all, then each rag_status) and metric, then for each group with
    reference labels its confusion matrix (reference x predicted, with the unparsed columns and a predicted
    total)."""

    def num(v: Any, width: int) -> str:
        if v is None:
            return f"{'-':>{width}}"
        return f"{v:>{width}.4f}" if isinstance(v, float) else f"{v:>{width}d}"

    head = (f"{'rag_status':<12}{'records':>8}{'EM':>8}{'F1':>8}{'labelled':>10}{'label_acc':>10}{'majority':>10}"
            f"{'ambiguous':>10}{'no_label':>9}{'ctx_recall':>11}")
    lines = [head]
    groups = [("all", report.overall)] + list(report.by_rag_status.items())
    for name, r in groups:
        lines.append(f"{name:<12}{num(r['records'], 8)}{num(r['exact_match'], 8)}{num(r['f1'], 8)}"
                     f"{num(r['label_records'], 10)}{num(r['label_accuracy'], 10)}{num(r['majority_baseline'], 10)}"
                     f"{num(r['ambiguous_labels'], 10)}{num(r['no_label'], 9)}{num(r['context_recall'], 11)}")
    lines.append(f"prediction column: {report.prediction}; references {report.references}, missing rows "
                 f"{report.missing}, rows without reference {report.unreferenced}; "
                 f"unparsed labels {report.overall['unparsed_labels']} (ambiguous "
                 f"{report.overall['ambiguous_labels']}, no label found {report.overall['no_label']})"
                 + (f"; labels: {', '.join(report.labels)}" if report.labels else ""))
    lines.append("labelled: records with a reference label (label_acc is over them); majority: accuracy of always "
                 "predicting the group's most frequent reference label")
    for name, r in groups:
        if not r["label_records"]:
            continue
        cols = list(r["predicted_labels"])
        width = {c: max(7, len(c) + 2) for c in cols}
        first = max([12] + [len(x) + 2 for x in r["confusion"]])
        lines.append("")
        lines.append(f"labels, {name}: {r['label_records']} labelled, accuracy {r['label_accuracy']:.4f}, majority "
                     f"'{r['majority_label']}' {r['majority_baseline']:.4f}; rows: reference, columns: predicted")
        lines.append(f"{'reference':<{first}}" + "".join(f"{c:>{width[c]}}" for c in cols) + f"{'total':>7}")
        for ref_name, cnt in r["confusion"].items():
            lines.append(f"{ref_name:<{first}}" + "".join(f"{cnt[c]:>{width[c]}d}" for c in cols)
                         + f"{sum(cnt.values()):>7d}")
        pred = r["predicted_labels"]
        lines.append(f"{'predicted':<{first}}" + "".join(f"{pred[c]:>{width[c]}d}" for c in cols)
                     + f"{r['label_records']:>7d}")
    if report.ambiguous_ids or report.no_label_ids:
        lines.append("")
    for what, ids in (("ambiguous", report.ambiguous_ids), ("no label found", report.no_label_ids)):
        if ids:
            lines.append(f"{what}: ids {', '.join(ids)}" + (" ..." if len(ids) < report.overall[
                "ambiguous_labels" if what == "ambiguous" else "no_label"] else ""))
    return "\n".join(lines)
