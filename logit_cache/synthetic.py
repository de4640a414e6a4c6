"""Synthetic teacher-like targets for tests and bench/cache_io.py (no model needed).

Top-k: logits per position = Zipf unigram prior (-s * log(rank), low ids frequent as in BPE
vocabularies) + Gaussian context noise + a strong boost on a few context candidates drawn from the
prior, times a random inverse temperature. This gives peaked positions (top-1 near 1) and
heavy-tailed ones (large mass outside the top-k) in one set. The top-k is taken from the FULL
softmax, so tails are exact.

Autocorrelation (teacher_like_hidden / teacher_like_gram / teacher_like_autocorr): R = H G H^T from
hidden states shaped like a VLM's final-norm states on an image's patch grid, because a random-
initialised model's R is unrealistically simple (docs/environment.md §4). Per token (pre-norm):
a component common to every visual token (LLM states are anisotropic: a shared mean direction),
the prototype of the image region it lies in (Voronoi regions of the grid), a spatially smooth field
(Gaussian-blurred noise over the grid: neighbouring patches look alike) and token noise, all drawn
with a power-law channel spectrum; then RMS normalisation and a norm weight with a few large
("massive activation") channels. G = W^T W of an lm_head with a power-law spectrum and a mean row.
The profiles span easy (strong common component, little noise) to hard (weak common component,
noise-dominated tokens, flat channel spectrum); they are assumptions, stated so the measurements
that use them can be judged.
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


# knobs of teacher_like_hidden: common / region / smooth / noise weights, regions, blur length (patches),
# channel power-law exponent
AUTOCORR_PROFILES: dict[str, dict[str, float]] = {
    "easy": dict(common=2.0, region=1.0, smooth=0.7, noise=0.3, regions=8, blur=2.0, alpha=1.0),
    "typical": dict(common=1.5, region=1.0, smooth=0.7, noise=0.5, regions=8, blur=2.0, alpha=1.0),
    "noisy": dict(common=1.0, region=1.0, smooth=0.5, noise=1.0, regions=12, blur=1.5, alpha=1.0),
    "hard": dict(common=0.7, region=1.0, smooth=0.7, noise=1.5, regions=16, blur=1.0, alpha=0.5),
}


def grid_positions(nv: int) -> tuple[np.ndarray, int]:
    """(y, x) of Nv patch tokens on the smallest square grid: 729 = 27 x 27 ('full'), 728 = the same
    grid without its first patch ('patch')."""
    g = int(np.ceil(np.sqrt(nv)))
    yx = np.stack(np.meshgrid(np.arange(g), np.arange(g), indexing="ij"), -1).reshape(-1, 2)
    return yx[g * g - nv:], g


def image_regions(nv: int, rng: np.random.Generator, profile: str = "typical") -> np.ndarray:
    """An image's segmentation: the region (Voronoi cell of random seeds on the grid) of each token."""
    yx, g = grid_positions(nv)
    seeds = rng.uniform(0, g, (int(AUTOCORR_PROFILES[profile]["regions"]), 2))
    return np.argmin(((yx[:, None, :] - seeds[None]) ** 2).sum(-1), 1)


class TeacherLikeModel:
    """One model's statistics: a channel basis with a power-law spectrum, the direction its states
    share, a norm weight with a few massive channels, and its lm_head Gram G; ``hidden`` draws its
    final-norm states on the visual tokens of one image (module docstring)."""

    def __init__(self, d: int, rng: np.random.Generator, profile: str = "typical") -> None:
        self.d, self.profile, self.p = d, profile, AUTOCORR_PROFILES[profile]
        self.basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
        c = np.arange(1, d + 1, dtype=np.float64) ** (-self.p["alpha"])
        self.scale = np.sqrt(c / c.sum() * d)  # unit mean variance per channel
        self.common = self.draw(1, rng)
        self.gamma = np.ones(d)
        massive = rng.choice(d, 3, replace=False)
        self.gamma[massive] = rng.uniform(5, 20, 3)
        self.gram = teacher_like_gram(d, rng)

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return (rng.standard_normal((n, self.d)) * self.scale) @ self.basis.T

    def hidden(self, nv: int, rng: np.random.Generator, regions: np.ndarray | None = None) -> np.ndarray:
        """[Nv, d] float32 for one image (``regions``: its segmentation, e.g. shared with another model)."""
        p = self.p
        region = image_regions(nv, rng, self.profile) if regions is None else regions
        _, g = grid_positions(nv)
        f = np.fft.fftfreq(g)
        blur = np.exp(-2 * (np.pi * p["blur"]) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
        field = np.fft.ifft2(np.fft.fft2(self.draw(g * g, rng).reshape(g, g, self.d), axes=(0, 1)) * blur[..., None],
                             axes=(0, 1)).real
        field = field.reshape(g * g, self.d)[g * g - nv:]
        field /= field.std() or 1.0
        h = (p["common"] * self.common + p["region"] * self.draw(int(region.max()) + 1, rng)[region]
             + p["smooth"] * field + p["noise"] * self.draw(nv, rng))
        h /= np.sqrt((h ** 2).mean(1, keepdims=True))  # RMSNorm
        return (h * self.gamma).astype(np.float32)

    def autocorr(self, h: np.ndarray) -> np.ndarray:
        """R / ||R||_F [Nv, Nv] float32, R = H G H^T."""
        h = h.astype(np.float64)
        r = h @ self.gram @ h.T
        return (r / np.linalg.norm(r)).astype(np.float32)


def teacher_like_hidden(nv: int, d: int, rng: np.random.Generator, profile: str = "typical") -> np.ndarray:
    """Final-norm hidden states [Nv, d] float32 of one image, from a fresh TeacherLikeModel."""
    return TeacherLikeModel(d, rng, profile).hidden(nv, rng)


def teacher_like_gram(d: int, rng: np.random.Generator, alpha: float = 1.0, mean: float = 0.5) -> np.ndarray:
    """G = W^T W / V [d, d] float64 of an lm_head with a power-law spectrum and a mean row."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    c = np.arange(1, d + 1, dtype=np.float64) ** (-alpha)
    c = c / c.sum() * d
    mu = (q * np.sqrt(c)) @ rng.standard_normal(d) * mean
    return (q * c) @ q.T + np.outer(mu, mu)


def teacher_like_autocorr(nv: int, d: int, rng: np.random.Generator, profile: str = "typical") -> np.ndarray:
    """R / ||R||_F [Nv, Nv] float32 of one image, from a fresh TeacherLikeModel."""
    m = TeacherLikeModel(d, rng, profile)
    return m.autocorr(m.hidden(nv, rng))


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
