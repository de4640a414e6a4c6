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

# Qwen2.5's chat template (simplified: no tools). Present so AutoTokenizer users get one.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)


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
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out_dir))
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
