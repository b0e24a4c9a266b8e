"""Words to CLIP token positions, and the token mappers of prompt-to-prompt (docs/semantics.md §5).

Follows the official ptp_utils.get_word_inds and seq_aligner: word indices, per-word token
weights, the replace mapper (same word count) and the refine mapper (global alignment).
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

from ..errors import InputError, warn_fatezero

MAX_TOKENS = 77  # CLIP's context length: every map has this many token columns


def token_count(text: str, tokenizer) -> int:
    """CLIP tokens of `text` with BOS and EOS (verbose=False: no warning about texts over 77 tokens)."""
    return len(tokenizer(text, verbose=False)["input_ids"])


def fit_prompt(prompt: str, tokenizer, what: str) -> str:
    """`prompt` cut after its last word that fits CLIP's 77 tokens, as Stable Diffusion truncates.

    The warning names the dropped words; blend and eq words among them then do not occur in the
    prompt, so they warn and are ignored like any absent word (docs/semantics.md §5)."""
    if token_count(prompt, tokenizer) <= MAX_TOKENS:
        return prompt
    words = prompt.split(" ")
    keep, too_many = 0, len(words)  # words[:keep] fits, words[:too_many] does not
    while too_many - keep > 1:
        middle = (keep + too_many) // 2
        if token_count(" ".join(words[:middle]), tokenizer) <= MAX_TOKENS:
            keep = middle
        else:
            too_many = middle
    dropped = " ".join(words[keep:])
    warn_fatezero(f"the {what} prompt has {token_count(prompt, tokenizer)} CLIP tokens, more than {MAX_TOKENS}: "
                  f"it is cut as Stable Diffusion does, dropping the words {dropped!r}")
    return " ".join(words[:keep])


# --- word -> token indices (ptp_utils.get_word_inds) -------------------------------------------

def word_token_indices(text: str, word: Union[str, int], tokenizer) -> list[int]:
    """Token positions (BOS = 0) of a space-separated word of `text`, by string or by word index.

    Token pieces are decoded one by one and their lengths summed until they cover the word,
    so "countryside," (one word) covers two tokens; a word absent from the text gives [].
    """
    split_text = text.split(" ")
    if isinstance(word, str):
        places = [i for i, w in enumerate(split_text) if w == word]
    else:
        places = [int(word)]
    if not places:
        return []
    pieces = [tokenizer.decode([t]).strip("#") for t in tokenizer.encode(text)][1:-1]
    out, covered, ptr = [], 0, 0
    for i, piece in enumerate(pieces):
        covered += len(piece)
        if ptr in places:
            out.append(i + 1)
        if covered >= len(split_text[ptr]):
            ptr += 1
            covered = 0
    return out


def word_weights(prompt: str, words: Sequence[str], tokenizer, what: str) -> torch.Tensor:
    """(77,) one-hot of the tokens of `words` in `prompt`; absent words warn and count for nothing."""
    weights = torch.zeros(MAX_TOKENS)
    for word in [words] if isinstance(words, str) else words:
        inds = word_token_indices(prompt, word, tokenizer)
        if not inds:
            warn_fatezero(f"{what} word {word!r} does not occur in the prompt {prompt!r}: it is ignored "
                  f"(as the official code does)")
        weights[inds] = 1
    return weights


# --- token mappers (seq_aligner) ---------------------------------------------------------------

def replacement_mapper(source: str, target: str, tokenizer) -> torch.Tensor:
    """(77, 77) word-swap mapper: P_base = P_src @ mapper (docs/semantics.md §5, replace).

    Swapped words map all their source tokens onto the target tokens (split evenly when the
    token counts differ). After the last swapped word the official code fills m[j, j] rather
    than the aligned m[i, j]; kept here on purpose (docs/semantics.md, "Details").
    """
    words_x, words_y = source.split(" "), target.split(" ")
    if len(words_x) != len(words_y):
        raise InputError(f"replace needs prompts with the same number of words ({len(words_x)} vs {len(words_y)})")
    swapped = [i for i in range(len(words_y)) if words_y[i] != words_x[i]]
    inds_source = [word_token_indices(source, i, tokenizer) for i in swapped]
    inds_target = [word_token_indices(target, i, tokenizer) for i in swapped]
    mapper = torch.zeros(MAX_TOKENS, MAX_TOKENS)
    i = j = cur = 0
    while i < MAX_TOKENS and j < MAX_TOKENS:
        if cur < len(inds_source) and inds_source[cur] and inds_source[cur][0] == i:
            src, tgt = inds_source[cur], inds_target[cur]
            if len(src) == len(tgt):
                mapper[src, tgt] = 1
            else:
                for t in tgt:
                    mapper[src, t] = 1 / len(tgt)
            cur += 1
            i += len(src)
            j += len(tgt)
        elif cur < len(inds_source):
            mapper[i, j] = 1
            i += 1
            j += 1
        else:
            mapper[j, j] = 1
            i += 1
            j += 1
    return mapper


def _global_alignment(x: Sequence[int], y: Sequence[int]) -> list[int]:
    """Needleman-Wunsch (gap 0, match 1, mismatch -1): for each y token the aligned x index or -1.

    Ties prefer a gap in x (left), then a gap in y (up), then the diagonal, as seq_aligner does.
    """
    n, m = len(x), len(y)
    score = np.zeros((n + 1, m + 1), dtype=np.int64)
    move = np.zeros((n + 1, m + 1), dtype=np.int64)  # 1 left, 2 up, 3 diagonal, 4 start
    move[0, 1:], move[1:, 0], move[0, 0] = 1, 2, 4
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i, j - 1], score[i - 1, j]
            diag = score[i - 1, j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            score[i, j] = max(left, up, diag)
            move[i, j] = 1 if score[i, j] == left else 2 if score[i, j] == up else 3
    aligned, i, j = [], n, m
    while (i > 0 or j > 0) and move[i, j] != 4:
        if move[i, j] == 3:
            i, j = i - 1, j - 1
            aligned.append(i)
        elif move[i, j] == 1:
            j -= 1
            aligned.append(-1)
        else:
            i -= 1
    return aligned[::-1]


def refinement_mapper(source: str, target: str, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(77,) source column for each target token and (77,) alphas (1 = aligned) (docs/semantics.md §5, refine)."""
    x, y = tokenizer.encode(source), tokenizer.encode(target)
    aligned = torch.tensor(_global_alignment(x, y), dtype=torch.long)
    alphas = torch.ones(MAX_TOKENS)
    alphas[:len(aligned)] = aligned.ne(-1).float()
    mapper = torch.zeros(MAX_TOKENS, dtype=torch.long)
    mapper[:len(aligned)] = aligned
    mapper[len(aligned):] = len(y) + torch.arange(MAX_TOKENS - len(y))
    return mapper, alphas
