"""Synthetic teacher-like targets for tests and bench/cache_io.py (no model needed).

Logits per position = Zipf unigram prior (-s * log(rank), low ids frequent as in BPE vocabularies)
+ Gaussian context noise + a strong boost on a few context candidates drawn from the prior, times a
random inverse temperature. This gives peaked positions (top-1 near 1) and heavy-tailed ones (large
mass outside the top-k) in one set. The top-k is taken from the FULL softmax, so tails are exact.
"""
from __future__ import annotations

import hashlib

import numpy as np

from ckd_common.targets import SampleTargets, SparseTopK


def teacher_like_topk(n: int, vocab: int, k: int, seed: int = 0, zipf_s: float = 1.0, boost_mean: float = 5.0,
                      boost_std: float = 2.5, noise_std: float = 1.5, candidates: int = 32,
                      temp_log_std: float = 0.3, batch: int = 256) -> SparseTopK:
    if vocab <= 4096:
        return _teacher_like_numpy(n, vocab, k, seed, zipf_s, boost_mean, boost_std, noise_std, candidates,
                                   temp_log_std)
    import torch

    g = torch.Generator().manual_seed(seed)
    prior = -zipf_s * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    pri_p = torch.softmax(prior, 0)
    ids, lps = [], []
    for s in range(0, n, batch):
        b = min(batch, n - s)
        z = prior.expand(b, vocab) + noise_std * torch.randn(b, vocab, generator=g)
        m = min(candidates, vocab)
        cand = torch.multinomial(pri_p, b * m, replacement=True, generator=g).view(b, m)
        z.scatter_add_(1, cand, torch.randn(b, m, generator=g) * boost_std + boost_mean)
        z = z * torch.exp(torch.randn(b, 1, generator=g) * temp_log_std)
        lp = torch.log_softmax(z, 1)
        kk = min(k, vocab)
        v, i = torch.topk(lp, kk, 1)
        if kk < k:  # pad: -inf with id 0
            v = torch.cat([v, torch.full((b, k - kk), -float("inf"))], 1)
            i = torch.cat([i, torch.zeros((b, k - kk), dtype=i.dtype)], 1)
        ids.append(i.numpy())
        lps.append(v.numpy().astype(np.float32))
    idsa = np.concatenate(ids) if ids else np.zeros((0, k), np.int64)
    lpa = np.concatenate(lps) if lps else np.zeros((0, k), np.float32)
    tail = np.clip(1.0 - np.exp(lpa.astype(np.float64)).sum(1), 0.0, 1.0).astype(np.float32)
    return SparseTopK(ids=idsa.astype(np.int64), logprobs=lpa, tail=tail)


def random_key(i: int, salt: str = "") -> str:
    return hashlib.sha256(f"{salt}:{i}".encode()).hexdigest()[:32]


def random_autocorr(nv: int, rng: np.random.Generator, d: int = 16) -> np.ndarray:
    h = rng.standard_normal((nv, d)).astype(np.float32)
    r = h @ h.T
    return (r / np.linalg.norm(r)).astype(np.float32)


def make_sample(i: int, vocab: int = 1000, k: int = 8, nv: int = 4, image: bool | None = None,
                salt: str = "") -> SampleTargets:
    """A small deterministic sample (tests): text positions 0..11, an image for 2 of 3 samples."""
    rng = np.random.default_rng(i + 7919 * len(salt))
    nt = int(rng.integers(0, 12))
    image = (i % 3 != 2) if image is None else image
    text = teacher_like_topk(nt, vocab, k, seed=i * 2 + 1)
    if not image:
        return SampleTargets(key=random_key(i, salt), text=text)
    vis = teacher_like_topk(nv, vocab, k, seed=i * 2 + 2)
    return SampleTargets(key=random_key(i, salt), text=text, visual=vis, autocorr=random_autocorr(nv, rng))


def _teacher_like_numpy(n, vocab, k, seed, zipf_s, boost_mean, boost_std, noise_std, candidates, temp_log_std):
    """Same model in numpy (small vocabularies: tests, no torch import)."""
    rng = np.random.default_rng(seed)
    prior = -zipf_s * np.log(np.arange(1, vocab + 1, dtype=np.float64))
    pri_p = np.exp(prior - prior.max())
    pri_p /= pri_p.sum()
    z = prior[None, :] + noise_std * rng.standard_normal((n, vocab))
    m = min(candidates, vocab)
    cand = rng.choice(vocab, size=(n, m), p=pri_p)
    np.add.at(z, (np.repeat(np.arange(n), m), cand.ravel()), (rng.standard_normal(n * m) * boost_std + boost_mean))
    z *= np.exp(rng.standard_normal((n, 1)) * temp_log_std)
    lp = z - z.max(1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(1, keepdims=True))
    kk = min(k, vocab)
    idx = np.argsort(-lp, axis=1, kind="stable")[:, :kk]
    v = np.take_along_axis(lp, idx, 1).astype(np.float32)
    if kk < k:
        v = np.concatenate([v, np.full((n, k - kk), -np.inf, np.float32)], 1)
        idx = np.concatenate([idx, np.zeros((n, k - kk), idx.dtype)], 1)
    tail = np.clip(1.0 - np.exp(v.astype(np.float64)).sum(1), 0.0, 1.0).astype(np.float32)
    return SparseTopK(ids=idx.astype(np.int64), logprobs=v, tail=tail)
