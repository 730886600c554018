"""Cut the bundled example data (data/example/) from the BEIR SciFact test split. Deterministic.

Picks 40 test claims (seeded sample), keeps every abstract they cite (qrels) and fills up to 400 abstracts
with a seeded sample of the other abstracts. Writes BEIR files (corpus.jsonl, queries.jsonl, qrels.tsv)
and records.jsonl (the same claims as `rag-pipeline run` input records).

Usage: python scripts/make_example_data.py [--scifact DIR] [--out data/example]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

N_QUERIES = 40
N_DOCS = 400
SEED = 20261122


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scifact", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "example"))
    args = ap.parse_args()
    src, out = Path(args.scifact), Path(args.out)

    queries = [json.loads(line) for line in (src / "queries.test.jsonl").open(encoding="utf-8")]
    qrels: dict[str, list[tuple[str, int]]] = {}
    with (src / "qrels" / "test.tsv").open(encoding="utf-8") as fh:
        next(fh)  # header
        for line in fh:
            qid, did, score = line.rstrip("\n").split("\t")
            qrels.setdefault(qid, []).append((did, int(score)))
    with gzip.open(src / "corpus.jsonl.gz", "rt", encoding="utf-8") as fh:
        corpus = [json.loads(line) for line in fh]

    rng = random.Random(SEED)
    picked = sorted(rng.sample(sorted(q["_id"] for q in queries if q["_id"] in qrels), N_QUERIES), key=int)
    relevant = sorted({did for qid in picked for did, _ in qrels[qid]}, key=int)
    others = sorted((d["_id"] for d in corpus if d["_id"] not in set(relevant)), key=int)
    keep = set(relevant) | set(rng.sample(others, N_DOCS - len(relevant)))

    out.mkdir(parents=True, exist_ok=True)
    with (out / "corpus.jsonl").open("w", encoding="utf-8") as fh:
        for d in corpus:  # original corpus order
            if d["_id"] in keep:
                fh.write(json.dumps({"_id": d["_id"], "title": d["title"], "text": d["text"]}, ensure_ascii=False) + "\n")
    by_id = {q["_id"]: q for q in queries}
    with (out / "queries.jsonl").open("w", encoding="utf-8") as fh:
        for qid in picked:
            fh.write(json.dumps({"_id": qid, "text": by_id[qid]["text"]}, ensure_ascii=False) + "\n")
    with (out / "qrels.tsv").open("w", encoding="utf-8") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for qid in picked:
            for did, score in qrels[qid]:
                fh.write(f"{qid}\t{did}\t{score}\n")
    with (out / "records.jsonl").open("w", encoding="utf-8") as fh:
        for qid in picked:
            rec = {"id": f"claim-{qid}", "query": by_id[qid]["text"], "claim_id": int(qid)}
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print(f"{out}: {len(keep)} abstracts ({len(relevant)} relevant), {len(picked)} queries")  # noqa: T201


if __name__ == "__main__":
    main()
