"""The sparse training path: SAE products that skip the zeros of top-k-sparse codes.

A dense TopK step spends six [batch x d_in x d_sae] matmuls: the encoder forward (needed: every
pre-activation competes for the top k), the decoder forward, and four in the backward, although
only k of d_sae codes per token are non-zero and only those carry gradient. Two products cut the
step to the encoder forward plus work over the non-zeros, both through `embedding_bag` (a
sparse-dense product whose torch backward gives the table's gradient and the per-entry weights'):

- `codes_matmul(f, W)` = f @ W for codes f [B, n] and a dictionary W [n, d], gathered over the
  non-zeros of f. The gradient to f is exactly zero off its support. That is exact for codes that
  are flat where they are zero (ReLU, top-k masks): architectures declare it (`SAE.sparse_codes`);
  JumpReLU cannot (its threshold's pseudo-gradient lives just below the threshold).
- `linear(x, W, b)` = x @ W + b, dense forward; the backward reads the non-zeros of the incoming
  gradient (top-k: k per row, plus AuxK's) and forms dx = g W^T and dW = x^T g over those alone.
  Exact for any architecture.

Each product measures the density of its sparse operand and takes the dense BLAS product above
`DENSITY_LIMIT` (an L1 SAE early in training, AuxK with many dead latents). `mode()` chooses the
path: "auto" (CPU, large and sparse enough; never under autocast or on accelerators,
where tensor cores win), "sparse" or "dense" (tests compare the two).
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Mode = Literal["auto", "sparse", "dense"]
DENSITY_LIMIT = 0.05  # above this fraction of non-zeros the dense BLAS product is faster on CPU
MIN_WORK = 1 << 26  # multiply-adds of the dense product below which the bookkeeping does not pay
_mode: Mode = "auto"


@contextlib.contextmanager
def mode(new: Mode):
    """Run a block with the sparse path forced on ("sparse"), off ("dense"), or chosen ("auto")."""
    global _mode
    if new not in ("auto", "sparse", "dense"):
        raise ValueError(f"sparse path mode must be auto, sparse or dense, not {new!r}")
    old, _mode = _mode, new
    try:
        yield
    finally:
        _mode = old


def _use_sparse(t: Tensor, other_dim: int) -> bool:
    """Whether the product of the mostly-zero `t` [B, n] with an [n, other_dim] operand goes sparse."""
    if _mode == "dense" or torch.is_autocast_enabled(t.device.type):  # autocast: tensor cores
        return False
    if _mode == "sparse":
        return True
    if t.device.type != "cpu" or t.numel() * other_dim < MIN_WORK:
        return False
    return torch.count_nonzero(t).item() <= DENSITY_LIMIT * t.numel()


def _bag_offsets(bag_of_entry: Tensor, n_bags: int) -> Tensor:
    """Where each bag starts among entries sorted by bag (the `offsets` of `embedding_bag`)."""
    offsets = torch.zeros(n_bags, dtype=torch.long, device=bag_of_entry.device)
    offsets[1:] = torch.bincount(bag_of_entry, minlength=n_bags).cumsum(0)[:-1]
    return offsets


def _bag_sum(indices: Tensor, table: Tensor, offsets: Tensor, weights: Tensor) -> Tensor:
    """out[b] = sum over bag b of weights[e] * table[indices[e]] (a sparse-dense product whose
    backward, in torch, gives both the table's gradient and the sampled weight gradient)."""
    return F.embedding_bag(indices, table, offsets, mode="sum", per_sample_weights=weights)


def codes_matmul(codes: Tensor, weight: Tensor) -> Tensor:
    """codes @ weight, through the sparse path where the codes are sparse enough (module docstring).

    Autograd flows through the gathered non-zero values: d codes is exactly zero off the support.
    """
    if codes.dim() != 2 or not _use_sparse(codes, weight.shape[1]):
        return codes @ weight
    rows, cols = codes.detach().nonzero(as_tuple=True)  # row-major: entries sorted by row
    return _bag_sum(cols, weight, _bag_offsets(rows, len(codes)), codes[rows, cols])


class _SparseGradLinear(torch.autograd.Function):
    """x @ W + b; the backward forms dx and dW over the non-zeros of the incoming gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.addmm(bias, x, weight) if bias is not None else x @ weight

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if _use_sparse(grad, x.shape[1]):
            rows, cols = grad.nonzero(as_tuple=True)  # row-major: entries sorted by row
            values = grad[rows, cols]
            if ctx.needs_input_grad[0]:  # dx[b] = sum_j g[b, j] W[:, j]
                grad_x = _bag_sum(
                    cols, weight.T.contiguous(), _bag_offsets(rows, len(grad)), values
                )
            if ctx.needs_input_grad[1]:  # dW[:, j] = sum_b g[b, j] x[b]: the same, by column
                order = torch.argsort(cols, stable=True)
                offsets = _bag_offsets(cols, weight.shape[1])
                grad_w = _bag_sum(rows[order], x, offsets, values[order]).T
        else:
            grad_x = grad @ weight.T if ctx.needs_input_grad[0] else None
            grad_w = x.T @ grad if ctx.needs_input_grad[1] else None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=0)
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight + bias whose backward skips the zeros of the incoming gradient (module docstring)."""
    if _mode == "dense" or not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
        return torch.addmm(bias, x, weight) if bias is not None else x @ weight
    return _SparseGradLinear.apply(x, weight, bias)
