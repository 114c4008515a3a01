"""Attention statistics computed without materialising a model's full attention everywhere."""

from __future__ import annotations

import torch
from torch import Tensor


def received_attention(q: Tensor, k: Tensor, scale: float, chunk: int = 8) -> Tensor:
    """Mean attention each key receives, over heads and queries (non-causal).

    q, k: (batch, heads, tokens, head_dim). Returns (batch, tokens) in float32. Processed in
    chunks of the batch so the (heads, tokens, tokens) probabilities of only a few rows live at once.
    """
    out = []
    for b in range(0, q.shape[0], chunk):
        logits = torch.matmul(q[b : b + chunk].float(), k[b : b + chunk].float().transpose(-1, -2)) * scale
        out.append(torch.softmax(logits, dim=-1).mean(dim=(1, 2)))
    return torch.cat(out)


def last_query_attention(q_last: Tensor, k: Tensor, scale: float) -> Tensor:
    """Head-averaged attention row of one query over all keys.

    q_last: (heads, head_dim); k: (heads, tokens, head_dim) with KV heads already repeated.
    Returns (tokens,) float32. A causal model's last token sees every key, so no mask is needed.
    """
    logits = torch.einsum("hd,htd->ht", q_last.float(), k.float()) * scale
    return torch.softmax(logits, dim=-1).mean(dim=0)
