"""Text sources -> documents -> token stream -> windows and calibration samples."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from swiss_knife.config import DataConfig
from swiss_knife.data import (
    is_local_source,
    load_token_stream,
    read_documents,
    sample_calibration,
    split_documents,
    token_windows,
    tokenize_documents,
)
from swiss_knife.errors import DataError, MissingDependencyError, UserInputError

TEXT = "First line of one.\nSecond line of one.\n\n  \nOther paragraph.\n\n\nLast one."


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def cfg(source: Path | str, **kwargs: Any) -> DataConfig:
    return DataConfig(source=str(source), **kwargs)


# --------------------------------------------------------------------------- plain text


def test_txt_split_none(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", f"\n{TEXT}\n\n")
    assert read_documents(cfg(path)) == [TEXT]
    # A bare string is a source too.
    assert read_documents(str(path)) == [TEXT]


def test_txt_split_paragraph(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", TEXT)
    assert read_documents(cfg(path, split_documents="paragraph")) == [
        "First line of one.\nSecond line of one.",
        "Other paragraph.",
        "Last one.",
    ]


def test_txt_split_line(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", TEXT.replace("\n", "\r\n"))
    assert read_documents(cfg(path, split_documents="line")) == [
        "First line of one.",
        "Second line of one.",
        "Other paragraph.",
        "Last one.",
    ]


def test_split_documents_rejects_unknown_mode() -> None:
    with pytest.raises(DataError, match="unknown document split 'word'"):
        split_documents("a b", "word")


@pytest.mark.parametrize("suffix", [".md", ".raw", ".text", ".TXT"])
def test_other_text_suffixes(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path / f"wiki.test{suffix}", "hello")
    assert read_documents(cfg(path)) == ["hello"]


def test_max_documents(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", "a\nb\nc\nd\n")
    assert read_documents(cfg(path, split_documents="line", max_documents=2)) == ["a", "b"]


def test_encoding_option(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes("café crème".encode("latin-1"))
    assert read_documents(cfg(path, encoding="latin-1")) == ["café crème"]
    with pytest.raises(DataError, match="not valid utf-8 text"):
        read_documents(cfg(path))


def test_unknown_encoding(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", "hi")
    with pytest.raises(DataError, match="unknown text encoding 'no-such-codec'"):
        read_documents(cfg(path, encoding="no-such-codec"))


# --------------------------------------------------------------------------- structured files


def test_jsonl_with_field(tmp_path: Path) -> None:
    rows = [{"content": "one", "id": 1}, {"content": "two\u2028still two", "id": 2}]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    path = write(tmp_path / "a.jsonl", lines[0] + "\n\n" + lines[1] + "\r\n")
    assert read_documents(cfg(path, field="content")) == ["one", "two\u2028still two"]


def test_jsonl_missing_field_lists_fields(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", '{"text": "ok"}\n{"body": "x", "id": 3}\n')
    with pytest.raises(DataError) as info:
        read_documents(cfg(path))
    message = str(info.value)
    assert f"{path}:2" in message
    assert "no field 'text'" in message and "(fields: body, id)" in message


def test_jsonl_bad_json_names_line_number(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:3: not valid JSON"):
        read_documents(cfg(path))


def test_jsonl_non_object_and_non_text_rows(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", '["a list"]\n')
    with pytest.raises(DataError, match="expected an object with a 'text' field"):
        read_documents(cfg(path))
    path = write(tmp_path / "b.jsonl", '{"text": 5}\n')
    with pytest.raises(DataError, match="field 'text' is not text"):
        read_documents(cfg(path))


def test_json_list_of_objects_and_strings(tmp_path: Path) -> None:
    path = write(tmp_path / "a.json", json.dumps([{"text": "one"}, {"text": "two"}]))
    assert read_documents(cfg(path)) == ["one", "two"]
    path = write(tmp_path / "b.json", json.dumps(["x", "", "y"]))
    assert read_documents(cfg(path)) == ["x", "y"]


def test_json_dict_of_list(tmp_path: Path) -> None:
    path = write(tmp_path / "a.json", json.dumps({"body": ["one", "two"], "meta": 1}))
    assert read_documents(cfg(path, field="body")) == ["one", "two"]


def test_json_errors(tmp_path: Path) -> None:
    path = write(tmp_path / "a.json", '[{"text": "a"},\n {"text": }]')
    with pytest.raises(DataError, match=r"not valid JSON .* at line 2"):
        read_documents(cfg(path))
    path = write(tmp_path / "b.json", json.dumps({"other": "x"}))
    with pytest.raises(DataError, match="expected a list of objects or of strings"):
        read_documents(cfg(path))
    path = write(tmp_path / "c.json", json.dumps([{"text": "a"}, {"body": "b"}]))
    with pytest.raises(DataError, match=r"c\.json\[1\]: no field 'text' \(fields: body\)"):
        read_documents(cfg(path))


def test_csv(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerow([1, "plain row"])
        writer.writerow([2, "a row, with a comma and\na line break"])
        writer.writerow([3, ""])
    assert read_documents(cfg(path)) == ["plain row", "a row, with a comma and\na line break"]


def test_csv_missing_column(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "id,body\n1,x\n")
    with pytest.raises(DataError, match=r"no column 'text' \(columns: id, body\)"):
        read_documents(cfg(path))


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "a.parquet"
    table = pa.table({"id": [1, 2, 3], "content": ["alpha", None, "gamma"]})
    pq.write_table(table, path)
    assert read_documents(cfg(path, field="content")) == ["alpha", "gamma"]
    with pytest.raises(DataError, match=r"no column 'text' \(columns: id, content\)"):
        read_documents(cfg(path))


def test_corrupt_parquet(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    path = tmp_path / "a.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable parquet file"):
        read_documents(cfg(path))


def test_folder_of_text_files(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    write(folder / "b.txt", "second file")
    write(folder / "a.txt", "first file\n\nstill first")
    write(folder / "sub" / "c.TXT", "nested file")
    write(folder / "notes.log", "not a text source")
    (folder / "image.png").write_bytes(b"\x89PNG\xff\xfe")
    assert read_documents(cfg(folder)) == [
        "first file\n\nstill first",
        "second file",
        "nested file",
    ]
    assert read_documents(cfg(folder, split_documents="paragraph")) == [
        "first file",
        "still first",
        "second file",
        "nested file",
    ]


def test_folder_without_text_files(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"\x00")
    with pytest.raises(DataError, match="holds no text files"):
        read_documents(cfg(tmp_path))


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=re.escape(f"data file not found: {missing}")):
        read_documents(cfg(missing))
    # Relative paths and known suffixes are files, not dataset names.
    with pytest.raises(DataError, match="data file not found"):
        read_documents(cfg("./nope"))
    with pytest.raises(DataError, match="data file not found"):
        read_documents(cfg("wiki.test.raw"))


@pytest.mark.parametrize("text", ["", "\n\n  \n", "\t"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "a.txt", text)
    with pytest.raises(DataError, match="holds no text"):
        read_documents(cfg(path))


def test_empty_jsonl(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", '{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(DataError, match="holds no text"):
        read_documents(cfg(path))


def test_undecodable_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"ok so far \xff\xfe bad")
    with pytest.raises(DataError) as info:
        read_documents(cfg(path))
    message = str(info.value)
    assert "not valid utf-8 text" in message
    assert "0xff" in message and "offset 10" in message


def test_data_error_is_user_input_error(tmp_path: Path) -> None:
    with pytest.raises(UserInputError) as info:
        read_documents(cfg(tmp_path / "missing.txt"))
    assert info.value.exit_code == 2


def test_hf_dataset_without_datasets_package() -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("the datasets package is installed here")
    assert not is_local_source("wikitext:wikitext-2-raw-v1:test")
    with pytest.raises(MissingDependencyError, match="pip install 'swiss-knife\\[datasets\\]'"):
        read_documents(cfg("wikitext:wikitext-2-raw-v1:test"))


def test_hf_dataset_spec_with_too_many_parts() -> None:
    with pytest.raises(DataError, match="expected name\\[:config\\[:split\\]\\]"):
        read_documents(cfg("a:b:c:d"))


def test_is_local_source(tmp_path: Path) -> None:
    assert is_local_source(str(tmp_path))
    assert is_local_source("./data")
    assert is_local_source("~/data")
    assert is_local_source("eval.jsonl")
    assert not is_local_source("Salesforce/wikitext")


# --------------------------------------------------------------------------- tokenising


def test_tokenize_documents_bos_per_document(tiny_tokenizer: Any) -> None:
    bos = tiny_tokenizer.bos_token_id
    stream = tokenize_documents(["ab", "cde"], tiny_tokenizer)
    a, b, c, d, e = (tiny_tokenizer.convert_tokens_to_ids(ch) for ch in "abcde")
    assert stream.dtype == torch.long and stream.dim() == 1
    assert stream.tolist() == [bos, a, b, bos, c, d, e]
    assert tokenize_documents(["ab", "cde"], tiny_tokenizer, add_bos=False).tolist() == [
        a,
        b,
        c,
        d,
        e,
    ]


def test_tokenize_documents_max_tokens(tiny_tokenizer: Any) -> None:
    stream = tokenize_documents(["abc", "def", "ghi"], tiny_tokenizer, max_tokens=5)
    assert stream.numel() == 5
    full = tokenize_documents(["abc", "def", "ghi"], tiny_tokenizer)
    assert torch.equal(stream, full[:5])


def test_tokenize_documents_without_bos_token(tiny_tokenizer: Any) -> None:
    class NoBos:
        bos_token_id = None

        def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
            return tiny_tokenizer(text, add_special_tokens=add_special_tokens)

    assert tokenize_documents(["ab", "c"], NoBos()).numel() == 3


def test_load_token_stream(tmp_path: Path, tiny_tokenizer: Any) -> None:
    path = write(tmp_path / "a.txt", "ab\ncd\n")
    bos = tiny_tokenizer.bos_token_id
    lines = load_token_stream(cfg(path, split_documents="line"), tiny_tokenizer)
    assert lines.tolist()[0] == bos and lines.tolist().count(bos) == 2
    whole = load_token_stream(str(path), tiny_tokenizer)
    assert whole.tolist().count(bos) == 1 and whole.numel() == 1 + len("ab\ncd")
    no_bos = load_token_stream(cfg(path, add_bos=False), tiny_tokenizer)
    assert bos not in no_bos.tolist()


def test_load_token_stream_errors(tmp_path: Path, tiny_tokenizer: Any) -> None:
    path = write(tmp_path / "a.txt", "x")
    with pytest.raises(DataError, match="fewer than 2 tokens"):
        load_token_stream(cfg(path, add_bos=False), tiny_tokenizer)
    assert load_token_stream(cfg(path), tiny_tokenizer).numel() == 2
    with pytest.raises(DataError, match="no tokenizer"):
        load_token_stream(cfg(path), None)


def test_stories_tokenizer_stream(stories_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    path = write(tmp_path / "a.txt", "Once upon a time.\n\nThe end.")
    stream = load_token_stream(cfg(path, split_documents="paragraph"), tokenizer)
    assert stream.tolist().count(tokenizer.bos_token_id) == 2
    assert stream[0].item() == tokenizer.bos_token_id
    assert int(stream.max()) < len(tokenizer)


# --------------------------------------------------------------------------- windows and samples


def test_token_windows() -> None:
    stream = torch.arange(10)
    windows = token_windows(stream, 3)
    assert windows.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert token_windows(stream, 3, num=2).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert token_windows(stream, 3, num=50).shape == (3, 3)
    assert token_windows(stream, 10).shape == (1, 10)


def test_token_windows_too_short() -> None:
    with pytest.raises(DataError, match="has 5 tokens, fewer than one window of 6"):
        token_windows(torch.arange(5), 6)


def test_sample_calibration_deterministic_per_seed() -> None:
    stream = torch.arange(1000)
    first = sample_calibration(stream, 8, 16, seed=0)
    again = sample_calibration(stream, 8, 16, seed=0)
    other = sample_calibration(stream, 8, 16, seed=1)
    assert first.shape == (8, 16) and first.dtype == stream.dtype
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # Every sample is a contiguous slice of the stream.
    for row in first:
        start = int(row[0])
        assert torch.equal(row, stream[start : start + 16])


def test_sample_calibration_exact_length() -> None:
    stream = torch.arange(16)
    samples = sample_calibration(stream, 3, 16, seed=5)
    assert all(torch.equal(row, stream) for row in samples)


def test_sample_calibration_errors() -> None:
    with pytest.raises(DataError, match="has 10 tokens, fewer than seq_len=11"):
        sample_calibration(torch.arange(10), 2, 11)
    with pytest.raises(DataError, match="at least one sample"):
        sample_calibration(torch.arange(10), 0, 4)
    with pytest.raises(DataError, match="at least one sample"):
        sample_calibration(torch.arange(10), 2, 0)
