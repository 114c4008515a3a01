"""Attention statistics computed without materialising a model's full attention everywhere."""

from __future__ import annotations

import torch
from torch import Tensor


def received_attention(q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None,
                       segments: Tensor | None = None) -> Tensor:
    """Mean attention each key receives, over heads and queries (non-causal).

    q, k: (batch, heads, tokens, head_dim); ``bias`` (batch, tokens) is added to the logits of each
    key (proportional attention); ``segments`` (batch, tokens) ids restrict attention to queries and
    keys of the same segment (windowed attention), so each key's mean is over all queries of the row
    with zeros from the other windows. Returns (batch, tokens) in float32.

    Why not ``softmax(q k^T).mean()``: on a CPU that writes and reads several full-size float32
    (heads, tokens, tokens) tensors per row and faults in fresh pages for each; here one buffer per
    row is reused, exponentiated in place, and the probabilities are never formed: the column sums
    of softmax are ``(1 / row sums) @ exp(logits - row max)``, one batched vector-matrix product.
    Windows are computed block by block, so a windowed layer costs what its windows cost.
    """
    batch, heads, tokens, _ = q.shape
    out = torch.zeros(batch, tokens, dtype=torch.float32, device=q.device)
    buffer = torch.empty(0, dtype=torch.float32, device=q.device)
    for b in range(batch):
        qb, kb = q[b].float() * scale, k[b].float()
        bb = None if bias is None else bias[b].to(q.device, torch.float32)
        if segments is None:
            blocks = [None]
        else:
            seg = segments[b].to(q.device)
            blocks = [torch.nonzero(seg == s).squeeze(1) for s in torch.unique(seg)]
        for idx in blocks:
            qs, ks = (qb, kb) if idx is None else (qb[:, idx], kb[:, idx])
            n = ks.shape[1]
            if buffer.numel() < heads * n * n:
                buffer = torch.empty(heads * n * n, dtype=torch.float32, device=q.device)
            logits = buffer[: heads * n * n].view(heads, n, n)
            torch.bmm(qs, ks.transpose(-1, -2), out=logits)
            if bb is not None:
                logits.add_(bb if idx is None else bb[idx])
            logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
            inverse_sums = logits.sum(dim=-1).reciprocal_()
            received = torch.bmm(inverse_sums[:, None, :], logits).sum(dim=(0, 1))
            if idx is None:
                out[b] = received
            else:
                out[b, idx] = received
    return out / (heads * tokens)


def last_query_attention(q_last: Tensor, k: Tensor, scale: float) -> Tensor:
    """Head-averaged attention row of one query over all keys.

    q_last: (heads, head_dim); k: (heads, tokens, head_dim) with KV heads already repeated.
    Returns (tokens,) float32. A causal model's last token sees every key, so no mask is needed.
    """
    logits = torch.einsum("hd,htd->ht", q_last.float(), k.float()) * scale
    return torch.softmax(logits, dim=-1).mean(dim=0)


def mean_query_saliency(q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    """Per-frame saliency from one pooled query: softmax over keys of mean(q) . k, averaged over heads.

    The CLS-free stand-in for an attention-pooling probe that FastVID's Qwen2.5-VL port uses:
    cheap (one query per frame) and computable beside fused attention. q, k: (batch, heads,
    tokens, head_dim); ``bias`` (batch, tokens) is added to the logits. Returns (batch, tokens) float32.
    """
    logits = torch.einsum("bhd,bhtd->bht", q.float().mean(dim=2), k.float()) * scale
    if bias is not None:
        logits = logits + bias[:, None, :].float()
    return torch.softmax(logits, dim=-1).mean(dim=1)


def head_mean(x: Tensor) -> Tensor:
    """(batch, heads, tokens, head_dim) -> (batch, tokens, head_dim): ToMe's and VisionZip's key metric."""
    return x.mean(dim=1)


def text_query_attention(q: Tensor, k: Tensor, query_positions: Tensor, scale: float) -> Tensor:
    """Attention from a set of queries to all keys under a causal mask, max over heads and queries.

    q: (heads, Q, head_dim) at sequence positions ``query_positions`` (Q,); k: (heads, L, head_dim)
    with KV heads repeated. Key j is visible to a query at position p when j <= p. Returns (L,)
    float32 (PruneVid's inner-stage score: the strongest any post-video text token pays a key).
    """
    logits = torch.einsum("hqd,hld->hql", q.float(), k.float()) * scale
    keys = torch.arange(k.shape[1], device=k.device)
    visible = keys[None, :] <= query_positions.to(k.device)[:, None]
    logits = logits.masked_fill(~visible[None], float("-inf"))
    return torch.softmax(logits, dim=-1).amax(dim=(0, 1))
