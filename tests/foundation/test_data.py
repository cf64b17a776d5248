"""Readers for the four layouts, layout errors naming file/line/key, seeded calibration windows."""

from __future__ import annotations

import json

import pytest

from adaflex.retrofit.data import calibration_windows, detect_layout, read_mc, read_text
from adaflex.retrofit.errors import UsageError
from tiny import SHARED, byte_tokenizer


def _jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_arc_numeric_labels_and_prompt(tmp_path):
    rec = {"question": "2+2?", "choices": {"text": ["3", "4", "5"], "label": ["1", "2", "3"]}, "answerKey": "2"}
    f = _jsonl(tmp_path / "arc.jsonl", [rec])
    (item,) = read_mc(f)
    assert detect_layout(f) == "arc"
    assert item.context == "Question: 2+2?\nAnswer:" and item.choices == (" 3", " 4", " 5") and item.label == 1


def test_piqa_and_hellaswag(tmp_path):
    p = _jsonl(tmp_path / "piqa.jsonl", [{"goal": "open a jar", "sol1": "twist", "sol2": "bite", "label": 0}])
    h = _jsonl(tmp_path / "hs.jsonl", [{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": "2"}])
    assert read_mc(p)[0].choices == (" twist", " bite")
    assert read_mc(h)[0].label == 2 and read_mc(h)[0].context == "A man"


@pytest.mark.shared_data
def test_shared_data_reads():
    arc = read_mc(SHARED / "arc_easy_validation.jsonl")
    hs = read_mc(SHARED / "hellaswag_dev.jsonl", limit=10)
    assert len(arc) == 570 and all(0 <= it.label < len(it.choices) for it in arc)
    assert len(hs) == 10 and hs[0].context.startswith("Roof shingle removal:")
    assert "Robert Boulter" in read_text(SHARED / "wikitext2_dev.txt")


@pytest.mark.parametrize("record,key", [
    ({"question": "q", "choices": {"text": ["a"]}, "answerKey": "A"}, "choices.label"),
    ({"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}, "answerKey"),
    ({"ctx": "x", "endings": ["a", "b"], "label": 7}, "label"),
    ({"goal": "g", "sol1": "a", "sol2": "b", "label": 3}, "label"),
])
def test_wrong_layout_names_file_line_key(tmp_path, record, key):
    f = _jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(UsageError) as e:
        read_mc(f)
    assert f"{f}:1" in str(e.value) and key in str(e.value)


def test_text_layout_errors(tmp_path):
    f = _jsonl(tmp_path / "t.jsonl", [{"text": "ok"}, {"txt": "no"}])
    with pytest.raises(UsageError, match=r"t.jsonl:2: key 'text'"):
        read_text(f, "jsonl")
    g = tmp_path / "g.jsonl"
    g.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(UsageError, match=r"g.jsonl:2: not valid JSON"):
        read_text(g)


def test_calibration_windows_seeded(text_file):
    tok = byte_tokenizer()
    text = text_file.read_text()
    a = calibration_windows(tok, text, 6, 32, seed=1)
    b = calibration_windows(tok, text, 6, 32, seed=1)
    c = calibration_windows(tok, text, 6, 32, seed=2)
    assert a.shape == (6, 32) and (a == b).all() and not (a == c).all()
    with pytest.raises(UsageError, match="fewer than seq_len"):
        calibration_windows(tok, "short", 1, 64, seed=0, source="tiny.txt")


def test_calibration_windows_skip_held_out_text(text_file):
    """`skip`: every window starts at or after that token (the text before it is held out for evaluation)."""
    tok = byte_tokenizer()
    text = text_file.read_text()
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    skip = ids.numel() - 200
    w = calibration_windows(tok, text, 8, 32, seed=3, skip=skip)
    tail = ids[skip:].tolist()
    def in_tail(row):
        return any(tail[s:s + 32] == row for s in range(len(tail) - 31))

    assert all(in_tail(row) for row in w.tolist())
    assert not all(in_tail(row) for row in calibration_windows(tok, text, 8, 32, seed=3).tolist())
    with pytest.raises(UsageError, match="fewer than skip"):
        calibration_windows(tok, text, 1, 64, seed=0, skip=ids.numel() - 10)
