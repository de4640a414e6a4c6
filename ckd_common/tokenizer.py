"""A small byte-level BPE tokenizer built offline and deterministically, for tests and the demo.

It has the special tokens of the Qwen2.5 tokenizer that the templates rely on (``<|endoftext|>``,
``<|im_start|>``, ``<|im_end|>``) plus ``<image>``, and splits text like Qwen's byte-level BPE does
(a space attaches to the following word), so template masking behaves as with the real tokenizer.
A real Qwen2.5 tokenizer directory is used as is; nothing here is needed for it.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, IMAGE_TOKEN)



def _train_bpe(words: Counter, vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Plain BPE over byte-level symbols. Ties are broken by the pair itself so the result never
    depends on hash order (the Rust trainer's ties do, across processes)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    splits = {w: list(w) for w in words}
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pairs: Counter = Counter()
        for w, n in words.items():
            sym = splits[w]
            for a, b in zip(sym, sym[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merged = best[0] + best[1]
        merges.append(best)
        vocab[merged] = len(vocab)
        for w, sym in splits.items():
            i, out = 0, []
            while i < len(sym):
                if i + 1 < len(sym) and sym[i] == best[0] and sym[i + 1] == best[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            splits[w] = out
    return vocab, merges


def build_tokenizer_object(corpus: list[str], vocab_size: int = 512) -> Tokenizer:
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words: Counter = Counter()
    for text in corpus:
        for piece, _ in pre.pre_tokenize_str(text):
            words[piece] += 1
    vocab, merges = _train_bpe(words, vocab_size)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def save_tiny_tokenizer(out_dir: str | Path, corpus: list[str], vocab_size: int = 512):
    """Build the tiny tokenizer from ``corpus`` and save it as a transformers tokenizer directory.
    Returns the loaded ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer_object(corpus, vocab_size),
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END, IMAGE_TOKEN],
        model_max_length=2048,
        padding_side="right",
    )
    tok.save_pretrained(str(out_dir))  # a checkpoint's chat template is its template's (model.save_vlm)
    return tok


def tokenizer_hash(tokenizer) -> str:
    """Fingerprint of what a tokenizer does: its full serialised model plus special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise TypeError(f"tokenizer_hash needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    for key in ("truncation", "padding"):  # runtime settings, not what the tokenizer does
        spec.pop(key, None)
    h.update(json.dumps(spec, sort_keys=True).encode())
    h.update(json.dumps({"eos": tokenizer.eos_token, "pad": tokenizer.pad_token}).encode())
    return h.hexdigest()[:32]


def pad_eos_warning(tokenizer) -> str | None:
    """A warning when the tokenizer's pad token differs from its eos token, else None.

    TinyLLaVA-Factory / LLaVA-KD count a sample's tokens as those != pad and add the
    ``<|endoftext|>`` count back only when pad == eos; with another pad (Qwen2.5-Instruct
    tokenizers: pad ``<|endoftext|>``, eos ``<|im_end|>``) every ``qwen2_base`` sample fails their
    length check and is masked out entirely. This project's masking does not depend on pad or eos,
    and generation stops at the template's stop token, so such a tokenizer works here, but a
    reference run on the same data would not have trained on it."""
    pad, eos = tokenizer.pad_token, tokenizer.eos_token
    if pad is None or pad == eos:
        return None
    return (f"tokenizer pad token {pad!r} differs from its eos token {eos!r}: TinyLLaVA-Factory/LLaVA-KD's "
            f"label masking assumes they are equal (it masks every qwen2_base sample with such a tokenizer); "
            f"this project masks by the template and stops generation at {ENDOFTEXT!r}, so results are "
            f"unaffected here, but they are not comparable with a reference run on this tokenizer")
