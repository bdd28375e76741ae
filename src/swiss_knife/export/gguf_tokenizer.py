"""The tokenizer of a model folder as GGUF metadata, so llama.cpp needs no Hugging Face files.

Two kinds of vocabulary, as llama.cpp's ``tokenizer.ggml.model`` names them:

``llama`` (SentencePiece): tokens spelt with ``▁`` for spaces, a score per token (llama.cpp merges
    the adjacent pair whose joined token scores highest), token types (normal, unknown, control,
    user-defined, unused, byte). Read from ``tokenizer.model`` when the folder has one: the file
    is a SentencePiece ``ModelProto`` protobuf, parsed here directly (field 1 = pieces, each with
    field 1 piece, 2 score, 3 type), so the ``sentencepiece`` package is not needed. A folder with
    only a ``tokenizer.json`` of the same kind (a BPE with ``byte_fallback``, which is what
    transformers converts SentencePiece models to) gets scores from its merge list instead: the
    token made by merge ``r`` scores ``-r``, so llama.cpp applies merges in the same order;
    tokens no merge makes score below every merged one, control tokens 0.

``gpt2`` (byte-level BPE, e.g. SmolLM2, Qwen2, Llama 3): tokens in GPT-2's byte alphabet, merges
    in rank order, and ``tokenizer.ggml.pre`` naming the pre-tokenizer (the regular expressions
    that cut text into words before merging). llama.cpp's converter finds that name by hashing
    the token ids of a fixed test string against a table of known models. We read the
    pre-tokenizer definition in ``tokenizer.json`` itself and compare it with the rules behind
    each name: GPT-2's ``ByteLevel`` split -> ``gpt-2``; single digits then ``ByteLevel`` ->
    ``smollm`` (or ``starcoder`` when the tokenizer cleans up spaces on decode, the only
    difference between the two in llama.cpp); the Llama 3 and Qwen2 split regexes followed by a
    regex-free ``ByteLevel`` -> ``llama-bpe`` / ``qwen2``. This names any model built on the same
    rules, including ones that are not in llama.cpp's table. Anything else gets ``default``
    and the report says so. A plain BPE that is neither (like a character vocabulary) is
    re-spelt into the byte alphabet and written as ``gpt2`` with ``default``.

Special token ids, ``add_bos``/``add_eos`` and the chat template come from ``tokenizer.json``,
``tokenizer_config.json`` and ``config.json`` through `gguf.SpecialVocab` (llama.cpp's reader).
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGUFValueType, GGUFWriter, Keys, SpecialVocab, TokenType

from swiss_knife.export.errors import GGUFExportError

logger = logging.getLogger(__name__)

# The split regexes of tokenizer.json behind llama.cpp's pre-tokenizer names.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


@dataclass
class Vocab:
    """Everything `write_vocab` puts into the file."""

    model: str  # "llama" or "gpt2"
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    source: str = ""


# ----------------------------------------------------------------------------- SentencePiece


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int, Any]]:
    """``(field number, wire type, value)`` of one protobuf message (bytes for length-delimited
    fields, int for varints, raw 4/8 bytes for fixed-width ones)."""
    out: list[tuple[int, int, Any]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((number, wire, value))
    return out


def read_sentencepiece(path: Path) -> list[tuple[str, float, int]]:
    """``(piece, score, type)`` of every piece of a SentencePiece ``tokenizer.model``.

    SentencePiece's piece types are numbered like GGUF's token types (1 normal, 2 unknown,
    3 control, 4 user-defined, 5 unused, 6 byte); an absent type means normal, an absent score 0.
    """
    pieces: list[tuple[str, float, int]] = []
    for number, wire, value in _fields(path.read_bytes()):
        if number != 1 or wire != 2:
            continue
        piece, score, kind = "", 0.0, int(TokenType.NORMAL)
        for sub_number, sub_wire, sub_value in _fields(value):
            if sub_number == 1 and sub_wire == 2:
                piece = sub_value.decode("utf-8")
            elif sub_number == 2 and sub_wire == 5:
                score = struct.unpack("<f", sub_value)[0]
            elif sub_number == 3 and sub_wire == 0:
                kind = int(sub_value)
        pieces.append((piece, score, kind))
    if not pieces:
        raise ValueError("no pieces found")
    return pieces


def _looks_special(token: str) -> bool:
    """Added tokens that llama.cpp's converter also treats as control though not marked so."""
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def _apply_added_tokens(
    directory: Path, tokens: list[str], types: list[int], scores: list[float]
) -> None:
    """Overlay ``added_tokens.json`` and the ``added_tokens_decoder`` of the tokenizer config."""
    added = directory / "added_tokens.json"
    if added.is_file():
        for text, index in json.loads(added.read_text(encoding="utf-8")).items():
            if 0 <= int(index) < len(tokens):
                tokens[int(index)], types[int(index)] = text, int(TokenType.USER_DEFINED)
                scores[int(index)] = -1000.0
    config = _json(directory / "tokenizer_config.json")
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        index = int(key)
        if not 0 <= index < len(tokens):
            continue
        text = str(entry["content"])
        if entry.get("special") or _looks_special(text):
            types[index] = int(TokenType.CONTROL)
        else:
            text = text.replace("\u2581", " ")
            types[index] = int(TokenType.USER_DEFINED)
        tokens[index], scores[index] = text, -1000.0


def _sentencepiece_vocab(directory: Path, vocab_size: int) -> Vocab:
    try:
        pieces = read_sentencepiece(directory / "tokenizer.model")
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as exc:
        raise GGUFExportError(f"cannot read {directory / 'tokenizer.model'}: {exc}") from None
    if len(pieces) > vocab_size:
        raise GGUFExportError(
            f"tokenizer.model has {len(pieces)} pieces but config.json vocab_size is {vocab_size}"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-1000.0] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    for index, (piece, score, kind) in enumerate(pieces):
        tokens[index], scores[index], types[index] = piece, score, kind
    _apply_added_tokens(directory, tokens, types, scores)
    return Vocab("llama", "default", tokens, types, scores, source="tokenizer.model")


# ----------------------------------------------------------------------------- tokenizer.json


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GGUFExportError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def _components(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A normalizer / pre-tokenizer / decoder, with ``Sequence`` nodes flattened."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        children = node.get("pretokenizers") or node.get("decoders") or node.get("normalizers")
        return [part for child in children or [] for part in _components(child)]
    return [node]


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for merge in model.get("merges") or []:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        pairs.append((str(left), str(right)))
    return pairs


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte value."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def pre_tokenizer_name(tokenizer: dict[str, Any], clean_up_spaces: bool) -> str | None:
    """llama.cpp's name for the pre-tokenizer of a byte-level ``tokenizer.json``, None if the
    definition matches none we know (see the module docstring)."""
    parts = _components(tokenizer.get("pre_tokenizer"))
    kinds = [part.get("type") for part in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and parts[0].get("individual_digits")
        and parts[1].get("use_regex", True)
    ):
        return "starcoder" if clean_up_spaces else "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        if parts[0].get("behavior") == "Isolated" and pattern in _SPLIT_NAMES:
            return _SPLIT_NAMES[pattern]
    return None


def _hf_tokens(directory: Path, vocab_size: int) -> tuple[list[str], list[int], Any]:
    """Tokens and types by id from the Hugging Face tokenizer, as llama.cpp's converter does."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers raises many types for unreadable tokenizers
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GGUFExportError(f"cannot load the tokenizer of {directory}: {first}") from None
    vocab: dict[str, int] = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise GGUFExportError(
            f"the tokenizer has ids up to {max(vocab.values())} but config.json vocab_size is "
            f"{vocab_size}"
        )
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(int(TokenType.UNUSED))
            continue
        if token in added:
            special = index in decoder and decoder[index].special
            control = special or _looks_special(token)
            types.append(int(TokenType.CONTROL if control else TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
        tokens.append(token)
    return tokens, types, tokenizer


def _spm_scores(model: dict[str, Any], tokens: list[str], types: list[int]) -> list[float]:
    """Scores for a SentencePiece-style BPE known only by its merges (module docstring)."""
    rank: dict[str, int] = {}
    for r, (left, right) in enumerate(_merge_pairs(model)):
        rank.setdefault(left + right, r)
    floor = len(rank) + 1
    scores: list[float] = []
    for index, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind in (TokenType.CONTROL, TokenType.UNKNOWN):
            scores.append(0.0)
        elif token in rank:
            scores.append(-float(rank[token]))
        else:
            scores.append(-float(floor + index))
    return scores


def _json_vocab(directory: Path, vocab_size: int) -> Vocab:
    data = _json(directory / "tokenizer.json")
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(
            f"the tokenizer of {directory} is a {model.get('type')} model; GGUF export supports "
            "SentencePiece (tokenizer.model) and BPE tokenizers"
        )
    tokens, types, hf = _hf_tokens(directory, vocab_size)
    pre_parts = [p.get("type") for p in _components(data.get("pre_tokenizer"))]
    normalizers = [p.get("type") for p in _components(data.get("normalizer"))]
    if model.get("byte_fallback") or "Metaspace" in pre_parts or "Prepend" in normalizers:
        for index, token in enumerate(tokens):
            if types[index] == TokenType.NORMAL and len(token) == 6 and token.startswith("<0x"):
                types[index] = int(TokenType.BYTE)
        unk = getattr(hf, "unk_token", None) or model.get("unk_token")
        if unk in tokens:
            types[tokens.index(unk)] = int(TokenType.UNKNOWN)
        scores = _spm_scores(model, tokens, types)
        note = "scores derived from the merge order of tokenizer.json (no tokenizer.model)"
        return Vocab("llama", "default", tokens, types, scores, notes=[note], source="json")
    clean = bool(getattr(hf, "clean_up_tokenization_spaces", False))
    if "ByteLevel" in pre_parts or "ByteLevel" in [
        p.get("type") for p in _components(data.get("decoder"))
    ]:
        pre = pre_tokenizer_name(data, clean)
        notes = []
        if pre is None:
            pre = "default"
            notes.append(
                "pre-tokenizer not recognised; llama.cpp will cut words with its default rules"
            )
        merges = [f"{a} {b}" for a, b in _merge_pairs(model)]
        return Vocab("gpt2", pre, tokens, types, merges=merges, notes=notes, source="json")
    # A plain BPE over characters: spell every normal token in the byte alphabet llama.cpp's
    # BPE works in (a space becomes "Ġ"), so it finds the same tokens.
    alphabet = byte_alphabet()

    def spell(text: str) -> str:
        return "".join(alphabet[b] for b in text.encode("utf-8"))

    respelt = [
        spell(token) if kind == TokenType.NORMAL else token
        for token, kind in zip(tokens, types, strict=True)
    ]
    merges = [f"{spell(a)} {spell(b)}" for a, b in _merge_pairs(model)]
    note = "plain BPE vocabulary re-spelt into the byte-level alphabet"
    if merges and not pre_parts:
        note += "; without a pre-tokenizer its merges may cross the word boundaries llama.cpp uses"
    return Vocab("gpt2", "default", respelt, types, merges=merges, notes=[note], source="json")


def read_vocab(directory: Path, vocab_size: int) -> Vocab:
    """The vocabulary of the model folder, padded with unused ``[PADi]`` tokens up to
    ``vocab_size`` (the embedding rows); refuses a folder without a tokenizer."""
    if (directory / "tokenizer.model").is_file():
        return _sentencepiece_vocab(directory, vocab_size)
    if (directory / "tokenizer.json").is_file():
        return _json_vocab(directory, vocab_size)
    raise GGUFExportError(
        f"{directory} has no tokenizer.json or tokenizer.model; llama.cpp needs the vocabulary "
        "inside the GGUF file"
    )


def write_vocab(writer: GGUFWriter, vocab: Vocab, directory: Path) -> dict[str, Any]:
    """Add the ``tokenizer.*`` keys; returns a summary for the export report.

    A BPE vocabulary without merges needs a writer that stores empty arrays: `gguf.GGUFWriter`
    refuses them, `swiss_knife.export.gguf.GGUFFileWriter` does not."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.token_types)
    if vocab.model == "gpt2":
        # llama.cpp refuses a BPE vocabulary without this key, even when there is no merge
        # (a character vocabulary): the writer must then accept an empty array.
        writer.add_key_value(
            Keys.Tokenizer.MERGES, list(vocab.merges), GGUFValueType.ARRAY, GGUFValueType.STRING
        )
    config = _json(directory / "tokenizer_config.json")
    if vocab.model == "llama" and isinstance(config.get("add_prefix_space"), bool):
        writer.add_add_space_prefix(config["add_prefix_space"])
    special = SpecialVocab(directory, load_merges=False, n_vocab=len(vocab.tokens))
    special.add_to_gguf(writer, quiet=True)
    return {
        "model": vocab.model,
        "pre": vocab.pre,
        "tokens": len(vocab.tokens),
        "merges": len(vocab.merges),
        "special_ids": dict(special.special_token_ids),
        "add_special": dict(special.add_special_token),
        "chat_template": special.chat_template is not None,
        "source": vocab.source,
        "notes": list(vocab.notes),
    }


__all__ = [
    "LLAMA3_SPLIT",
    "QWEN2_SPLIT",
    "Vocab",
    "byte_alphabet",
    "pre_tokenizer_name",
    "read_sentencepiece",
    "read_vocab",
    "write_vocab",
]
