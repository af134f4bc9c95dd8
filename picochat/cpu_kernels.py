"""
CPU kernels for training in eager mode (on CUDA torch.compile fuses the plain ops instead). Each is the same math
as the plain torch expression it replaces (tests/test_gpt.py compares them, gradients included), written so that
the backward makes fewer full passes over memory, which is what a 2-core CPU step is bound by.

  rms_norm(x)            parameter-free RMSNorm with a 3-pass backward
  relu_squared(x)        relu(x)^2 saving only relu(x)
  chunked_softcap_ce     lm_head + softcap + cross-entropy a block of rows at a time: the (N, V) logits never exist
"""
import torch


class _RMSNormCPU(torch.autograd.Function):
    """Parameter-free RMSNorm with a hand-written backward in 3 passes. On CPU torch's rms_norm backward is
    composite (~8 elementwise passes plus temporaries): measured ~4x slower, ~10% of a d6 training step."""

    @staticmethod
    def forward(ctx, x):
        C = x.size(-1)
        eps = torch.finfo(x.dtype).eps  # F.rms_norm's default
        sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(sq.square_().div_(C).add_(eps)).to(x.dtype)
        y = x * rstd
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, g):
        y, rstd = ctx.saved_tensors
        # dx = rstd * (g - y * mean(g * y))
        m = torch.linalg.vecdot(g, y, dim=-1).unsqueeze(-1).div_(y.size(-1))
        return torch.addcmul(g, y, m, value=-1.0).mul_(rstd)


def rms_norm(x):
    return _RMSNormCPU.apply(x)


class _ReluSquared(torch.autograd.Function):
    """relu(x)^2 saving only relu(x); backward 2*relu(x)*g. Autograd's composite (clamp_min, pow, pow backward,
    threshold_backward) makes ~3 more full passes over the 4C-wide activations: ~1 s of a d6 CPU step."""

    @staticmethod
    def forward(ctx, x):
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        return torch.mul(r, g).mul_(2)


def relu_squared(x):
    return _ReluSquared.apply(x)


class _ChunkedSoftcapCE(torch.autograd.Function):
    """loss = CE(softcap(x @ W^T)[:, :V], targets), computed a block of rows at a time, with the gradients
    computed in the same pass (the backward only rescales). The (N, V) logits never exist in full: on a 2-core
    CPU that tensor (2 GB at B*T=16k, V=32k) and its elementwise passes cost ~20% of a d6 step.
    Gradients only for reduction mean/sum (each row's gradient does not depend on the upstream gradient then);
    reduction "none" is forward-only (evaluation). `need_grad` is passed in because Function.forward always
    runs with grad mode off."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, softcap, reduction, chunk, need_grad):
        N, V = x.size(0), vocab_size
        w = weight.to(dtype=x.dtype)
        wt = w.t()
        assert not (need_grad and reduction == "none"), "the fused loss has no gradient for reduction='none'"
        gx = torch.empty_like(x) if need_grad else None
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 math (fp64 in the fp64 tests)
        gw = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_grad else None
        valid = (targets != -1)
        n_valid = valid.sum()
        row_loss = torch.empty(N, dtype=acc, device=x.device)
        chunk = min(chunk, N)
        # preallocated block buffers: a fresh large allocation per op would page-fault on every block on CPU
        mm_buf = torch.empty(chunk, weight.size(0), dtype=x.dtype, device=x.device)
        z_buf = torch.empty(chunk, V, dtype=acc, device=x.device)
        e_buf = torch.empty(chunk, V, dtype=acc, device=x.device)
        # a block's weight gradient in a low-precision run: no CPU GEMM takes bf16 inputs into an fp32 output, and
        # casting the block's inputs up would run this third of the lm_head's FLOPs in fp32 (a quarter of a d4
        # step's matmul FLOPs, 3-4x slower on a CPU with native bf16) after a strided cast of the (V, n) gradient.
        # So the block product runs in x's dtype (fp32 accumulation inside the GEMM, one rounding per block, as
        # every other Linear's weight gradient) and the blocks are summed in fp32.
        # Mixed-dtype ops (a bf16 input into an fp32 output, or the reverse) take torch's scalar casting loop on CPU:
        # tanh 1.5x, addcmul 6x, add_ 4x slower than a cast into a preallocated buffer followed by the fp32 op
        # (measured on 2 cores, dev/LOG.md). So every cast below is an explicit copy_ into a buffer of its own.
        gw_block = gw_wide = None
        if need_grad and x.dtype != acc:
            gw_block = torch.empty(weight.shape, dtype=x.dtype, device=x.device)
            gw_wide = torch.empty(weight.shape, dtype=acc, device=x.device)
        # the logit gradient in the GEMMs' dtype, padded to the weight's rows (the pad columns stay zero)
        g_buf = None
        if need_grad and (x.dtype != acc or V != weight.size(0)):
            g_buf = torch.empty(chunk, weight.size(0), dtype=x.dtype, device=x.device)
            g_buf[:, V:].zero_()  # only the pad columns need zeros: the rest is overwritten block by block
        xs = x * (1.0 / softcap)  # fold the softcap's 1/15 into the (small) input instead of the logits
        for s in range(0, N, chunk):
            n = min(chunk, N - s)
            xc, tc, vc = xs[s:s + n], targets[s:s + n], valid[s:s + n]
            torch.mm(xc, wt, out=mm_buf[:n])
            z = z_buf[:n]
            if mm_buf.dtype == acc:                # z = tanh(l/15), fp32 even when x is bf16
                torch.tanh(mm_buf[:n, :V], out=z)
            else:
                z.copy_(mm_buf[:n, :V]).tanh_()
            z.mul_(softcap)                        # z = softcapped logits, |z| <= 15
            tsafe = tc.clamp(min=0).unsqueeze(1)
            e = torch.exp(z, out=e_buf[:n])        # no max-subtraction needed: |z| <= 15 cannot overflow
            sumexp = e.sum(dim=1)
            row_loss[s:s + n] = torch.log(sumexp) - z.gather(1, tsafe).squeeze(1)
            if need_grad:
                # d loss_row / d l = (softmax - onehot) * (1 - tanh^2); ignored rows get 0
                e.mul_((vc / sumexp).unsqueeze(1))                     # softmax (masked rows -> 0)
                e.scatter_add_(1, tsafe, -vc.to(e.dtype).unsqueeze(1))  # - onehot
                z.mul_(z)                                               # z^2 = 225 tanh^2
                torch.addcmul(e, e, z, value=-1.0 / softcap ** 2, out=e)
                g = e
                if g_buf is not None:
                    g = g_buf[:n]
                    g[:, :V].copy_(e)
                torch.mm(g, w, out=gx[s:s + n])
                if gw_block is None:
                    gw.addmm_(g.t(), x[s:s + n])
                else:
                    torch.mm(g.t(), x[s:s + n], out=gw_block)
                    gw.add_(gw_wide.copy_(gw_block))
        row_loss.mul_(valid)  # ignored positions contribute 0 (as F.cross_entropy)
        if reduction == "none":
            return row_loss
        total = row_loss.sum()
        scale = (1.0 / n_valid.clamp(min=1).to(acc)) if reduction == "mean" else torch.ones((), dtype=acc, device=x.device)
        if reduction == "mean":
            # all-ignored batches give NaN, like F.cross_entropy (0/0: callers must guard)
            loss = torch.where(n_valid > 0, total * scale, torch.full_like(total, float("nan")))
        else:
            loss = total
        if need_grad:
            ctx.save_for_backward(gx, gw, scale)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        gx, gw, scale = ctx.saved_tensors
        s = grad_loss * scale
        return (gx * s.to(gx.dtype), (gw * s).to(gw.dtype), None, None, None, None, None, None)


def chunked_softcap_ce(x, weight, targets, vocab_size, softcap, reduction="mean", chunk=1024):
    """CE(softcap * tanh(x @ weight^T / softcap)[:, :vocab_size], targets), ignore_index -1. x (N, C), targets (N,).
    Gradients for reduction mean/sum; "none" is forward-only (evaluation)."""
    return _ChunkedSoftcapCE.apply(x, weight, targets, vocab_size, softcap, reduction, chunk, torch.is_grad_enabled())
