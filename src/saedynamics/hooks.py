"""Activations out of a causal LM: hooks on its blocks, stopped as early as possible.

The hooked activation is the residual stream after block L, the output of `gpt_neox.layers[L]`
(= TransformerLens blocks.L.hook_resid_post); not `output_hidden_states`, whose last entry is taken
after the final LayerNorm (docs/spec/measurements.md section 4.3). Extra columns, per token, only when
asked for (config.EXTRA_COLUMNS):
  lm_entropy  entropy of the checkpoint's next-token distribution at the position (nats): the whole
              forward pass;
  lm_grad     gradient of the window's summed next-token loss w.r.t. the hooked activation (all
              later positions' losses, through every later layer): a backward pass as well.
Without them, and without the LM's loss, the forward pass stops after the deepest hooked layer.
"""

from __future__ import annotations

import contextlib

import torch

from saedynamics.errors import DataError


def block_modules(model) -> list:
    """The transformer blocks of a causal LM (GPT-NeoX; GPT-2 and Llama-style as a courtesy)."""
    for path in ("gpt_neox.layers", "transformer.h", "model.layers"):
        obj = model
        with contextlib.suppress(AttributeError):
            for part in path.split("."):
                obj = getattr(obj, part)
            return list(obj)
    raise DataError(f"cannot find the transformer blocks of a {type(model).__name__}")


def next_token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution at every position [batch, seq]."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


class _Stop(Exception):
    """Raised by the deepest hook when nothing after it is needed."""


class LayerHooks:
    """Captures the residual stream after `layers` of `model` during a forward pass (`run`)."""

    def __init__(self, model, layers: list[int], extras=()):
        self.model, self.layers, self.extras = model, layers, tuple(extras)
        blocks = block_modules(model)
        if missing := [layer for layer in layers if layer >= len(blocks)]:
            raise DataError(f"the model has {len(blocks)} layers; layers {missing} do not exist")
        self.captured: dict[int, torch.Tensor] = {}
        self.stop_after: int | None = None
        self.handles = [blocks[layer].register_forward_hook(self._hook(layer)) for layer in layers]
        if "lm_grad" in self.extras:  # a leaf at the embeddings: autograd reaches every layer
            embeddings = model.get_input_embeddings()
            self.handles.append(
                embeddings.register_forward_hook(lambda m, a, out: out.detach().requires_grad_())
            )

    def _hook(self, layer: int):
        def capture(module, args, output):
            self.captured[layer] = output[0] if isinstance(output, tuple) else output
            if self.stop_after == layer:
                raise _Stop

        return capture

    def run(self, ids: torch.Tensor, logits: bool) -> tuple[dict, dict, torch.Tensor | None]:
        """({layer: activations [b, seq, d]}, {layer: extra columns}, next-token losses [b, seq-1]
        or None). `logits`: run the whole model even if no extra column needs it."""
        self.captured = {}
        self.stop_after = None if logits or self.extras else max(self.layers)
        with torch.set_grad_enabled("lm_grad" in self.extras):
            try:
                out = self.model(input_ids=ids)
            except _Stop:
                return dict(self.captured), {layer: {} for layer in self.layers}, None
        logp = out.logits[:, :-1].float().log_softmax(-1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        columns = {}
        if "lm_entropy" in self.extras:
            columns["lm_entropy"] = next_token_entropy(out.logits.detach())
        per_layer = {layer: dict(columns) for layer in self.layers}
        if "lm_grad" in self.extras:
            grads = torch.autograd.grad(nll.sum(), [self.captured[layer] for layer in self.layers])
            for layer, grad in zip(self.layers, grads, strict=True):
                per_layer[layer]["lm_grad"] = grad
        return {k: v.detach() for k, v in self.captured.items()}, per_layer, nll.detach()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
