"""
Bits per byte: a tokenizer-independent validation loss.

    bpb = sum of per-token cross-entropy (nats) over targets that are real text
          / (ln 2 * sum of the raw UTF-8 bytes those target tokens decode to)

Special tokens (token_bytes == 0) and ignored targets (< 0) count neither nats nor bytes, so a model is not
rewarded for predicting <|bos|>. Sums are all-reduced across ranks, so every rank returns the same number.
"""
import math

import torch

from picochat.common import all_reduce


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor) -> float:
    """model(x, y, loss_reduction="none") -> per-token CE; batches yields (x, y) or (x, y, state)."""
    device = next(model.parameters()).device if hasattr(model, "parameters") else token_bytes.device
    # fp64 accumulators where supported (MPS has no fp64)
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    total_nats = torch.zeros((), dtype=acc_dtype, device=device)
    total_bytes = torch.zeros((), dtype=acc_dtype, device=device)
    token_bytes = token_bytes.to(device)
    batch_iter = iter(batches)
    for _ in range(steps):
        batch = next(batch_iter)
        x, y = batch[0], batch[1]
        loss = model(x, y, loss_reduction="none").reshape(-1).to(acc_dtype)
        y = y.reshape(-1)
        # compare as int32: MPS lacks an int64 '<' kernel; ignored targets map to 0 bytes
        valid = y.to(torch.int32) >= 0
        nbytes = torch.where(valid, token_bytes[torch.where(valid, y, torch.zeros_like(y))],
                             torch.zeros_like(y, dtype=token_bytes.dtype)).to(acc_dtype)
        counted = nbytes > 0
        total_nats += torch.where(counted, loss, torch.zeros_like(loss)).sum()
        total_bytes += nbytes.sum()
    all_reduce(total_nats)
    all_reduce(total_bytes)
    nats, nbytes = total_nats.item(), total_bytes.item()
    if nbytes == 0:
        return float("inf")
    return nats / (math.log(2) * nbytes)
