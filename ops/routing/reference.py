"""Pure-PyTorch compaction: the CPU implementation and the reference for the Triton kernel."""
import torch


def compact_reference(execute: torch.Tensor):
    """execute: [R, B, L] bool, one route set per leading index (say attention and MLP).

    Returns, for each route set r, with T = B*L and N_r executing tokens:
      rows        [R, T] int32: rows[r, :N_r] are the flat indices (b*L + l) of executing tokens in
                  ascending order; rows[r, N_r:] = -1.
      slot        [R, T] int32: slot[r, t] = position of token t in rows[r], or -1 if it skips.
      seq_offsets [R, B+1] int32: seq_offsets[r, b] = executing tokens in sequences before b;
                  seq_offsets[r, B] = N_r, the count.
    """
    R, B, L = execute.shape
    T = B * L
    flat = execute.reshape(R, T)
    inclusive = flat.to(torch.int32).cumsum(-1, dtype=torch.int32)
    slot = torch.where(flat, inclusive - 1, -1).to(torch.int32)
    # Skipping tokens scatter into a spill column T that is cut off afterwards: no boolean
    # indexing, so no host sync even in the reference.
    target = torch.where(flat, slot, T).to(torch.int64)
    token = torch.arange(T, dtype=torch.int32, device=execute.device).expand(R, T)
    rows = torch.full((R, T + 1), -1, dtype=torch.int32, device=execute.device)
    rows.scatter_(1, target, token)
    seq_offsets = torch.zeros(R, B + 1, dtype=torch.int32, device=execute.device)
    if T > 0:
        seq_offsets[:, 1:] = inclusive.view(R, B, L)[:, :, -1]
    return rows[:, :T].contiguous(), slot, seq_offsets
