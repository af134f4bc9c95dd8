"""
MuonAdamW: one optimizer for the whole GPT, for 1 process and for W processes.

* AdamW (embeddings, lm_head, value embeddings, scalars): decoupled weight decay, bias correction on both
  moments (step lr/(1-b1^t), denominator sqrt(v)/sqrt(1-b2^t) + eps), math in fp32 even for bf16
  params (the fp32 result is rounded back into the bf16 param; the moments stay fp32).
* Muon (every matrix inside the transformer blocks; one group per distinct shape): Nesterov momentum,
  optional bf16 cast, MuonEq row equilibration, Polar Express orthogonalisation (the 5 published
  coefficient triples), Muon+ renormalisation, NorMuon variance reduction, cautious weight decay,
  lr * sqrt(max(1, rows/cols)).

Distribution (ZeRO-2 style) is automatic when torch.distributed is initialised, and the SAME code runs with
world size 1 (a separate single-process copy would drift apart from the distributed one); there is no DDP
wrapper, the grads handed to step() are each rank's LOCAL grads and the optimizer averages them:
  phase 1  launch every async reduction: AdamW params with < 1024 elements, or whose dim 0 is not a
           multiple of W, are all-reduced (AVG) and updated redundantly on every rank; larger AdamW params
           are reduce-scattered along dim 0 (each rank updates rows [r*N/W, (r+1)*N/W) and keeps state for
           them only); each Muon group stacks its K grads into (K, rows, cols), zero-pads K to a multiple of
           W and reduce-scatters, so each rank owns ceil(K/W) consecutive matrices and their state.
  phase 2  per group: wait for its reduction, update the owned slice/chunk, launch the all-gather.
  phase 3  wait for the gathers and copy the Muon results back into the parameters.
No gradient clipping: the grads handed in are each rank's local ones, and clipping them before the
average would clip by the wrong norm.
Optimizer state is sharded, so resuming needs the same world size (each rank's file holds the state of the
rows it owns); shard_state_dict() / load_shard_state_dict() give one flat dict of tensors per rank
(safetensors-able, no pickles).

Muon bf16 cast: the reference casts the momentum-smoothed grad to bf16 before MuonEq/Polar Express only
when the run's compute dtype is bf16. Master weights (and therefore grads) are fp32 in a bf16 run, so the
dtype cannot be read off the params: pass `MuonAdamW(groups, compute_dtype=torch.bfloat16)` (GPT.setup_optimizer
passes the model's compute dtype). With compute_dtype=None the cast happens only if a Muon param is itself bf16.

Hyperparameters (lr, betas, eps, weight_decay, momentum, beta2) are read from the group dicts at every
step, so schedules just assign group["lr"] etc. They are configuration, not state: shard_state_dict() does
not save them. The fused updates are torch.compile'd on CUDA (hyperparameters passed as 0-D CPU tensors so
schedule changes do not recompile; compile_updates=True does the same on CPU, which the tests use); on CPU they
run eagerly by default so the first step is instant, and fp32 AdamW params use torch's fused CPU AdamW kernel
(same formula, one pass, ~20x faster than eager ops).
Missing grads (p.grad None) count as zero so every rank runs the same collectives.

Collectives: ReduceOp.AVG all-reduce / reduce-scatter and all_gather_into_tensor, native in NCCL and in gloo
(so CPU multi-process runs take the same path). The Muon all-gather writes into the stacked-grad buffer, and the
AdamW all-gather is in place (the input is this rank's slice of the param), as the reference does with NCCL.

Example:
    groups = [dict(kind="adamw", params=[emb], lr=0.2, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.0),
              dict(kind="muon", params=[w1, w2], lr=0.02, momentum=0.95, beta2=0.9, ns_steps=5, weight_decay=0.0)]
    opt = MuonAdamW(groups)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    safetensors.torch.save_file(opt.shard_state_dict(), f"optim_{step:06d}_rank{rank}.safetensors")
"""
import math

import torch
import torch.distributed as dist

# Polar Express coefficients (num_iters 5, safety factor 2e-2, cushion 2), as published. Composed as the
# scalar polynomial p(s) = a s + b s^3 + c s^5, they map every s in [1e-3, 1] into [0.859, 1.141].
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
SMALL_PARAM_NUMEL = 1024  # AdamW params below this are all-reduced instead of reduce-scattered

_REQUIRED_KEYS = {
    "adamw": ("params", "lr", "betas", "eps", "weight_decay"),
    "muon": ("params", "lr", "momentum", "beta2", "ns_steps", "weight_decay"),
}

# -----------------------------------------------------------------------------
# The math. Plain functions of tensors so they can be torch.compile'd on CUDA; hyperparameters arrive as
# Python floats (eager) or 0-D CPU tensors (compiled), and the same body works for both.

def _addmm(inp, m1, m2, beta, alpha):
    """beta*inp + alpha*(m1 @ m2) in one fused call, for single (2-D) or stacked (3-D) matrices."""
    return (torch.addmm if inp.dim() == 2 else torch.baddbmm)(inp, m1, m2, beta=beta, alpha=alpha)

def polar_express(X, ns_steps: int):
    """Approximate the orthogonal polar factor U V^T of each matrix in X ((rows, cols) or (K, rows, cols)),
    in X's dtype: X / (1.01 ||X||_F), then X <- a X + X (b A + c A^2) with A the small Gram matrix."""
    X = X / (torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    if X.size(-2) > X.size(-1):  # tall: work with the small cols x cols Gram matrix
        for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
            A = X.mT @ X
            B = _addmm(A, A, A, beta=b, alpha=c)
            X = _addmm(X, X, B, beta=a, alpha=1.0)
    else:
        for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
            A = X @ X.mT
            B = _addmm(A, A, A, beta=b, alpha=c)
            X = _addmm(X, B, X, beta=a, alpha=1.0)
    return X

def adamw_update(p, g, exp_avg, exp_avg_sq, lr, wd, beta1, beta2, eps, step_size, bias2_sqrt):
    """One AdamW step on p (any float dtype) with fp32-or-wider math; exp_avg/exp_avg_sq are in that
    wider dtype. step_size = lr / (1 - beta1^t) and bias2_sqrt = sqrt(1 - beta2^t) are precomputed."""
    work = p if p.dtype in (torch.float32, torch.float64) else p.float()
    g = g.to(work.dtype)
    work.mul_(1 - lr * wd)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.lerp_(g.square(), 1 - beta2)
    denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps)
    work.sub_((exp_avg / denom) * step_size)
    if work is not p:
        p.copy_(work)

def _cpu_fused_adamw_ok(p, g):
    # torch's fused CPU AdamW kernel: one vectorised pass instead of ~10 eager ones (~20x faster on CPU), and
    # the same formula (decoupled WD, step lr/(1-b1^t), denom sqrt(v)/sqrt(1-b2^t) + eps). It wants param, grad
    # and state in one dtype; a low-precision param (bf16 embeddings) runs it on an fp32 copy (fused_adamw_wide).
    return (p.device.type == "cpu" and hasattr(torch, "_fused_adamw_") and p.is_contiguous() and g.is_contiguous())

def fused_adamw_wide(p, g, exp_avg, exp_avg_sq, step, lr, beta1, beta2, weight_decay, eps, scratch=None):
    """torch's fused AdamW on p with the math in the state's (fp32-or-wider) dtype: a bf16 param and grad are
    widened into scratch buffers, updated in one fused pass and rounded back, which is adamw_update's math in 4
    passes instead of ~13 eager ones (the eager path cost a bf16 d4 step ~0.3 s on 2 cores, 10x the fused one).
    `scratch` (a dict) keeps the two buffers between calls: a fresh 30 MB allocation page-faults on every step
    on CPU, which made the widening cost 2.6x as much."""
    wide = exp_avg.dtype
    work, gw = p, g
    if p.dtype != wide or g.dtype != wide:
        scratch = {} if scratch is None else scratch
        key = (tuple(p.shape), wide, p.device)
        if key not in scratch:  # one pair per shape: a GPT's bf16 tables come in one or two shapes
            scratch[key] = (torch.empty(p.shape, dtype=wide, device=p.device),
                            torch.empty(p.shape, dtype=wide, device=p.device))
        work, gw = scratch[key]
        work.copy_(p)
        gw.copy_(g)
    torch._fused_adamw_([work], [gw], [exp_avg], [exp_avg_sq], [], [torch.tensor(float(step))], lr=lr,
                        beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
    if work is not p:
        p.copy_(work)

def muon_update(g, p, momentum_buffer, second_momentum_buffer, momentum, lr, wd, beta2,
                ns_steps: int, cast_bf16: bool):
    """One Muon step on a stack p (K, rows, cols) with averaged grads g (same shape; overwritten).
    lr is the effective lr (shape factor already applied)."""
    rows, cols = p.size(-2), p.size(-1)
    # 1. Nesterov momentum: buf <- mu buf + (1-mu) g ; g <- (1-mu) g + mu buf
    momentum_buffer.lerp_(g, 1 - momentum)
    g = g.lerp_(momentum_buffer, momentum)
    # 2. low-precision orthogonalisation only when the run computes in bf16
    X = g.bfloat16() if cast_bf16 else g
    # 3. MuonEq: rescale every row to the RMS row norm ||X||_F / sqrt(rows)
    row_norm = torch.linalg.vector_norm(X, dim=-1, keepdim=True).clamp_min(1e-6)
    target = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) / math.sqrt(rows)
    X = X * (target / row_norm)
    # 4. Polar Express, result back in the param dtype
    g = polar_express(X, ns_steps).to(p.dtype)
    # 5. Muon+: ||g||_F = sqrt(min(rows, cols)) (the clamp keeps all-zero padding matrices at zero)
    g = g * (math.sqrt(min(rows, cols)) / torch.linalg.vector_norm(g, dim=(-2, -1), keepdim=True).clamp_min(1e-10))
    # 6. NorMuon: per-row (rows >= cols) or per-column second moment, overall Frobenius norm preserved
    red_dim = -1 if rows >= cols else -2
    red_size = g.size(red_dim)
    gw = g if g.dtype in (torch.float32, torch.float64) else g.float()
    v_mean = gw.square().mean(dim=red_dim, keepdim=True)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    second_momentum_buffer.lerp_(v_mean.to(second_momentum_buffer.dtype), 1 - beta2)
    scale = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * red_size) * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (scale * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)
    # 7. cautious weight decay (only where update and param agree in sign) + update
    mask = (g * p) >= 0
    p.sub_(lr * g + lr * wd * p * mask)

_compiled = {}

def _fused(fn, compiled):
    """fn, torch.compile'd when `compiled` (one compiled graph per function: hyperparameters are 0-D tensors)."""
    if not compiled:
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _compiled[fn]

# -----------------------------------------------------------------------------
# Collectives. NCCL and gloo (torch >= 2.11) both do ReduceOp.AVG, reduce_scatter_tensor and
# all_gather_into_tensor, so each helper is one async native call; _Pending gives the world-size-1 case (no
# process group) the same wait() interface.

class _Pending:
    """An async collective (or nothing to wait for)."""
    def __init__(self, work=None):
        self.work = work
    def wait(self):
        if self.work is not None:
            self.work.wait()
        self.work = None

def all_reduce_avg(t, world):
    """In-place mean of t over ranks."""
    if world == 1:
        return _Pending()
    return _Pending(dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=True))

def reduce_scatter_avg(out, inp, world, rank):
    """out = (mean of inp over ranks)[rank-th chunk along dim 0]."""
    if world == 1:
        if out.data_ptr() != inp.data_ptr():
            out.copy_(inp)
        return _Pending()
    return _Pending(dist.reduce_scatter_tensor(out, inp, op=dist.ReduceOp.AVG, async_op=True))

def all_gather_dim0(out, inp, world):
    """out = concat over ranks of inp along dim 0 (inp may be this rank's slice of out)."""
    if world == 1:
        if out.data_ptr() != inp.data_ptr():
            out.copy_(inp)
        return _Pending()
    return _Pending(dist.all_gather_into_tensor(out, inp, async_op=True))

def _dist_world_rank():
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0

# -----------------------------------------------------------------------------

class MuonAdamW(torch.optim.Optimizer):
    """AdamW + Muon over explicit param groups (see the module docstring for the group dict format)."""

    def __init__(self, param_groups, compute_dtype=None, compile_updates=None):
        groups = self._validate_groups(param_groups)
        super().__init__(groups, defaults={})
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.compute_dtype = compute_dtype
        self._wide_scratch = {}  # fp32 buffers for AdamW on low-precision params (fused_adamw_wide); not state
        self.compile_updates = compile_updates  # None = on CUDA only (see _compiling)
        self._layout = None  # (world, rank), fixed when the state is created

    @staticmethod
    def _validate_groups(param_groups):
        if isinstance(param_groups, torch.Tensor) or not isinstance(param_groups, (list, tuple)):
            raise TypeError("MuonAdamW expects a list of param-group dicts, e.g. "
                            "[{'kind': 'adamw', 'params': [...], 'lr': ..., ...}]; got " + type(param_groups).__name__)
        out = []
        for i, group in enumerate(param_groups):
            if not isinstance(group, dict):
                raise TypeError(f"param group {i} is a {type(group).__name__}, expected a dict with a 'kind' key")
            kind = group.get("kind")
            if kind not in _REQUIRED_KEYS:
                raise ValueError(f"param group {i} has kind={kind!r}; it must be 'adamw' or 'muon'")
            missing = [k for k in _REQUIRED_KEYS[kind] if k not in group]
            if missing:
                raise ValueError(f"param group {i} (kind {kind!r}) is missing {missing}; "
                                 f"a {kind} group needs {list(_REQUIRED_KEYS[kind])}")
            group = dict(group)
            params = group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            if not params:
                raise ValueError(f"param group {i} (kind {kind!r}) has no params; drop the group instead")
            for p in params:
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"param group {i} holds a {type(p).__name__}, expected torch tensors/Parameters")
                if not p.is_floating_point():
                    raise TypeError(f"param group {i} holds a {p.dtype} tensor; only floating point params can be optimised")
            group["params"] = params
            if kind == "adamw":
                if len(tuple(group["betas"])) != 2:
                    raise ValueError(f"param group {i}: betas must be a pair (beta1, beta2), got {group['betas']!r}")
            else:
                shapes = sorted({tuple(p.shape) for p in params})
                if len(shapes) != 1:
                    raise ValueError(f"muon param group {i} mixes shapes {shapes}; Muon stacks a group into "
                                     f"(K, rows, cols), so make one group per distinct shape")
                if len(shapes[0]) != 2:
                    raise ValueError(f"muon param group {i} has params of shape {shapes[0]}; Muon takes 2-D matrices "
                                     f"only, put other params in an adamw group")
                if len({(p.dtype, p.device) for p in params}) != 1:
                    raise ValueError(f"muon param group {i} mixes dtypes/devices; all its params must match")
                ns = group["ns_steps"]
                if not isinstance(ns, int) or not 1 <= ns <= len(POLAR_EXPRESS_COEFFS):
                    raise ValueError(f"muon param group {i}: ns_steps={ns!r} must be an int in "
                                     f"1..{len(POLAR_EXPRESS_COEFFS)} (one Polar Express coefficient triple per step)")
            out.append(group)
        return out

    # --- state layout -------------------------------------------------------

    def _adamw_sharded(self, p, world):
        """Reduce-scatter (and keep a 1/W state slice) only for big params whose dim 0 splits evenly;
        the rest are all-reduced and updated redundantly on every rank."""
        return world > 1 and p.numel() >= SMALL_PARAM_NUMEL and p.size(0) % world == 0

    def _state_layout(self, world):
        """Per state entry: (the param that owns it, its key prefix in the state file, {name: (shape, dtype)}).
        AdamW: per param, a 1/W slice when sharded; Muon: per group, this rank's chunk of the stacked params."""
        for gi, group in enumerate(self.param_groups):
            if group["kind"] == "adamw":
                for pi, p in enumerate(group["params"]):
                    shape = (p.shape[0] // world, *p.shape[1:]) if self._adamw_sharded(p, world) else tuple(p.shape)
                    dt = torch.promote_types(p.dtype, torch.float32)
                    yield p, f"group{gi}.param{pi}", {"exp_avg": (shape, dt), "exp_avg_sq": (shape, dt)}
            else:
                p0 = group["params"][0]
                rows, cols = p0.shape
                chunk = -(-len(group["params"]) // world)
                dt = torch.promote_types(p0.dtype, torch.float32)
                second = (chunk, rows, 1) if rows >= cols else (chunk, 1, cols)
                yield p0, f"group{gi}", {"momentum_buffer": ((chunk, rows, cols), dt), "second_momentum_buffer": (second, dt)}

    def _expected_state(self):
        """{key: (shape, dtype)} of this rank's state, in a fixed order."""
        spec = {}
        for _, prefix, shapes in self._state_layout(self._layout[0]):
            spec[f"{prefix}.step"] = ((), torch.int64)
            spec.update({f"{prefix}.{name}": v for name, v in shapes.items()})
        return spec

    def _ensure_state(self):
        world, rank = _dist_world_rank()
        if self._layout is not None:
            if self._layout != (world, rank):
                raise RuntimeError(f"MuonAdamW state was created for world size {self._layout[0]} rank {self._layout[1]} "
                                   f"but the process group is now world size {world} rank {rank}")
            return
        self._layout = (world, rank)
        for p, _, shapes in self._state_layout(world):
            self.state[p] = {"step": 0, **{name: torch.zeros(shape, dtype=dt, device=p.device)
                                           for name, (shape, dt) in shapes.items()}}

    # --- the step -----------------------------------------------------------

    @staticmethod
    def _grad(p):
        # A missing grad counts as zero so that every rank always runs the same collectives in the same order.
        return p.grad if p.grad is not None else torch.zeros_like(p)

    def _compiling(self, device) -> bool:
        """Whether the fused updates run compiled: compile_updates, or by default on CUDA only (on CPU the first
        step's compile costs more than it saves)."""
        return device.type == "cuda" if self.compile_updates is None else self.compile_updates

    def _hyper(self, value, device):
        """Python float when eager; 0-D CPU fp32 tensor when compiled (a changed value does not recompile)."""
        return torch.tensor(float(value), dtype=torch.float32) if self._compiling(device) else float(value)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._ensure_state()
        world, rank = self._layout

        # phase 1: launch every reduction
        reductions = []
        for group in self.param_groups:
            if group["kind"] == "adamw":
                items = []
                for p in group["params"]:
                    g = self._grad(p)
                    if self._adamw_sharded(p, world):
                        g_slice = torch.empty((p.size(0) // world, *p.shape[1:]), dtype=g.dtype, device=g.device)
                        items.append((reduce_scatter_avg(g_slice, g, world, rank), g_slice))
                    else:
                        items.append((all_reduce_avg(g, world), g))
                reductions.append(items)
            else:
                params = group["params"]
                K, chunk = len(params), -(-len(params) // world)
                p0 = params[0]
                grads = [self._grad(p) for p in params]
                stacked = torch.empty((chunk * world, *p0.shape), dtype=grads[0].dtype, device=p0.device)
                torch.stack(grads, out=stacked[:K])
                stacked[K:].zero_()  # padding matrices: zero grads, zero params, zero update
                g_chunk = stacked[rank * chunk:(rank + 1) * chunk] if world == 1 else \
                    torch.empty((chunk, *p0.shape), dtype=stacked.dtype, device=stacked.device)
                reductions.append((reduce_scatter_avg(g_chunk, stacked, world, rank), g_chunk, stacked))

        # phase 2: per group, wait, update the owned part, launch the gather
        gathers = []
        for group, red in zip(self.param_groups, reductions):
            if group["kind"] == "adamw":
                self._adamw_group(group, red, world, rank, gathers)
            else:
                self._muon_group(group, red, world, rank, gathers)

        # phase 3: wait for the gathers, copy Muon results back
        for pending, finish in gathers:
            pending.wait()
            if finish is not None:
                finish()
        return loss

    def _adamw_group(self, group, red, world, rank, gathers):
        beta1, beta2 = group["betas"]
        for p, (pending, g) in zip(group["params"], red):
            pending.wait()
            state = self.state[p]
            state["step"] += 1
            t = state["step"]
            dev = p.device
            h = lambda v: self._hyper(v, dev)
            sharded = self._adamw_sharded(p, world)
            n = p.size(0) // world if sharded else p.size(0)
            p_part = p[rank * n:(rank + 1) * n] if sharded else p
            if _cpu_fused_adamw_ok(p_part, g) and not self._compiling(dev):
                fused_adamw_wide(p_part, g, state["exp_avg"], state["exp_avg_sq"], t, lr=float(group["lr"]),
                                 beta1=float(beta1), beta2=float(beta2),
                                 weight_decay=float(group["weight_decay"]), eps=float(group["eps"]),
                                 scratch=self._wide_scratch)
            else:
                _fused(adamw_update, self._compiling(dev))(p_part, g, state["exp_avg"], state["exp_avg_sq"], h(group["lr"]),
                                          h(group["weight_decay"]), h(beta1), h(beta2), h(group["eps"]),
                                          h(group["lr"] / (1 - beta1 ** t)), h(math.sqrt(1 - beta2 ** t)))
            if sharded:
                gathers.append((all_gather_dim0(p, p_part, world), None))

    def _muon_group(self, group, red, world, rank, gathers):
        pending, g_chunk, stacked = red
        params = group["params"]
        K, chunk = len(params), g_chunk.size(0)
        p0 = params[0]
        rows, cols = p0.shape
        state = self.state[p0]
        state["step"] += 1
        pending.wait()
        # the owned params, zero-padded past K (padding stays exactly zero through the update)
        lo, hi = rank * chunk, min((rank + 1) * chunk, K)
        p_chunk = torch.empty((chunk, rows, cols), dtype=p0.dtype, device=p0.device)
        if hi > lo:
            torch.stack(params[lo:hi], out=p_chunk[:hi - lo])
        p_chunk[max(hi - lo, 0):].zero_()
        cast_bf16 = self.compute_dtype == torch.bfloat16 or (self.compute_dtype is None and p0.dtype == torch.bfloat16)
        dev = p0.device
        h = lambda v: self._hyper(v, dev)
        lr_eff = group["lr"] * math.sqrt(max(1.0, rows / cols))
        _fused(muon_update, self._compiling(dev))(g_chunk, p_chunk, state["momentum_buffer"], state["second_momentum_buffer"],
                                 h(group["momentum"]), h(lr_eff), h(group["weight_decay"]), h(group["beta2"]),
                                 group["ns_steps"], cast_bf16)
        # gather every rank's updated chunk into the stacked-grad buffer (reused as output), then copy back
        out = stacked.to(p0.dtype) if stacked.dtype != p0.dtype else stacked
        def finish(out=out, params=params, K=K):
            torch._foreach_copy_(params, list(out[:K].unbind(0)))
        gathers.append((all_gather_dim0(out, p_chunk, world), finish))

    # --- state save / load ----------------------------------------------------

    @torch.no_grad()
    def shard_state_dict(self):
        """This rank's optimizer state as a flat {name: tensor} dict (CPU tensors, step counts as int64
        0-D tensors, plus world_size/rank), ready for safetensors.torch.save_file."""
        self._ensure_state()
        world, rank = self._layout
        out = {"world_size": torch.tensor(world, dtype=torch.int64), "rank": torch.tensor(rank, dtype=torch.int64)}
        for gi, group in enumerate(self.param_groups):
            if group["kind"] == "adamw":
                for pi, p in enumerate(group["params"]):
                    s = self.state[p]
                    out[f"group{gi}.param{pi}.step"] = torch.tensor(s["step"], dtype=torch.int64)
                    out[f"group{gi}.param{pi}.exp_avg"] = s["exp_avg"].detach().cpu().clone()
                    out[f"group{gi}.param{pi}.exp_avg_sq"] = s["exp_avg_sq"].detach().cpu().clone()
            else:
                s = self.state[group["params"][0]]
                out[f"group{gi}.step"] = torch.tensor(s["step"], dtype=torch.int64)
                out[f"group{gi}.momentum_buffer"] = s["momentum_buffer"].detach().cpu().clone()
                out[f"group{gi}.second_momentum_buffer"] = s["second_momentum_buffer"].detach().cpu().clone()
        return out

    @torch.no_grad()
    def load_shard_state_dict(self, d):
        """Restore what shard_state_dict() returned on the same rank of a run with the same world size and
        the same param groups. Raises ValueError naming the problem on any mismatch (nothing is changed then)."""
        self._ensure_state()
        world, rank = self._layout
        for k in ("world_size", "rank"):
            if k not in d:
                raise ValueError(f"optimizer state is missing {k!r}; it was not written by MuonAdamW.shard_state_dict()")
        saved_world, saved_rank = int(d["world_size"]), int(d["rank"])
        if saved_world != world:
            raise ValueError(f"optimizer state was saved with world size {saved_world} but this run has world size "
                             f"{world}; the state is sharded per rank, so resume with {saved_world} processes "
                             f"(or start the optimizer fresh)")
        if saved_rank != rank:
            raise ValueError(f"optimizer state file belongs to rank {saved_rank} but was loaded on rank {rank}; "
                             f"load optim_*_rank{rank} on rank {rank}")
        spec = self._expected_state()
        missing = [k for k in spec if k not in d]
        unexpected = [k for k in d if k not in spec and k not in ("world_size", "rank")]
        if missing or unexpected:
            raise ValueError(f"optimizer state does not match these param groups: missing {missing[:8]}"
                             f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                             f"{'...' if len(unexpected) > 8 else ''} (were the groups or the model config changed?)")
        for k, (shape, _) in spec.items():
            if tuple(d[k].shape) != shape:
                raise ValueError(f"optimizer state {k!r} has shape {tuple(d[k].shape)}, expected {shape} "
                                 f"(model config or param groups differ from the saved run)")
        for gi, group in enumerate(self.param_groups):
            if group["kind"] == "adamw":
                for pi, p in enumerate(group["params"]):
                    s, pre = self.state[p], f"group{gi}.param{pi}."
                    s["step"] = int(d[pre + "step"])
                    s["exp_avg"].copy_(d[pre + "exp_avg"])
                    s["exp_avg_sq"].copy_(d[pre + "exp_avg_sq"])
            else:
                s, pre = self.state[group["params"][0]], f"group{gi}."
                s["step"] = int(d[pre + "step"])
                s["momentum_buffer"].copy_(d[pre + "momentum_buffer"])
                s["second_momentum_buffer"].copy_(d[pre + "second_momentum_buffer"])
