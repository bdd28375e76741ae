"""Text sources -> documents -> one token stream -> fixed windows or calibration samples.

Sources: local .txt, .jsonl/.json (a chosen field), .parquet, .csv, a folder of text files, or a
Hugging Face dataset given as `name[:config[:split]]`. Every document starts with BOS (when the
tokenizer has one and `add_bos` is on), so perplexities match the usual reporting conventions.

Calibration data for every verb (quantize, prune, reduce-layers) and the recipe runner comes from
`calibration_samples` / `model_calibration_samples`: seeded windows cut to what the model takes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .config import CalibrationSettings, DataConfig
from .errors import DataError, MissingDependencyError, UserInputError
from .sources import DATA_SUFFIXES as ALL_SUFFIXES
from .sources import is_local_data_source as is_local_source

logger = logging.getLogger(__name__)


def _decode(path: Path, encoding: str) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not valid {encoding} text (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}); convert it or set the data encoding"
        ) from None
    except LookupError:
        raise DataError(f"unknown text encoding {encoding!r}") from None


def split_documents(text: str, mode: str) -> list[str]:
    """Cut plain text into documents: the whole text, paragraphs at blank lines, or lines."""
    if mode == "none":
        parts = [text]
    elif mode == "paragraph":
        parts = re.split(r"\n\s*\n", text)
    elif mode == "line":
        parts = text.splitlines()
    else:
        raise DataError(f"unknown document split {mode!r}; use none, paragraph or line")
    return [p.strip() for p in parts if p.strip()]


def _field(row: Any, field: str, where: str) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with a {field!r} field")
    if field not in row:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise DataError(f"{where}: no field {field!r} (fields: {keys}); choose one with --field")
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is not text")
    return value


def _read_jsonl(path: Path, cfg: DataConfig) -> list[str]:
    docs: list[str] = []
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028, U+0085 and the like.
    for number, line in enumerate(_decode(path, cfg.encoding).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        docs.append(_field(row, cfg.field, f"{path}:{number}"))
    return docs


def _read_json(path: Path, cfg: DataConfig) -> list[str]:
    try:
        data = json.loads(_decode(path, cfg.encoding))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get(cfg.field), list):
        data = data[cfg.field]  # {"text": ["...", "..."]}
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects or of strings")
    return [
        row if isinstance(row, str) else _field(row, cfg.field, f"{path}[{i}]")
        for i, row in enumerate(data)
    ]


def _read_csv(path: Path, cfg: DataConfig) -> list[str]:
    # newline="" keeps line breaks inside quoted fields (splitlines() would drop them).
    reader = csv.DictReader(io.StringIO(_decode(path, cfg.encoding), newline=""))
    if reader.fieldnames is None or cfg.field not in reader.fieldnames:
        columns = ", ".join(reader.fieldnames or []) or "none"
        raise DataError(f"{path}: no column {cfg.field!r} (columns: {columns})")
    return [row[cfg.field] or "" for row in reader]


def _read_parquet(path: Path, cfg: DataConfig) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError(
            "reading .parquet needs pyarrow: pip install 'swiss-knife[parquet]'"
        ) from None
    try:
        schema = pq.read_schema(path)
    except Exception as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    if cfg.field not in schema.names:
        raise DataError(f"{path}: no column {cfg.field!r} (columns: {', '.join(schema.names)})")
    column = pq.read_table(path, columns=[cfg.field]).column(0).to_pylist()
    return [str(v) for v in column if v is not None]


def _read_file(path: Path, cfg: DataConfig) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, cfg)
    if suffix == ".json":
        return _read_json(path, cfg)
    if suffix == ".csv":
        return _read_csv(path, cfg)
    if suffix == ".parquet":
        return _read_parquet(path, cfg)
    return split_documents(_decode(path, cfg.encoding), cfg.split_documents)


def _read_hf_dataset(spec: str, cfg: DataConfig) -> list[str]:
    parts = spec.split(":")
    if len(parts) > 3:
        raise DataError(f"dataset {spec!r}: expected name[:config[:split]]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "test"
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError(
            f"{spec!r} is not a local file, and reading Hugging Face datasets needs the datasets "
            "package: pip install 'swiss-knife[datasets]'"
        ) from None
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"could not load dataset {spec!r} ({first}); if this machine is offline, pass a "
            "local .txt/.jsonl/.parquet file instead"
        ) from None
    if cfg.field not in dataset.column_names:
        raise DataError(
            f"dataset {spec!r} has no field {cfg.field!r} (fields: {', '.join(dataset.column_names)})"
        )
    texts = [t for t in dataset[cfg.field] if isinstance(t, str)]
    if cfg.split_documents == "none":
        # Datasets such as WikiText store one line per row; the usual evaluation joins them.
        return ["\n".join(texts)]
    return [d for t in texts for d in split_documents(t, cfg.split_documents)]


def read_documents(cfg: DataConfig | str) -> list[str]:
    """Read a text source into a list of non-empty documents."""
    if isinstance(cfg, str):
        cfg = DataConfig(source=cfg)
    source = cfg.source
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in ALL_SUFFIXES
        )
        if not files:
            raise DataError(f"folder {source} holds no text files ({', '.join(ALL_SUFFIXES)})")
        docs = [d for f in files for d in _read_file(f, cfg)]
    elif path.is_file():
        docs = _read_file(path, cfg)
    elif is_local_source(source):
        raise DataError(f"data file not found: {source}")
    else:
        docs = _read_hf_dataset(source, cfg)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{source} holds no text")
    if cfg.max_documents is not None:
        docs = docs[: cfg.max_documents]
    return docs


def tokenize_documents(
    documents: Iterable[str],
    tokenizer: Any,
    *,
    add_bos: bool = True,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Concatenate documents into one 1-D token stream, BOS before each document."""
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    ids: list[int] = []
    for doc in documents:
        if bos is not None:
            ids.append(int(bos))
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            ids = ids[:max_tokens]
            break
    return torch.tensor(ids, dtype=torch.long)  # (tokens,)


def load_token_stream(
    cfg: DataConfig | str, tokenizer: Any, *, max_tokens: int | None = None
) -> torch.Tensor:
    """Read and tokenise a source into one stream; raises DataError when it is empty."""
    if isinstance(cfg, str):
        cfg = DataConfig(source=cfg)
    if tokenizer is None:
        raise DataError("this model has no tokenizer, so text data cannot be tokenised")
    stream = tokenize_documents(
        read_documents(cfg), tokenizer, add_bos=cfg.add_bos, max_tokens=max_tokens
    )
    if stream.numel() < 2:
        raise DataError(f"{cfg.source} tokenises to fewer than 2 tokens")
    return stream


def token_windows(stream: torch.Tensor, length: int, num: int | None = None) -> torch.Tensor:
    """Cut a stream into consecutive non-overlapping windows of `length` tokens."""
    available = stream.numel() // length
    if available == 0:
        raise DataError(
            f"the text has {stream.numel()} tokens, fewer than one window of {length}; "
            "give more text or a shorter window"
        )
    count = available if num is None else min(num, available)
    return stream[: count * length].view(count, length)  # (count, length)


def sample_calibration(
    stream: torch.Tensor, num_samples: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """Draw `num_samples` windows of `seq_len` tokens at seeded random offsets.

    The same stream, sizes and seed always give the same samples.
    """
    if num_samples < 1 or seq_len < 1:
        raise DataError("calibration needs at least one sample of at least one token")
    if stream.numel() < seq_len:
        raise DataError(
            f"calibration text has {stream.numel()} tokens, fewer than seq_len={seq_len}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (num_samples,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])  # (n, seq_len)


def fit_seq_len(settings: CalibrationSettings, max_positions: int | None) -> int:
    """The calibration window length for a model taking `max_positions` tokens (None: any)."""
    seq_len = settings.seq_len
    if max_positions is None or seq_len <= max_positions:
        return seq_len
    if "seq_len" in settings.model_fields_set:
        raise UserInputError(
            f"calibration seq_len {seq_len} exceeds the {max_positions} positions the model "
            f"takes (max_position_embeddings); use a seq_len of at most {max_positions}"
        )
    logger.info("calibration windows of %d tokens, the model's position limit", max_positions)
    return max_positions


def calibration_samples(
    source: DataConfig | str,
    tokenizer: Any,
    settings: CalibrationSettings,
    *,
    max_positions: int | None = None,
) -> torch.Tensor:
    """Seeded calibration windows (num_samples, seq_len) from a text source.

    A seq_len above the model's `max_position_embeddings` is refused when it was asked for (the
    windows would not be what the recipe records); the default (512) shrinks to the limit.
    """
    seq_len = fit_seq_len(settings, max_positions)
    stream = load_token_stream(source, tokenizer)
    if stream.numel() < seq_len:
        raise DataError(
            f"calibration text has {stream.numel()} tokens, fewer than one window of {seq_len}"
        )
    return sample_calibration(stream, settings.num_samples, seq_len, settings.seed)


def check_calibration(calibration: torch.Tensor | None, reason: str) -> None:
    """Refuse calibration data that is missing or not token windows; `reason` names what needs
    it, in words (``"method 'gptq'"``)."""
    if calibration is None:
        raise UserInputError(
            f"{reason} needs calibration data: pass --calibration-data "
            "(or data.calibration in a recipe)"
        )
    if calibration.dtype != torch.long or calibration.dim() != 2 or calibration.numel() == 0:
        raise UserInputError("calibration must be a non-empty LongTensor (num_samples, seq_len)")


def model_calibration_samples(
    model: torch.nn.Module, source: DataConfig | str, tokenizer: Any, settings: CalibrationSettings
) -> torch.Tensor:
    """`calibration_samples` with windows no longer than the model's position limit."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return calibration_samples(source, tokenizer, settings, max_positions=limit)
