"""The language-model head applied to hidden states a chunk at a time: token log-probs, entropies and summed
cross-entropy without ever materialising (N, T, V) logits.

Each chunk's float32 vocabulary-sized logits are recomputed in backward (checkpointed) when gradients are on, so
they never pile up; ``Policy.token_logprobs`` and ``Policy.sft_loss`` project through these.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def chunk_ce_sum(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (k, V)
    return torch.nn.functional.cross_entropy(logits, y, reduction="sum")


def chunk_logprobs(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, temperature: float,
                   with_entropy: bool = True):
    """Token log-probs (N, c) of ``targets`` at ``temperature`` and the entropy (N, c) (``None`` unless
    ``with_entropy``: its softmax over the vocabulary is skipped)."""
    logits = head(h).float() / temperature  # (N, c, V)
    logz = torch.logsumexp(logits, dim=-1)  # (N, c)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz  # (N, c)
    if not with_entropy:
        return logp, None
    probs = torch.softmax(logits, dim=-1)  # (N, c, V)
    entropy = logz - (probs * logits).sum(-1)  # (N, c)
    return logp, entropy


def chunked_logprobs(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, temperature: float,
                     chunk_size: int, with_entropy: bool,
                     autocast: contextlib.AbstractContextManager) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (N, C) of ``targets`` (N, C) from the states ``h`` (N, C, H) that predict them, and the
    entropies (N, C) (``None`` unless ``with_entropy``): ``chunk_size`` columns at a time under ``autocast``,
    each chunk checkpointed when gradients are on (``chunk_logprobs``)."""
    logps, ents = [], []
    for start in range(0, h.shape[1], chunk_size):
        hs, ts = h[:, start : start + chunk_size], targets[:, start : start + chunk_size]
        with autocast:
            if torch.is_grad_enabled():
                lp, ent = checkpoint(chunk_logprobs, head, hs, ts, temperature, with_entropy, use_reentrant=False)
            else:
                lp, ent = chunk_logprobs(head, hs, ts, temperature, with_entropy)
        logps.append(lp)
        ents.append(ent)
    return torch.cat(logps, dim=1), (torch.cat(ents, dim=1) if with_entropy else None)


def chunked_ce_sum(head: nn.Module, h: torch.Tensor, y: torch.Tensor, chunk_size: int,
                   autocast: contextlib.AbstractContextManager) -> torch.Tensor:  # () float32
    """Summed cross-entropy of the labels ``y`` (K,) from the states ``h`` (K, H) that predict them:
    ``chunk_size`` positions at a time under ``autocast``, each chunk checkpointed when gradients are on."""
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk_size):
        hs, ys = h[start : start + chunk_size], y[start : start + chunk_size]
        with autocast:
            if torch.is_grad_enabled():
                total = total + checkpoint(chunk_ce_sum, head, hs, ys, use_reentrant=False)
            else:
                total = total + chunk_ce_sum(head, hs, ys)
    return total
