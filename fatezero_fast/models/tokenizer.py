"""A real CLIP BPE tokenizer (49,408 tokens) built from the vocabulary file the package ships.

Stable Diffusion 1.x uses OpenAI CLIP's byte-level BPE. The merges ship as
fatezero_fast/data/clip_bpe_simple_vocab_16e6.txt.gz (the file OpenAI's CLIP package
distributes); the token list is derived from it the way CLIP defines it: 256 byte symbols,
the same with the end-of-word marker, one token per merge, then the two special tokens.
User model folders bring their own tokenizer; this one serves the built-in models.
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

VOCAB_GZ = Path(__file__).parent / "data" / "clip_bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file
VOCAB_SIZE = 49408


def _byte_symbols() -> list[str]:
    """Printable stand-ins for the 256 byte values, in CLIP's order (byte-level BPE's alphabet).

    Printable bytes stand for themselves; the others, in increasing order, get chr(256 + n).
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def write_vocab_files(folder: str | os.PathLike) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt (the Hugging Face CLIPTokenizer format) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(VOCAB_GZ, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:NUM_MERGES + 1]
    tokens = _byte_symbols()
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


@lru_cache(maxsize=1)
def _vocab_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="fatezero_fast_clip_vocab_"))
    write_vocab_files(folder)
    return folder


def clip_tokenizer():
    """The CLIP tokenizer of Stable Diffusion 1.x (max length 77), from the shipped vocabulary."""
    from transformers import CLIPTokenizer

    folder = _vocab_folder()
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                         pad_token="<|endoftext|>")
