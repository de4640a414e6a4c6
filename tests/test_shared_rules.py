"""Shared rules have one owner: the loss weights (KDWeights) and relation variants (ckd_common.kd.weights),
and the common vocabulary (ModelInfo.common_vocab). Their validation and the places that import them."""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest

from ckd_common.kd import REL_VARIANTS, KDWeights, check_rel_variant


def test_kd_weights_are_named_floats_and_sum_the_terms():
    w = KDWeights(ce=1, kl_text=0.5, kl_vis=0, rel=2)
    assert (w.ce, w.kl_text, w.kl_vis, w.rel) == (1.0, 0.5, 0.0, 2.0)
    assert all(type(getattr(w, f.name)) is float for f in dataclasses.fields(w))
    assert w.total(ce=3.0, kl_text=4.0, kl_vis=100.0, rel=0.25) == 3.0 + 2.0 + 0.0 + 0.5
    assert KDWeights() == KDWeights(1.0, 1.0, 1.0, 1.0)
    assert KDWeights.from_sequence([1, 0, 0, 0]) == KDWeights(ce=1.0, kl_text=0.0, kl_vis=0.0, rel=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.ce = 2.0  # type: ignore[misc]


@pytest.mark.parametrize("bad", [-1.0, -1e-12, math.nan, math.inf, "x", None, True])
def test_kd_weights_reject_a_bad_weight_naming_it(bad):
    with pytest.raises(ValueError, match=r"kl_vis=.*finite number >= 0"):
        KDWeights(ce=1.0, kl_text=1.0, kl_vis=bad, rel=1.0)


def test_kd_weights_report_every_bad_weight_at_once():
    with pytest.raises(ValueError) as e:
        KDWeights(ce=-1.0, kl_text=1.0, kl_vis=1.0, rel=math.nan)
    assert "ce=-1.0" in str(e.value) and "rel=nan" in str(e.value) and "kl_text" not in str(e.value)


@pytest.mark.parametrize("values", [(1.0, 1.0, 1.0), (1.0, 1.0, 1.0, 1.0, 1.0), (), "abcd"])
def test_kd_weights_from_a_sequence_need_exactly_four(values):
    with pytest.raises(ValueError, match="needs 4 values"):
        KDWeights.from_sequence(values)


def test_losses_refuse_a_positional_tuple():
    import torch

    from ckd_common.kd import collate_targets, fused_kd_loss, kd_loss_from_logits, llava_kd_loss_dense
    from ckd_common.targets import SampleTargets, SparseTopK

    labels = torch.tensor([[-100, 1, 2]])
    topk = SparseTopK(np.array([[1], [2]]), np.zeros((2, 1), np.float32), np.zeros(2, np.float32))
    targets = collate_targets([SampleTargets("s", topk)])
    hidden, weight = torch.randn(1, 3, 4), torch.randn(5, 4)
    with pytest.raises(TypeError, match="KDWeights"):
        fused_kd_loss(hidden, weight, labels, targets, weights=(1.0, 1.0, 1.0, 1.0))
    with pytest.raises(TypeError, match="KDWeights"):
        kd_loss_from_logits(hidden @ weight.T, labels, targets, weights=(1.0, 1.0, 1.0, 1.0))
    with pytest.raises(TypeError, match="KDWeights"):
        llava_kd_loss_dense(hidden @ weight.T, hidden @ weight.T, labels, torch.zeros(1, 3, dtype=torch.bool),
                            (1.0, 1.0, 1.0, 1.0))
    # the named type is accepted and a zero weight switches its term off
    out = fused_kd_loss(hidden, weight, labels, targets, weights=KDWeights(ce=0.0, kl_text=1.0, kl_vis=1.0, rel=1.0))
    torch.testing.assert_close(out["total"], out["kl_text"])


def test_rel_variants_have_one_owner():
    import student_trainer.config as trainer_config
    from ckd_common.kd import weights

    assert trainer_config.REL_VARIANTS is weights.REL_VARIANTS is REL_VARIANTS
    assert check_rel_variant("column") == "column"
    with pytest.raises(ValueError, match="rel variant must be one of"):
        check_rel_variant("rows")


def test_train_config_weights_map_the_flags_to_the_terms():
    from student_trainer.config import TrainConfig

    cfg = TrainConfig(step="dft", model="m", data="d", out="o", alpha=0.5, beta=0.25, gamma=2.0, delta=3.0).resolved()
    assert cfg.weights == KDWeights(ce=0.5, kl_text=0.25, kl_vis=2.0, rel=3.0)


@pytest.mark.integration  # a fresh interpreter: the only way to see what an import pulls in
def test_trainer_config_and_kd_weights_load_without_torch():
    """Configs and CLIs that only need the weights rule must not pay for importing torch."""
    code = ("import sys; import student_trainer.config; from ckd_common.kd import KDWeights, REL_VARIANTS; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("head,tokens,common", [(152_064, 151_665, 151_665), (512, 600, 512), (64, 64, 64)])
def test_common_vocab_is_the_smaller_of_head_rows_and_real_tokens(head, tokens, common):
    from ckd_common.model import ModelInfo

    info = ModelInfo(fingerprint="f", tokenizer_hash="t", vocab_size=head, tokenizer_vocab_size=tokens,
                     hidden_size=8, num_visual_tokens=4, vision_strategy="patch", image_size=28, image_token_id=3)
    assert info.common_vocab == common
