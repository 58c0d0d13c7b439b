"""The evaluate report (rnnlab.report.write_report) shows the study stage's n-gram order table
next to the neural LM rows."""

from __future__ import annotations

import json

from rnnlab.report import write_report

# The study stage's data/study/ngram_orders.json layout (rnnlab.study.ngram_orders.corpus_order_table).
TABLE = {
    "ptb": {
        "rows": [
            {"order": 1, "valid_ppl": 687.0, "test_ppl": 639.3, "test_unseen_share": 0.0},
            {"order": 2, "valid_ppl": 201.6, "test_ppl": 186.8, "test_unseen_share": 0.188943},
        ],
        "wall_s": 1.0,
    }
}


def _entry(tmp_path):
    (tmp_path / "models").mkdir()
    row = {"split": "test", "test_ppl": 132.4, "params": 2700000, "bptt": 35, "mlflow_run_id": "abc"}
    return {"task": "lm", "corpus": "ptb", "model": "lstm", "name": "ptb-lstm", "row": row,
            "checkpoint": tmp_path / "models" / "model.ckpt"}  # fmt: skip


def _report(tmp_path, study_dir):
    path = write_report(tmp_path / "reports", [_entry(tmp_path)], {}, {}, None, {}, tmp_path / "models", [study_dir])
    return path.read_text()


def test_report_shows_the_ngram_order_table_after_the_neural_rows(tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    (study / "ngram_orders.json").write_text(json.dumps(TABLE))
    md = _report(tmp_path, study)
    header = "| order | ptb val ppl | ptb test ppl | ptb unseen test n-grams |"
    assert header in md
    assert "| 1 | 687.0 | 639.3 | 0.0% |" in md and "| 2 | 201.6 | 186.8 | 18.9% |" in md
    lstm_row = md.index("| ptb | lstm | test | 132.4 |")
    assert md.index("## Language models") < lstm_row < md.index(header)  # in the LM section, after its rows


def test_report_without_the_study_table_has_no_order_section(tmp_path):
    md = _report(tmp_path, tmp_path / "no-study")
    assert "| ptb | lstm | test | 132.4 |" in md and "Kneser-Ney by order" not in md
