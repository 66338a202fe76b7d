"""Data layer: every repair is counted, every user mistake is a one-line error naming the file/column/id."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.data import (load_pairs, parse_frame, parse_turns, swap_label, swap_probabilities)
from pipeline.errors import UserError

HEADER = "id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie"


def row(id_="1", prompt='["hi"]', a='["A"]', b='["B"]', labels=("1", "0", "0")) -> dict:
    return {"id": id_, "prompt": prompt, "response_a": a, "response_b": b, "winner_model_a": labels[0],
            "winner_model_b": labels[1], "winner_tie": labels[2]}


def frame(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


def write_csv(path, text: str, encoding="utf-8") -> str:
    path.write_bytes(text.encode(encoding))
    return str(path)


@pytest.mark.parametrize("cell, turns, repairs", [
    ('["a", "b"]', ["a", "b"], []),
    ('[null]', [""], ["null_turn"]),
    ('["x", null]', ["x", ""], ["null_turn"]),
    ('[true]', ["true"], ["scalar_turn"]),
    ('[3.5]', ["3.5"], ["scalar_turn"]),
    ('[{"k": 1}]', ['{"k": 1}'], ["nested_turn"]),
    ("plain text, not JSON", ["plain text, not JSON"], ["plain_text"]),
    ("42", ["42"], ["plain_text"]),
    ('"just a string"', ["just a string"], ["json_string"]),
    ("", [""], ["empty_cell"]),
    ("   ", [""], ["empty_cell"]),
    (None, [""], ["empty_cell"]),
    ("[]", [""], ["empty_list"]),
    (["already", "decoded"], ["already", "decoded"], []),
])
def test_parse_turns(cell, turns, repairs):
    assert parse_turns(cell) == (turns, repairs)


def test_lone_surrogate_replaced_and_valid_pair_kept():
    turns, repairs = parse_turns('["bad \\ud83d here", "ok \\ud83d\\ude00"]')
    assert turns == ["bad \ufffd here", "ok \U0001F600"]
    assert repairs == ["lone_surrogate"]
    "".join(turns).encode("utf-8")  # must not raise


def test_repairs_are_counted_per_row_and_kind():
    data = parse_frame(frame(row("1", a="[null]"), row("2", b="plain", labels=("0", "1.0", "0")), row("3")),
                       "t.csv", with_labels=True)
    assert data.n_repaired == 2
    assert data.repairs == {"label_format": 1, "null_turn": 1, "plain_text": 1}
    assert list(data.frame["label"]) == [0, 1, 0]
    assert len(data.frame) == 3  # nothing dropped


def test_labels_as_floats_and_ids_as_int_or_str():
    data = parse_frame(frame(row(12, labels=("0.0", "0.0", "1.0")), row("abc", labels=(0, 1, 0))), "t",
                       with_labels=True)
    assert list(data.frame["id"]) == ["12", "abc"]
    assert list(data.frame["label"]) == [2, 1]
    assert data.label_counts() == {"a": 0, "b": 1, "tie": 1}


def test_extra_columns_ride_along_and_test_layout(tmp_path):
    raw = frame(row("7"))
    raw["source"] = "x"
    data = parse_frame(raw.drop(columns=["winner_model_a", "winner_model_b", "winner_tie"]), "t", with_labels=False)
    # Extra columns ride along as text (cv.group_by may name one); the label columns become `label`.
    assert list(data.frame.columns) == ["id", "prompt", "response_a", "response_b", "label", "source"]
    assert not data.has_labels


def test_bom_and_crlf(tmp_path):
    text = "\ufeff" + HEADER + "\r\n" + '1,m,n,"[""q""]","[""a\r\nb""]","[""c""]",1,0,0\r\n'
    data = load_pairs(write_csv(tmp_path / "t.csv", text), with_labels=True)
    assert data.frame.loc[0, "response_a"] == ["a\r\nb"]
    assert data.frame.loc[0, "id"] == "1"


def test_parquet_with_decoded_lists(tmp_path):
    raw = frame(row("1"), row("2"))
    raw["prompt"] = [["p1"], ["p2", "p3"]]
    path = tmp_path / "t.parquet"
    raw.to_parquet(path)
    data = load_pairs(path, with_labels=True)
    assert data.frame.loc[1, "prompt"] == ["p2", "p3"]


@pytest.mark.parametrize("labels, message", [
    (("0", "0", "0"), "row id 5: expected exactly one winner"),
    (("1", "1", "0"), "row id 5: expected exactly one winner"),
    (("yes", "0", "0"), "row id 5: column winner_model_a is 'yes'"),
    (("2", "0", "0"), "row id 5: column winner_model_a is '2'"),
])
def test_bad_labels_name_the_id(labels, message):
    with pytest.raises(UserError, match=message):
        parse_frame(frame(row("4"), row("5", labels=labels)), "t.csv", with_labels=True)


def test_missing_column_is_named():
    with pytest.raises(UserError, match="missing required column response_b"):
        parse_frame(frame(row()).drop(columns=["response_b"]), "t.csv", with_labels=True)


def test_duplicate_id_is_named():
    with pytest.raises(UserError, match="duplicate id 9"):
        parse_frame(frame(row("9"), row("8"), row("9")), "t.csv", with_labels=True)


def test_empty_id_is_reported():
    with pytest.raises(UserError, match="row 3: empty or null id"):
        parse_frame(frame(row("1"), row("")), "t.csv", with_labels=True)


def test_no_rows(tmp_path):
    with pytest.raises(UserError, match="no rows"):
        load_pairs(write_csv(tmp_path / "t.csv", HEADER + "\n"), with_labels=True)
    with pytest.raises(UserError, match="no rows"):
        load_pairs(write_csv(tmp_path / "e.csv", ""), with_labels=True)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="nope.csv: file not found"):
        load_pairs(tmp_path / "nope.csv", with_labels=True)


def test_not_utf8(tmp_path):
    path = write_csv(tmp_path / "latin.csv", HEADER + '\n1,m,n,"[""caf\xe9""]","[""a""]","[""b""]",1,0,0\n', "latin-1")
    with pytest.raises(UserError, match="latin.csv: not UTF-8 .*offset"):
        load_pairs(path, with_labels=True)


def test_swap_helpers():
    assert [swap_label(y) for y in (0, 1, 2)] == [1, 0, 2]
    probs = np.array([[0.6, 0.3, 0.1]])
    assert swap_probabilities(probs).tolist() == [[0.3, 0.6, 0.1]]


def test_demo_data_is_deterministic_and_valid(tmp_path):
    from pipeline.demo_data import ensure_demo_files, make_rows

    assert make_rows(50, 3, True).equals(make_rows(50, 3, True))
    train, test = ensure_demo_files(tmp_path, 120, 10, seed=1)
    data = load_pairs(train, with_labels=True)
    counts = data.label_counts()
    assert len(data.frame) == 120 and min(counts.values()) > 10
    assert data.frame["prompt"].map(len).max() == 2  # some multi-turn rows
    assert data.frame["prompt"].map(tuple).duplicated().any()  # repeated prompts: folds must group
    assert not load_pairs(test, with_labels=False).has_labels
    json.loads(pd.read_csv(train)["response_a"][0])
