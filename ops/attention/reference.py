"""Pure-PyTorch query-sparse causal attention over a seq-first KV cache."""
import math
from typing import Optional

import torch


def query_positions(rows: Optional[torch.Tensor], num_queries: int, seq_len: int, start: torch.Tensor, device,
                    num_tokens: Optional[int] = None):
    """Sequence index and cache slot of each query row: (b [M], slot [M]) as int64. A row
    outside [0, num_tokens) gets b = -1: it belongs to no sequence and sees no key."""
    if rows is None:
        r = torch.arange(num_queries, device=device)
        b = r // seq_len
    else:
        r = rows.long()
        valid = r >= 0 if num_tokens is None else (r >= 0) & (r < num_tokens)
        r = torch.where(valid, r, 0)
        b = torch.where(valid, r // seq_len, -1)
    return b, start.reshape(-1)[0].long() + r % seq_len


def sparse_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: torch.Tensor,
    seq_len: int,
    scale: float,
    rows: Optional[torch.Tensor] = None,
    seq_offsets: Optional[torch.Tensor] = None,
    key_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """See `skipgpt.ops.attention.sparse_attention`. Computes in fp32; queries that see no key
    (rows outside [0, B*L) included) and capacity rows at or past the count come out zero."""
    M, Hq, D = q.shape
    B, S, Hk, _ = k_cache.shape
    group = Hq // Hk
    out = torch.zeros(M, Hq, D, dtype=torch.float32, device=q.device)
    count = M if seq_offsets is None else int(seq_offsets[-1])
    if count == 0:
        return out.to(q.dtype)
    b, slot = query_positions(rows, M, seq_len, start, q.device, num_tokens=B * seq_len)
    keys = torch.arange(S, device=q.device)
    if key_mask is not None:
        padded = torch.zeros(B, S, dtype=torch.bool, device=q.device)
        width = min(S, key_mask.shape[1])
        padded[:, :width] = key_mask[:, :width]
    for seq in range(B):
        sel = torch.nonzero((b == seq) & (torch.arange(M, device=q.device) < count)).flatten()
        if sel.numel() == 0:
            continue
        qs = q[sel].float().transpose(0, 1)  # [Hq, n, D]
        ks = k_cache[seq].float().transpose(0, 1).repeat_interleave(group, 0)  # [Hq, S, D]
        vs = v_cache[seq].float().transpose(0, 1).repeat_interleave(group, 0)
        visible = keys[None, :] <= slot[sel][:, None]  # [n, S]
        if key_mask is not None:
            visible = visible & padded[seq][None, :]
        scores = (qs @ ks.transpose(1, 2)) * scale
        scores = scores.masked_fill(~visible, -math.inf)
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row seeing no key -> zeros
        out[sel] = (probs @ vs).transpose(0, 1)
    return out.to(q.dtype)
