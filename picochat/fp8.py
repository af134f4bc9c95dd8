"""
FP8 training for Linear layers: tensorwise dynamic scaling, e4m3 for the forward
operands, e5m2 for gradients, matmuls through torch._scaled_mm. CUDA SM90+ only; elsewhere `--fp8` is ignored
with a warning (`resolve_fp8`). Conversion happens after init/resume and before compile; for evaluation and
sampling the Float8Linear modules are swapped back to plain Linear shells sharing the same weights
(`disable_fp8`).

Example (on an H100):
    from picochat.fp8 import resolve_fp8, convert_to_float8_training, disable_fp8
    if resolve_fp8(args.fp8, device):
        convert_to_float8_training(model)
    with disable_fp8(model):
        evaluate(model)
"""
import contextlib

import torch
import torch.nn as nn

from picochat.common import warn0
from picochat.gpt import Linear  # our dtype-casting Linear (bias-free)

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
E4M3_MAX = torch.finfo(E4M3).max   # 448
E5M2_MAX = torch.finfo(E5M2).max   # 57344
AMAX_EPS = 1e-12

# -----------------------------------------------------------------------------
# Capability

def fp8_supported(device) -> bool:
    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= (9, 0) and hasattr(torch, "_scaled_mm"))

def resolve_fp8(requested: bool, device) -> bool:
    """Decide whether fp8 runs: only when requested AND on CUDA SM90+. Otherwise warn that it is ignored."""
    if not requested:
        return False
    if fp8_supported(device):
        return True
    warn0(f"--fp8 ignored: fp8 training needs a CUDA GPU with compute capability >= 9.0 (Hopper); "
          f"running on {torch.device(device)} in the normal compute dtype instead")
    return False

# -----------------------------------------------------------------------------
# Tensorwise quantization (pure tensor math: runs and is tested on CPU)

def tensorwise_scale(x: torch.Tensor, fp8_max: float) -> torch.Tensor:
    """scale = fp8_max / max|x|, computed in fp64 with amax clamped at 1e-12, returned as fp32 (0-dim)."""
    amax = x.detach().abs().max().double().clamp(min=AMAX_EPS)
    return (fp8_max / amax).float()

def quantize(x: torch.Tensor, fp8_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_fp8, inverse_scale): x ~= x_fp8.float() * inverse_scale."""
    fp8_max = torch.finfo(fp8_dtype).max
    scale = tensorwise_scale(x, fp8_max)
    x_fp8 = (x.float() * scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)
    return x_fp8, scale.reciprocal()

def dequantize(x_fp8: torch.Tensor, inv_scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (x_fp8.float() * inv_scale).to(dtype)

# -----------------------------------------------------------------------------
# The fp8 matmul (CUDA only: torch._scaled_mm)

def _col_major(t):
    return t.t().contiguous().t()

@torch._dynamo.allow_in_graph
class _Float8Matmul(torch.autograd.Function):
    """y = x @ w.T with x, w quantized to e4m3; backward with grad_out in e5m2."""

    @staticmethod
    def forward(ctx, x2d, weight):
        x_fp8, x_inv = quantize(x2d, E4M3)
        w_fp8, w_inv = quantize(weight, E4M3)
        # _scaled_mm wants A row-major and B column-major: w_fp8.t() is a column-major view of (in, out)
        y = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=x2d.dtype,
                             use_fast_accum=True)
        ctx.save_for_backward(x_fp8, x_inv, w_fp8, w_inv)
        ctx.w_dtype = weight.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x_fp8, x_inv, w_fp8, w_inv = ctx.saved_tensors
        go_fp8, go_inv = quantize(grad_out, E5M2)
        # grad_in (M, in) = go (M, out) @ w (out, in)
        grad_in = torch._scaled_mm(go_fp8, _col_major(w_fp8), scale_a=go_inv, scale_b=w_inv,
                                   out_dtype=grad_out.dtype, use_fast_accum=False)
        # grad_w (out, in) = go.T (out, M) @ x (M, in)
        grad_w = torch._scaled_mm(go_fp8.t().contiguous(), _col_major(x_fp8), scale_a=go_inv, scale_b=x_inv,
                                  out_dtype=torch.float32, use_fast_accum=False)
        return grad_in, grad_w.to(ctx.w_dtype)

class Float8Linear(nn.Linear):
    """Drop-in for a bias-free Linear: the fp32 master weight is quantized each call (tensorwise, dynamic)."""

    def forward(self, x):
        shape = x.shape
        y = _Float8Matmul.apply(x.reshape(-1, shape[-1]), self.weight)
        y = y.view(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Float8Linear":
        with torch.device("meta"):
            new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None)
        new.weight = lin.weight  # shared, not copied
        if lin.bias is not None:
            new.bias = lin.bias
        return new

def fp8_eligible(lin: nn.Module) -> bool:
    """Only matmuls big enough to gain: both dims divisible by 16 and min(in, out) >= 128: smaller
    fp8 matmuls cost more in casts and scaling than they save, and the fp8 kernels need multiples of 16."""
    return (isinstance(lin, nn.Linear) and not isinstance(lin, Float8Linear)
            and lin.in_features % 16 == 0 and lin.out_features % 16 == 0
            and min(lin.in_features, lin.out_features) >= 128)

def _swap(model: nn.Module, pred, make) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace children matching pred with make(child); returns (parent, name, old) for restoring."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if pred(child):
                setattr(parent, name, make(child))
                swapped.append((parent, name, child))
    return swapped

def convert_to_float8_training(model: nn.Module, module_filter_fn=None) -> int:
    """Swap every eligible Linear (q, k, v, o, c_fc, mlp c_proj, lm_head at real sizes; never the VE or smear
    gates) for a Float8Linear sharing its weight. Returns how many were converted."""
    filt = module_filter_fn or (lambda m: True)
    swapped = _swap(model, lambda m: fp8_eligible(m) and filt(m), Float8Linear.from_linear)
    return len(swapped)

@contextlib.contextmanager
def disable_fp8(model: nn.Module):
    """Temporarily swap Float8Linear modules for plain Linear shells built on meta and sharing the weights
    (no VRAM spike), e.g. for val bpb, CORE and sampling. Restored on exit."""

    def make(m):
        with torch.device("meta"):
            lin = Linear(m.in_features, m.out_features)
        lin.weight = m.weight
        return lin
    swapped = _swap(model, lambda m: isinstance(m, Float8Linear) and m.bias is None, make)
    try:
        yield model
    finally:
        for parent, name, old in swapped:
            setattr(parent, name, old)
