"""The training loss of a causal LM without full-vocabulary logits.

What `CausalLMLoss` guarantees:
- the loss is the sum of the next-token cross-entropies over a batch's trained positions only
  (tuneline/server/packing.py picks them), and the number of those predictions that are right
  (greedy), so a caller divides by the trained tokens of the whole (possibly multi-rank) batch;
- for a model whose logits are its output embedding applied to the last hidden state (Llama, Qwen,
  Mistral, GPT-2, Phi, ...), the vocabulary projection is taken in chunks of `chunk_tokens` trained
  positions by `linear_cross_entropy`, whose backward pass keeps no logits: memory grows with the
  trained tokens x hidden size, never with tokens x vocabulary. On CUDA, liger-kernel's fused linear
  cross-entropy is used instead when it is installed (the optional extra `gpu`; never required);
- a model whose logits are scaled or soft-capped (SCALED_LOGITS_ATTRIBUTES) is run whole, with the
  model's own head restricted to the columns that hold a trained position (`logits_to_keep`);
- it is an nn.Module whose forward takes the batch's tensors, so data-parallel wrappers (DDP, FSDP)
  see the whole computation, the vocabulary projection included.

Why by hand: the fused kernels that do this (liger-kernel, Apple's cut-cross-entropy) need Triton and
CUDA; the chunked fallback is the same computation in plain PyTorch for every other device.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from tuneline.server.packing import Batch

# Models whose logits are not the output embedding of the last hidden state, unscaled.
SCALED_LOGITS_ATTRIBUTES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")
# Trained positions per chunk of the vocabulary projection: the chunk's float32 logits take
# chunk x vocabulary x 4 bytes (a 128k vocabulary: 2 GiB at 4096), twice over in the backward part.
CHUNK_TOKENS = 4096


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T + bias, targets), and the right predictions.
    The gradients are computed during the forward pass, chunk by chunk, and scaled in backward: no
    chunk's logits outlive its iteration."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_tokens: int,
        compute_dtype: torch.dtype,
        track: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        want_hidden = track and hidden.requires_grad
        want_weight = track and weight.requires_grad
        want_bias = track and bias is not None and bias.requires_grad
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        )
        grad_bias = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_bias else None
        )
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        projection = weight.to(compute_dtype)
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = min(start + chunk_tokens, hidden.shape[0])
            part = hidden[start:end].to(compute_dtype)
            logits = (part @ projection.T).float()
            if bias is not None:
                logits += bias.float()
            wanted = targets[start:end]
            normalizer = torch.logsumexp(logits, dim=-1)
            loss += (normalizer - logits.gather(1, wanted[:, None]).squeeze(1)).sum()
            correct += (logits.argmax(dim=-1) == wanted).sum()
            if not (want_hidden or want_weight or want_bias):
                continue
            # d(sum of losses)/d(logits) = softmax - one_hot(target), computed in place.
            logits.sub_(normalizer[:, None]).exp_()
            logits[torch.arange(end - start, device=logits.device), wanted] -= 1.0
            if grad_bias is not None:
                grad_bias += logits.sum(dim=0)
            gradient = logits.to(compute_dtype)
            del logits
            if grad_hidden is not None:
                grad_hidden[start:end] = (gradient @ projection).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (gradient.T @ part).float()
        ctx.save_for_backward(
            *(t if t is not None else torch.empty(0) for t in (grad_hidden, grad_weight, grad_bias))
        )
        ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_correct: Any) -> tuple[Any, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        grad_hidden, grad_weight, grad_bias = (
            tensor if present else None for tensor, present in zip(saved, ctx.present, strict=True)
        )
        scale = grad_loss.float()
        return (
            (grad_hidden * scale.to(grad_hidden.dtype)) if grad_hidden is not None else None,
            (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None,
            (grad_bias * scale).to(ctx.bias_dtype) if grad_bias is not None else None,
            None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_tokens: int = CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, right predictions) of the rows of `hidden` projected by `weight` (+bias),
    in chunks of `chunk_tokens` rows; under autocast the projection runs in the autocast dtype and
    the softmax in float32, as the model's own head and loss would."""
    device_type = hidden.device.type
    compute_dtype = (
        torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    )
    with torch.autocast(device_type, enabled=False):
        loss, correct = _LinearCrossEntropy.apply(
            hidden, weight, bias, targets, chunk_tokens, compute_dtype, torch.is_grad_enabled()
        )
    return loss, correct


def _liger_loss() -> Any | None:
    """liger-kernel's fused linear cross-entropy (summed), or None when it is not installed."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    try:
        return LigerFusedLinearCrossEntropyLoss(reduction="sum", return_token_accuracy=True)
    except TypeError:  # releases before token accuracy
        return LigerFusedLinearCrossEntropyLoss(reduction="sum")


class CausalLMLoss(torch.nn.Module):
    """forward(batch tensors) -> (summed loss over trained positions, right predictions). `kernel`:
    "auto" (liger on CUDA when installed, else chunked), "chunked" or "liger"."""

    def __init__(self, model: Any, kernel: str = "auto", chunk_tokens: int = CHUNK_TOKENS) -> None:
        super().__init__()
        self.model = model
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        prefix = getattr(inner, "base_model_prefix", "")
        backbone = getattr(inner, prefix, None) if prefix else None
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        scaled = any(
            getattr(inner.config, name, None) not in (None, 1, 1.0) for name in SCALED_LOGITS_ATTRIBUTES
        )
        plain_head = isinstance(head, torch.nn.Linear)
        # Kept out of the module tree (the model already holds them): plain references.
        self._parts: dict[str, Any] = {
            "backbone": backbone if backbone is not None and backbone is not inner and plain_head and not scaled else None,
            "head": head,
        }  # fmt: skip
        self.chunk_tokens = chunk_tokens
        self.takes_positions = (
            "position_ids" in inspect.signature((self._parts["backbone"] or inner).forward).parameters
        )
        self.keeps_logits = "logits_to_keep" in inspect.signature(inner.forward).parameters
        self.liger: Any = None
        if kernel == "liger" or (kernel == "auto" and self._device_type() == "cuda"):
            self.liger = _liger_loss()
            if kernel == "liger" and self.liger is None:
                raise RuntimeError("loss kernel 'liger' asked for, but liger-kernel is not installed")

    def _device_type(self) -> str:
        parameter = next(self.model.parameters(), None)
        return parameter.device.type if parameter is not None else "cpu"

    @property
    def fused(self) -> bool:
        """Whether the vocabulary projection is chunked or fused (False: the model's own head)."""
        return self._parts["backbone"] is not None

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        trained_positions: torch.Tensor,
        targets: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inputs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        backbone = self._parts["backbone"]
        if backbone is not None:
            hidden = backbone(**inputs)[0]
            picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, trained_positions)
            head = self._parts["head"]
            if self.liger is not None and picked.is_cuda:
                return self._liger(picked, head.weight, head.bias, targets)
            return linear_cross_entropy(picked, head.weight, head.bias, targets, self.chunk_tokens)
        # The model's own head (scaled or soft-capped logits), on the columns holding a trained position.
        width = input_ids.shape[1]
        columns = torch.unique(trained_positions % width)
        if not self.keeps_logits:
            columns = torch.arange(width, device=input_ids.device)
        keep = {"logits_to_keep": columns} if self.keeps_logits and columns.numel() else {}
        output = self.model(**inputs, **keep)
        logits = output.logits
        if columns.numel():
            # Map each trained position to its row and its place among the kept columns.
            place = torch.searchsorted(columns, trained_positions % width)
            rows = torch.div(trained_positions, width, rounding_mode="floor")
            picked_logits = logits[rows, place].float()
        else:
            picked_logits = logits.reshape(-1, logits.shape[-1])[:0].float()
        loss = F.cross_entropy(picked_logits, targets, reduction="sum") + logits.sum() * 0.0
        correct = (picked_logits.detach().argmax(dim=-1) == targets).sum()
        return loss, correct

    def _liger(
        self, picked: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else picked.dtype
        with torch.autocast("cuda", enabled=False):
            result = self.liger(
                weight.to(dtype), picked.to(dtype), targets, None if bias is None else bias.to(dtype)
            )
        loss = getattr(result, "loss", result)
        accuracy = getattr(result, "token_accuracy", None)
        if accuracy is None:  # an older liger: the right predictions from a projection without gradients
            with torch.no_grad():
                _, correct = linear_cross_entropy(picked.detach(), weight.detach(), None, targets)
        else:
            correct = (accuracy.detach().float() * targets.numel()).round().long()
        return loss.float(), correct

    def batch_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """forward() on a collated batch."""
        return self(
            batch.input_ids, batch.position_ids, batch.attention_mask, batch.trained_positions, batch.targets
        )
