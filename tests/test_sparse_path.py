"""The sparse training path gives the dense path's loss and gradients (saes/sparse.py).

Tolerance: float32 sums in a different order, so relative 1e-4 on losses and gradients (the
observed differences are ~1e-6).
"""

from __future__ import annotations

import copy

import pytest
import torch

from saedynamics.saes import REGISTRY, TrainStep, sparse
from saedynamics.saes.sparse import codes_matmul, linear

from .synthetic import k_if_any, make_sae

# every architecture whose codes are top-k sparse
TOPK_FAMILY = ["topk", "batchtopk", "mutual_choice", "vsae", "matryoshka", "adaptivek", "topafa"]


def gradients(sae, x, extras, path):
    sae = copy.deepcopy(sae)
    with sparse.mode(path):
        out = sae.loss(x, TrainStep(3, 10), extras)
        out.total.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    return out, grads


def assert_close(a, b, what):
    scale = b.abs().max().clamp_min(1e-6)
    assert (a - b).abs().max() <= 1e-4 * scale, f"{what}: max diff {(a - b).abs().max():.2e}"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_sparse_and_dense_paths_agree(name):
    hyper = k_if_any(name, 4)
    if name == "matryoshka":
        hyper["group_fractions"] = [0.25, 0.25, 0.5]
    sae = make_sae(name, 16, 64, **hyper)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, 16, generator=gen)
    extras = {
        "lm_entropy": torch.rand(128, generator=gen),
        "lm_grad": torch.randn(128, 16, generator=gen) * 0.01,
    }
    extras = {c: extras[c] for c in sae.requires}
    sae.init_from_sample(x, extras)
    sae.tokens_since_fired[::3] = 10**9  # some dead latents, so AuxK takes part
    dense_out, dense = gradients(sae, x, extras, "dense")
    sparse_out, sparse_grads = gradients(sae, x, extras, "sparse")
    assert_close(sparse_out.total, dense_out.total, "loss")
    assert dense.keys() == sparse_grads.keys()
    for n in dense:
        assert_close(sparse_grads[n], dense[n], f"d loss / d {n}")


def test_codes_matmul_and_linear_against_dense_by_hand():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randn(6, 10, generator=gen).relu() * (torch.rand(6, 10, generator=gen) < 0.3)
    w = torch.randn(10, 4, generator=gen)
    for path in ("sparse", "dense"):
        c, ww = codes.clone().requires_grad_(), w.clone().requires_grad_()
        with sparse.mode(path):
            out = codes_matmul(c, ww)
            (out * torch.arange(24.0).view(6, 4)).sum().backward()
        assert torch.allclose(out, codes @ w, atol=1e-6)
        g = torch.arange(24.0).view(6, 4)
        assert torch.allclose(ww.grad, codes.T @ g, atol=1e-5)
        # d/dcodes only where a code is non-zero on the sparse path; the dense path has all of it
        full = g @ w.T
        expected = full * (codes != 0) if path == "sparse" else full
        assert torch.allclose(c.grad, expected, atol=1e-5)

    x = torch.randn(6, 4, generator=gen, requires_grad=True)
    wt = torch.randn(4, 10, generator=gen, requires_grad=True)
    b = torch.randn(10, generator=gen, requires_grad=True)
    mask = torch.rand(6, 10, generator=gen) < 0.2
    with sparse.mode("sparse"):
        (linear(x, wt, b) * mask).sum().backward()
    assert torch.allclose(x.grad, mask.float() @ wt.T.detach(), atol=1e-6)
    assert torch.allclose(wt.grad, x.detach().T @ mask.float(), atol=1e-6)
    assert torch.allclose(b.grad, mask.float().sum(0))


def test_auto_mode_goes_sparse_only_where_codes_are_sparse_and_large():
    big_sparse = torch.zeros(4096, 4096)
    big_sparse[:, :32] = 1.0
    assert sparse._use_sparse(big_sparse, 512)
    assert not sparse._use_sparse(torch.ones(4096, 4096), 512)  # dense codes: BLAS wins
    assert not sparse._use_sparse(big_sparse[:8, :64], 8)  # tiny: not worth the bookkeeping
    with pytest.raises(ValueError, match="auto, sparse or dense"), sparse.mode("fast"):
        pass
