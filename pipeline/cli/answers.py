"""`rag-pipeline eval-answers`: score a run's output against reference answers, labels and gold documents."""

from __future__ import annotations

import click

from pipeline.cli.options import handle_errors


@click.command("eval-answers")
@click.argument("output", type=click.Path(file_okay=False, exists=True))
@click.option("--references", required=True, type=click.Path(dir_okay=False),
              help="JSONL: record id + reference answer (string or list), label and/or gold document ids.")
@click.option("--id-field", default="id", show_default=True, help="References: field with the record id.")
@click.option("--answer-field", default="answer", show_default=True, help="References: reference answer(s).")
@click.option("--label-field", default="label", show_default=True,
              help="References: label (also looked up in a row's generation_json object).")
@click.option("--doc-ids-field", default="doc_ids", show_default=True, help="References: gold document ids.")
@click.option("--labels", default=None,
              help="Allowed labels, comma-separated (default: every label in the references).")
@click.option("--prediction", type=click.Choice(["generation", "rag_answer"]), default="generation",
              show_default=True, help="Output column scored as the prediction.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the report to this JSON file.")
@handle_errors
def eval_answers_cmd(output: str, references: str, id_field: str, answer_field: str, label_field: str,
                     doc_ids_field: str, labels: str | None, prediction: str, json_out: str | None) -> None:
    """Score OUTPUT (a run directory or a sharded root) against --references.

    Exact match and token F1 (SQuAD normalisation), label accuracy over the records with a reference label (the
    label field of generation_json, else the one allowed label found in the text; two or more different labels
    are ambiguous, none is no label found: both unparsed and wrong), counts per predicted label, the confusion
    matrix, the majority-class baseline, context recall (gold document among the contexts), each overall and
    per rag_status.

    Example: rag-pipeline eval-answers output/run --references refs.jsonl --labels yes,no,maybe --json r.json
    """
    import json
    from pathlib import Path

    from pipeline.evaluation.answers import ReferenceFields, evaluate_answers, format_report, load_references

    refs = load_references(references, ReferenceFields(id_field, answer_field, label_field, doc_ids_field))
    allowed = [x.strip() for x in labels.split(",") if x.strip()] if labels else None
    report = evaluate_answers(output, refs, prediction=prediction, labels=allowed, label_field=label_field)
    click.echo(format_report(report))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
