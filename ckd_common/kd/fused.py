"""The loss training uses: fused_kd_loss, the lm_head matmul fused with the loss, chunked over
positions, so no [positions, V] logits tensor ever exists.

It computes CE + the sparse KD divergence (text and visual; KDObjective: forward KL by default) +
the relation loss from the final hidden states and the lm_head weight, with the gradient of the
weighted total formed during the forward (closed form per chunk). Its test oracle is
reference.kd_loss_from_logits (values and gradients).
Conventions: ckd_common/kd/__init__.py.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ckd_common.kd.batch import BatchTargets, build_rows
from ckd_common.kd.divergences import (TeacherBuckets, bucket_divergence, bucket_divergence_grad, bucket_logprobs,
                                       student_buckets, teacher_buckets)
from ckd_common.kd.objective import KDObjective
from ckd_common.kd.relation import relation_loss
from ckd_common.kd.terms import IGNORE_INDEX, compute_dtype, zero_like_graph
from ckd_common.kd.weights import KDWeights, check_rel_variant, require_weights

__all__ = ["fused_kd_loss"]


class _FusedLinearKD(torch.autograd.Function):
    """alpha ce + beta kl_text + gamma kl_vis + delta rel from h_rows and W, by chunks of rows
    (alpha, beta, gamma, delta = the KDWeights ce, kl_text, kl_vis, rel).

    KD part: sum_r [alpha w_text_r ce_r + (beta w_text_r + gamma w_vis_r) kl_r], z_r = h_r W^T.
    Liger-Kernel style: the gradient w.r.t. the logits of a chunk is known in closed form, so it is
    turned into dH (rows of the chunk) and dW (accumulated in place) during the forward and the
    chunk's logits are freed; the backward only scales the stored dH, dW by grad_output. Memory
    beyond the inputs: two [chunk, V] buffers + dW [V, d] + dH [M, d], never [M, V], and dW is
    handed to autograd as the gradient itself (no second W-sized copy).

    d/dz_j of the per-row terms (q = softmax(z), K = valid top-k ids; for the KD term z' = z / T,
    q' = softmax(z'), s'_j = q'_j / Q'_tail the softmax of z' outside K, g_b = dD/d log Q'_b the
    divergence's closed-form bucket gradient, divergences.bucket_divergence_grad):
        ce:  q_j - [j = y]
        kd:  (scale / T) (g_j [j in K] + g_tail s'_j [j not in K] - q'_j sum_b g_b)
    (forward KL: g = -p, which gives q_j (P_K + tau) - p_j [j in K] - tau s_j [j not in K]; rows
    without a tail bucket have g_tail = 0, so their placeholder zm row contributes nothing.)
    At T = 1 q' = q and the kernel holds two [chunk, V] buffers; at T != 1 one more (z').

    rel part: the visual rows of h_rows are the visual spans, so R_S = H_v G H_v^T with
    G = W^T W is computed here too; its gradient w.r.t. (H_v, G) comes from a small local autograd
    graph ([Nv, d] and [d, d] tensors) and dW_rel = W (dG + dG^T) is added into the same dW buffer.
    """

    @staticmethod
    def forward(ctx, h, weight, gram, label, teacher: TeacherBuckets, objective: KDObjective, w_text, w_vis, weights,
                chunk_size, rel_spec, reusable, grad_mode):
        alpha, beta, gamma, delta = weights.ce, weights.kl_text, weights.kl_vis, weights.rel
        temp, scale, kind = objective.temperature, objective.scale, objective.kind
        device_type = h.device.type
        if torch.is_autocast_enabled(device_type):
            mm_dtype = torch.get_autocast_dtype(device_type)  # what the model's lm_head would use
        else:
            mm_dtype = torch.promote_types(h.dtype, weight.dtype)
        dt = compute_dtype(mm_dtype, h.dtype, weight.dtype)
        # needs_input_grad ignores torch.no_grad(); grad_mode is the caller's is_grad_enabled()
        need_h, need_w = grad_mode and ctx.needs_input_grad[0], grad_mode and ctx.needs_input_grad[1]
        need_grad = need_h or need_w
        with torch.autocast(device_type=device_type, enabled=False):
            w_mm = weight.to(mm_dtype)
            grad_h = torch.zeros(h.shape, dtype=dt, device=h.device) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=dt, device=h.device) if need_w else None
            sums = torch.zeros(3, dtype=dt, device=h.device)  # ce, kl_text, kl_vis (weighted)
            for s in range(0, h.shape[0], chunk_size):
                e = min(s + chunk_size, h.shape[0])
                h_c = h[s:e].to(mm_dtype)
                z = (h_c @ w_mm.T).to(dt)  # [C, V]
                lse = torch.logsumexp(z, dim=-1)
                lab = label[s:e]
                has_y = lab != IGNORE_INDEX
                y = lab.clamp_min(0)
                ce = torch.where(has_y, lse - z.gather(-1, y[:, None]).squeeze(-1), torch.zeros_like(lse))
                tb = teacher.rows(s, e)
                zt, lse_t = (z, lse) if temp == 1.0 else (z / temp, None)
                if lse_t is None:
                    lse_t = torch.logsumexp(zt, dim=-1)
                sb = student_buckets(zt, lse_t, tb.ids, tb.valid)
                lp_b, lq_b = bucket_logprobs(tb, sb)
                kd = bucket_divergence(lp_b, lq_b, kind, objective.beta) * scale
                wt, wv = w_text[s:e], w_vis[s:e]
                sums += torch.stack([(wt * ce).sum(), (wt * kd).sum(), (wv * kd).sum()])
                if not need_grad:
                    continue
                c_ce = alpha * wt * has_y.to(dt)
                c_kd = (beta * wt + gamma * wv) * (scale / temp)
                g = bucket_divergence_grad(lp_b, lq_b, kind, objective.beta) * c_kd[:, None]  # [C, k+1]
                g_sum = g.sum(-1)
                zm = sb.zm
                # dZ built in place in the logits buffers
                zm.sub_(sb.lse_tail[:, None]).exp_().mul_(g[:, -1:])  # g_tail s'_j outside K (0 on K)
                dz = z.sub_(lse[:, None]).exp_()  # q
                if zt is z:  # T = 1: q' = q
                    dz.mul_((c_ce - g_sum)[:, None])
                else:
                    dz.mul_(c_ce[:, None]).sub_(zt.sub_(lse_t[:, None]).exp_().mul_(g_sum[:, None]))
                del zt
                dz.scatter_add_(-1, tb.ids, g[:, :-1])  # g_j on K (padding g = 0)
                dz.scatter_add_(-1, y[:, None], -c_ce[:, None])  # - [j = y] (c_ce = 0 if no label)
                dz.add_(zm)
                del zm, sb
                dz_mm = dz.to(mm_dtype)
                if grad_h is not None:
                    grad_h[s:e] = (dz_mm @ w_mm).to(dt)
                if grad_w is not None:
                    if dz_mm.dtype == dt:
                        grad_w.addmm_(dz_mm.T, h_c)  # in place: no [V, d] temporary per chunk
                    else:
                        grad_w += (dz_mm.T @ h_c).to(dt)
                del dz, dz_mm, z

            rel = torch.zeros((), dtype=dt, device=h.device)
            if rel_spec:  # [(row offset, Nv, teacher R)] for samples with image and autocorr
                w32 = weight.to(dt)
                g = (w32.T @ w32) if gram is None else gram.to(dt)
                with torch.enable_grad():
                    g_leaf = g.detach().requires_grad_(need_w)
                    hv = h.detach().to(dt).requires_grad_(need_h)
                    rel = torch.stack(
                        [relation_loss(hv[o : o + n], g_leaf, r_t, rel_spec.variant) for o, n, r_t in rel_spec]
                    ).mean()
                    wanted = [x for x in (hv, g_leaf) if x.requires_grad]
                    grads = torch.autograd.grad(delta * rel, wanted) if wanted and delta != 0 else [None, None]
                rel = rel.detach()
                if need_h and grads[0] is not None:
                    grad_h += grads[0]
                if need_w and grads[-1] is not None:
                    d_g = grads[-1]
                    grad_w.addmm_(w32, d_g + d_g.T)  # d/dW of <dG, W^T W> = W (dG + dG^T)
        ctx.grads = (grad_h, grad_w)
        ctx.reusable = reusable
        ctx.dtypes = (h.dtype, weight.dtype)
        total = weights.total(sums[0], sums[1], sums[2], rel)
        ce, klt, klv = sums.unbind()
        ctx.mark_non_differentiable(ce, klt, klv, rel)
        return total, ce, klt, klv, rel

    @staticmethod
    def backward(ctx, grad_total, *_unused):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_kd_loss: backward ran twice on one forward; pass reusable_backward=True "
                "for retain_graph / gradcheck use"
            )
        grad_h, grad_w = ctx.grads
        if ctx.reusable:  # keep the buffers intact for the next call: scaled copies
            gh = None if grad_h is None else (grad_h * grad_total).to(ctx.dtypes[0])
            gw = None if grad_w is None else (grad_w * grad_total).to(ctx.dtypes[1])
        else:
            ctx.grads = None  # drop our reference so autograd can use dW as W.grad without a copy
            gh = None if grad_h is None else grad_h.mul_(grad_total).to(ctx.dtypes[0])
            gw = None if grad_w is None else grad_w.mul_(grad_total).to(ctx.dtypes[1])
        return gh, gw, None, None, None, None, None, None, None, None, None, None, None


class _RelSpec(list):
    """[(row offset into h_rows, Nv, teacher R)] plus the rel variant; a list so it is falsy when empty."""

    def __init__(self, items, variant: str):
        super().__init__(items)
        self.variant = variant


def fused_kd_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    targets: BatchTargets,
    visual_start: Sequence[int] | torch.Tensor | None = None,
    *,
    weights: KDWeights = KDWeights(),
    objective: KDObjective = KDObjective(),
    chunk_size: int = 128,
    rel_variant: str = "flat",
    visual_len: Sequence[int] | torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
    teacher_vocab: int | None = None,
    reusable_backward: bool = False,
) -> dict[str, torch.Tensor]:
    """Student-side LLaVA-KD loss from final hidden states, lm_head fused, chunked over positions.

    hidden [B, L, d] final-norm hidden states; lm_head_weight [V, d] (pass the embedding matrix for
    a tied head: gradients from both uses accumulate on the same tensor); labels [B, L] unshifted
    (-100 = ignored, right padding allowed); targets: BatchTargets (collate_targets) whose text
    rows align with R_b and visual rows with [visual_start[b], visual_start[b] + Nv_b);
    visual_start [B] (ignored for text-only samples); visual_len optional [B] cross-check.
    gram: optional precomputed lm_head_gram(W) (e.g. cached while W is frozen); otherwise G = W^T W
    is built once per call, only when some sample needs rel. The rel gradient still reaches W.
    objective: the divergence of kl_text / kl_vis, its temperature and top-k' (KDObjective; the
    default is forward KL at T = 1 on every stored entry); teacher_vocab: the vocabulary the targets
    were taken over (the cache's common vocabulary; default V), which only sizes the tail estimate
    at T != 1 (divergences.tempered_tail_log).

    Returns {total, ce, kl_text, kl_vis, rel} with the per-sample averaging of
    llava_kd_loss_dense; rel averages over samples with an image and a teacher autocorr.
    Only ``total`` carries gradients: the other entries are detached values for logging, because
    the fused kernel computes the gradient of the weighted sum during the forward (so no
    [positions, V] tensor lives until the backward). By default backward may run once: the
    stored dW buffer itself becomes W's gradient (no W-sized copy); reusable_backward=True keeps
    the buffers for retain_graph / gradcheck at the cost of one copy per backward. Logits exist only ``chunk_size`` rows at a time.
    Under autocast the lm_head matmuls run in the autocast dtype; all loss math, the dW
    accumulation and the autocorrelation are float32.
    """
    weights = require_weights(weights)
    if not isinstance(objective, KDObjective):
        raise TypeError(f"objective must be a KDObjective, got {type(objective).__name__}")
    check_rel_variant(rel_variant)
    if hidden.ndim != 3 or hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [B, L, d] matching labels {tuple(labels.shape)}")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    vocab = lm_head_weight.shape[0]
    dt = compute_dtype(hidden.dtype, lm_head_weight.dtype)
    rows = build_rows(labels, targets, visual_start, visual_len, dt)
    if rows.ids.numel() and int(rows.ids.max()) >= vocab:
        raise ValueError(f"target id {int(rows.ids.max())} >= student vocab {vocab}")

    # visual rows follow the text rows, span after span, in rows.vis_spans order
    rel_items, offset = [], targets.text_offsets[-1]
    for b, _v0, nv in rows.vis_spans:
        r_t = targets.autocorr[b]
        if r_t is not None:
            if tuple(r_t.shape) != (nv, nv):
                raise ValueError(f"sample {b}: teacher autocorr {tuple(r_t.shape)} != ({nv}, {nv})")
            rel_items.append((offset, nv, r_t.to(hidden.device)))
        offset += nv
    if not rows.b.numel():
        zero = zero_like_graph(hidden, dt) + zero_like_graph(lm_head_weight, dt)
        return {"total": zero, "ce": zero.detach(), "kl_text": zero.detach(), "kl_vis": zero.detach(), "rel": zero.detach()}
    h_rows = hidden[rows.b, rows.t]  # [M, d]; the index backward scatters dH into hidden
    teacher = teacher_buckets(rows.ids, rows.logprobs, rows.tail, objective, vocab, teacher_vocab)
    total, ce, klt, klv, rel = _FusedLinearKD.apply(
        h_rows, lm_head_weight, gram, rows.label, teacher, objective,
        rows.w_text, rows.w_vis, weights, int(chunk_size), _RelSpec(rel_items, rel_variant), bool(reusable_backward),
        torch.is_grad_enabled(),
    )
    return {"total": total, "ce": ce, "kl_text": klt, "kl_vis": klv, "rel": rel}
