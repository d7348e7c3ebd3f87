"""Tests of the batch command's input and output checks (clients/batch.py), before any job is sent."""

from __future__ import annotations

import json

import pytest

from confide.clients.batch import BatchInputError, BatchOutputError, batch_id_for, check_output, read_input
from confide.schemas.messages import GenerationParams


def test_read_input_rows_in_order_with_ids(tmp_path):
    """Rows keep their order; a row without an id gets its line number; Hindi passes through unchanged."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "prompt": "Hi"}\n\n{"prompt": "नमस्ते"}\n{"id": 7, "prompt": "x"}\n', encoding="utf-8")

    _, rows = read_input(path)

    assert rows == [("a", "Hi"), ("3", "नमस्ते"), ("7", "x")]


def test_read_input_byte_order_mark_ignored(tmp_path):
    """A UTF-8 byte order mark before the first line is not part of it."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "Hi"}).encode())

    assert read_input(path)[1] == [("1", "Hi")]


def test_read_input_line_separator_inside_prompt(tmp_path):
    """U+2028 inside a JSON string does not split the line."""
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": "one\u2028two"}, ensure_ascii=False) + "\n", encoding="utf-8")

    assert read_input(path)[1] == [("1", "one\u2028two")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"prompt": "ok"}\n{"prompt": "\xff"}\n', r"in.jsonl:2: not valid UTF-8 \(byte 13 of the line\)"),
        (b'{"prompt": "ok"}\n{"prompt": "x",}\n', r"in.jsonl:2, column 16: not valid JSON \(Expecting property name"),
        (b'{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', r"in.jsonl:2: id 'a' repeats line 1"),
        (b'{"id": "2", "prompt": "x"}\n{"prompt": "y"}\n', r"in.jsonl:2: id '2' repeats line 1"),
        (b'{"text": "x"}\n', r'in.jsonl:1: each line must be an object with a string "prompt"'),
        (b"\n\n", r"in.jsonl has no prompts"),
    ],
)
def test_read_input_rejects_bad_file(tmp_path, content, message):
    """Each kind of bad input file gets one error naming the line and the problem."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)

    with pytest.raises(BatchInputError, match=message):
        read_input(path)


def test_batch_id_depends_on_settings(tmp_path):
    """The same file with other generation settings is another batch; with the same ones, the same batch."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "Hi"}\n')
    file_id, _ = read_input(path)

    short = batch_id_for(file_id, GenerationParams(max_tokens=16))

    assert short == batch_id_for(file_id, GenerationParams(max_tokens=16))
    assert short != batch_id_for(file_id, GenerationParams(max_tokens=32))
    assert short != batch_id_for(file_id, GenerationParams(max_tokens=16, temperature=0.0))


def test_check_output_rejects_unwritable_place(tmp_path):
    """A results path in a missing folder, or a folder itself, is rejected before any job is sent."""
    check_output(tmp_path / "out.jsonl")

    with pytest.raises(BatchOutputError, match="the folder .*missing does not exist"):
        check_output(tmp_path / "missing" / "out.jsonl")
    with pytest.raises(BatchOutputError, match="it is a folder"):
        check_output(tmp_path)


def test_token_limit_notice_names_the_limit_reached():
    """confide ask's notice points at --max-tokens only when that was the limit, else at the context size."""
    from confide.cli import _token_limit_notice

    assert "raise it for more" in _token_limit_notice(512, 512)
    assert "--n-ctx" in _token_limit_notice(4042, 32768)
