"""A quantized model against its original, token by token, on one evaluation set (as llama.cpp's
``llama-perplexity --kl-divergence`` does): for next-token distributions ``p`` (original) and ``q``
(quantized) at every position but the last,

* perplexity of each: ``exp(mean_t -log p_t(y_t))`` (``y_t`` the actual next token);
* ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` per token: its mean, median and 99th percentile;
* top-1 agreement: the share of tokens where ``argmax p == argmax q``;
* RMS change of the correct token's probability: ``sqrt(mean_t (q_t(y_t) - p_t(y_t))^2)``;
* the share of max calibration's perplexity increase a recipe removed:
  ``(ppl_max - ppl_quant) / (ppl_max - ppl_orig)`` (where the run measured the max-calibrated model);
* against max, token by token (where the run kept max's losses on the same tokens): ``d_t = nll_quant,t -
  nll_max,t``, its mean (``log ppl_quant - log ppl_max``) and standard error ``std(d) / sqrt(n)``, so that
  "worse than max" can say how far outside the set's sampling noise it is (tokens of one row are not
  independent: a rough scale, not a test); the share removed then carries ``ppl_quant se / (ppl_max -
  ppl_orig)`` as its standard error (first order in the mean difference).

Logits are compared in fp32; a batch's two logit tensors are used once and dropped (no copy is kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..model.quantizers import set_mode

CHUNK = 64  # positions compared at once: 64 x a 50k vocabulary x fp32 = 13 MB a temporary


@dataclass
class Comparison:
    """Running sums over the batches of one set."""

    nll_original: float = 0.0
    nll_quantized: float = 0.0
    tokens: int = 0
    agree: int = 0
    dp_sq: float = 0.0
    kl: list[torch.Tensor] = field(default_factory=list)  # per token, fp32 on the CPU (small: rows x seq_len)
    nll: list[torch.Tensor] = field(default_factory=list)  # the quantized side's -log q_t(y_t), likewise

    @torch.no_grad()
    def add(self, original: torch.Tensor, quantized: torch.Tensor, ids: torch.Tensor) -> None:
        """Logits [b, t, vocab] of both models on ``ids`` [b, t], compared ``CHUNK`` positions at a time so that
        a large vocabulary's temporaries stay in cache (the same per-position values as one pass)."""
        v = original.shape[-1]
        o, q = original[:, :-1].reshape(-1, v), quantized[:, :-1].reshape(-1, v)
        y = ids[:, 1:].reshape(-1).to(o.device)
        kl, nll = [], []
        for i in range(0, y.numel(), CHUNK):
            k, n = self._add_positions(o[i : i + CHUNK], q[i : i + CHUNK], y[i : i + CHUNK])
            kl.append(k), nll.append(n)
        self.kl.append(torch.cat(kl).cpu())
        self.nll.append(torch.cat(nll).cpu())

    def _add_positions(self, o: torch.Tensor, q: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [n, vocab] of both models at n positions with next tokens ``y`` [n]; returns KL per position and
        the quantized side's loss per position."""
        lp = torch.log_softmax(o.float(), -1)
        lq = torch.log_softmax(q.float(), -1)
        tp, tq = lp.gather(-1, y[:, None]).squeeze(-1), lq.gather(-1, y[:, None]).squeeze(-1)
        self.nll_original -= float(tp.double().sum())
        self.nll_quantized -= float(tq.double().sum())
        self.tokens += y.numel()
        self.agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        self.dp_sq += float((tq.exp() - tp.exp()).double().pow(2).sum())
        nll = tq.neg()
        d = lq.neg_().add_(lp)  # log p - log q, in lq's storage
        return d.mul_(lp.exp_()).sum(-1).clamp_min(0.0), nll

    def result(self, max_calibrated: float | None = None, max_nll: torch.Tensor | None = None) -> dict:
        """The set's figures; ``max_calibrated``: max's perplexity on the set, ``max_nll``: its per-token losses
        on the same tokens in the same order (``vs_max``; ignored when the counts differ)."""
        if not self.tokens:
            return {}
        kl = torch.cat(self.kl).double()
        out = {
            "tokens": self.tokens,
            "perplexity": {
                "original": math.exp(self.nll_original / self.tokens),
                "quantized": math.exp(self.nll_quantized / self.tokens),
            },  # fmt: skip
            "kl_mean": float(kl.mean()),
            "kl_median": float(kl.median()),
            "kl_p99": float(torch.quantile(kl, 0.99)),
            "top1_agreement": self.agree / self.tokens,
            "rms_delta_p": math.sqrt(self.dp_sq / self.tokens),
        }
        ppl, rise = out["perplexity"], 0.0
        if max_calibrated is not None:
            ppl["max_calibrated"] = max_calibrated
            rise = max_calibrated - ppl["original"]
            out["share_of_max_increase_removed"] = (max_calibrated - ppl["quantized"]) / rise if rise > 0 else None
        if max_nll is not None and max_nll.numel() == self.tokens:
            out["vs_max"] = vs = paired(self.token_nll(), max_nll)
            if rise > 0:  # ppl_quant = ppl_max exp(d): the share's standard error to first order in d
                out["share_removed_standard_error"] = ppl["quantized"] * vs["standard_error"] / rise
        return out

    def token_nll(self) -> torch.Tensor:
        """The quantized side's ``-log q_t(y_t)`` of every token compared, in order."""
        return torch.cat(self.nll) if self.nll else torch.zeros(0)


def paired(nll: torch.Tensor, other: torch.Tensor) -> dict:
    """Two models' losses on the same tokens: ``d_t = nll_t - other_t``, its mean (the log of the perplexity
    ratio) and standard error ``std(d) / sqrt(n)`` (nan for one token)."""
    d = nll.double() - other.double()
    se = float(d.std() / math.sqrt(d.numel())) if d.numel() > 1 else float("nan")
    return {"mean_nll_difference": float(d.mean()), "standard_error": se}


@torch.no_grad()
def compare_forwards(batches, device: torch.device, original, quantized) -> Comparison:
    """``original(ids)`` and ``quantized(ids)`` (logits) compared on every batch."""
    comp = Comparison()
    for batch in batches:
        ids = batch["input_ids"].to(device)
        comp.add(original(ids), quantized(ids), ids)
    return comp


def compare(model, batches) -> Comparison:
    """The whole model with its quantizers off (the original) and in quant mode, batch by batch."""

    def in_mode(mode: str):
        def logits(ids):
            set_mode(model, mode)
            return model(input_ids=ids, use_cache=False).logits

        return logits

    try:
        return compare_forwards(batches, next(model.parameters()).device, in_mode("off"), in_mode("quant"))
    finally:
        set_mode(model, "off")


def compare_models(original, quantized, batches) -> Comparison:
    """Two models (an original and a checkpoint read back) on the same batches."""
    return compare_forwards(batches, next(original.parameters()).device,
                            lambda ids: original(input_ids=ids, use_cache=False).logits,
                            lambda ids: quantized(input_ids=ids, use_cache=False).logits)  # fmt: skip
