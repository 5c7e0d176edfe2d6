"""Token bytes from two independent sources must agree for every token of real vocabularies.

Runtime: llama.cpp (`vocab_only` load, `llama_token_to_piece`, special tokens not
rendered). Check: the GGUF token strings decoded with the GPT-2 byte map or
SentencePiece's rules (`gguf_tokens.py`). Named exceptions, each asserted precisely:
- end-of-generation tokens that the GGUF writes as text (`</s>` in Qwen2, Phi-3 and
  Gemma 3, `<|tool_response>` in Gemma 4): llama.cpp treats them as EOG, so they are END;
- Command-R's tokens made of characters outside the GPT-2 byte map: llama.cpp can only
  render them as '[UNK_BYTE_0x...]', so they get no bytes on either side.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from lvr_local.core.vocabulary import BYTE
from lvr_local.errors import ModelFileError, UnsupportedTokenizerError
from lvr_local.llama.gguf_tokens import gpt2_unicode_to_byte, read_gguf_tokens, verify_vocabulary
from lvr_local.llama.vocab_reader import load_vocabulary

pytestmark = pytest.mark.slow  # every test here loads a real model

# vocabulary -> (tokenizer model, EOG tokens written as text, undecodable tokens)
EXPECTED = {
    "gpt-2": ("gpt2", 0, 0),
    "llama-bpe": ("gpt2", 0, 0),
    "qwen2": ("gpt2", 1, 0),
    "falcon": ("gpt2", 0, 0),
    "llama-spm": ("llama", 0, 0),
    "phi-3": ("llama", 1, 0),
    "command-r": ("gpt2", 0, 1403),
    "deepseek-llm": ("gpt2", 0, 0),
    "starcoder": ("gpt2", 0, 0),
    "gemma-4": ("gemma4", 1, 0),
}


def _check_agreement(path: Path, tokenizer: str, n_end_text: int, n_undecodable: int) -> None:
    vocab = load_vocabulary(path)
    gguf = read_gguf_tokens(path)
    assert vocab.tokenizer_model == gguf.tokenizer_model == tokenizer
    report = verify_vocabulary(vocab, gguf)
    assert report.mismatches == [], [
        (i, gguf.strings[i], vocab.token_bytes(i)) for i in report.mismatches[:5]
    ]
    assert len(report.end_with_text) == n_end_text
    assert all(vocab.is_end[i] for i in report.end_with_text)
    assert len(report.undecodable) == n_undecodable == vocab.n_undecodable
    assert report.agree == vocab.n_tokens - n_end_text - n_undecodable


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sdist_vocabularies_agree_token_by_token(sdist_vocab_dir: Path, name: str) -> None:
    _check_agreement(sdist_vocab_dir / f"ggml-vocab-{name}.gguf", *EXPECTED[name])


def test_smollm2_agrees_token_by_token(smollm2_path: Path) -> None:
    _check_agreement(smollm2_path, "gpt2", 0, 0)


def test_gemma3_agrees_token_by_token(gemma_path: Path) -> None:
    _check_agreement(gemma_path, "llama", 1, 0)


def test_gpt2_byte_map_is_a_bijection() -> None:
    table = gpt2_unicode_to_byte()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == 0x20 and table["Ċ"] == 0x0A and table["A"] == 0x41


def test_bundled_vocabularies_facts(smollm2_path: Path, gemma_path: Path) -> None:
    smol, gemma = load_vocabulary(smollm2_path), load_vocabulary(gemma_path)
    assert (smol.n_tokens, gemma.n_tokens) == (49_152, 262_144)
    # SentencePiece byte fallback: several ids share one byte string, all are kept.
    byte_ids = np.flatnonzero(gemma.token_type == BYTE)
    assert len(byte_ids) == 256
    a_ids = [i for i in range(gemma.n_tokens) if gemma.token_bytes(i) == b"A"]
    assert len(a_ids) >= 2
    # End of generation: EOS and the chat-turn enders.
    assert smol.token_bytes(smol.eos_id) is None
    smol_strings = read_gguf_tokens(smollm2_path).strings
    assert "<|im_end|>" in {smol_strings[i] for i in smol.end_ids}
    gemma_strings = read_gguf_tokens(gemma_path).strings
    assert {"<eos>", "<end_of_turn>"} <= {gemma_strings[i] for i in gemma.end_ids}
    assert gemma.add_bos and gemma.bos_id is not None
    assert smol.chat_template and "im_start" in smol.chat_template
    # Pieces longer than llama-cpp-python's 32-byte helper buffer are intact.
    assert int(smol.lengths.max()) > 32


def test_cache_is_reused_and_equal(smollm2_path: Path, isolated_home: Path) -> None:
    first = load_vocabulary(smollm2_path)
    cached = list((isolated_home / "cache" / "vocab").glob("SmolLM2*.npz"))
    assert len(cached) == 1
    second = load_vocabulary(smollm2_path)
    assert second.blob == first.blob
    assert np.array_equal(second.offsets, first.offsets)
    assert np.array_equal(second.is_end, first.is_end)
    assert second.chat_template == first.chat_template


def test_cache_follows_file_changes(
    smollm2_path: Path, tmp_path: Path, isolated_home: Path
) -> None:
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(smollm2_path, copy)
    load_vocabulary(copy)
    entries = lambda: list((isolated_home / "cache" / "vocab").glob("copy-*.npz"))  # noqa: E731
    assert len(entries()) == 1
    copy.touch()  # same bytes, new modification time: a new cache entry
    import os

    st = copy.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    load_vocabulary(copy)
    assert len(entries()) == 2


def test_damaged_cache_is_rebuilt(smollm2_path: Path, isolated_home: Path) -> None:
    good = load_vocabulary(smollm2_path)
    for entry in (isolated_home / "cache" / "vocab").glob("SmolLM2*.npz"):
        entry.write_bytes(b"not an npz")
    again = load_vocabulary(smollm2_path)
    assert again.blob == good.blob


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        load_vocabulary(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_text("hello, I am text")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        load_vocabulary(bad)


def test_truncated_gguf(smollm2_path: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with smollm2_path.open("rb") as f:
        cut.write_bytes(f.read(200_000))
    with pytest.raises(ModelFileError, match=r"not a valid GGUF file: .* runs past the file"):
        load_vocabulary(cut)  # checked before llama.cpp sees it (gguf_check.py)


def test_unsupported_tokenizer_is_refused_by_name(sdist_vocab_dir: Path) -> None:
    with pytest.raises(UnsupportedTokenizerError, match="'bert'"):
        load_vocabulary(sdist_vocab_dir / "ggml-vocab-bert-bge.gguf")
