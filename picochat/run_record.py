"""
The run record: what a training run was, as one typed value written into every checkpoint's meta (meta["run"])
and read back by the stages that continue from it. chat-sft inherits the base run's sequence length, batch sizes
and learning rates from it; resume reads its own loop state from it; the report reads it.

What belongs to the checkpoint itself stays in checkpoint.py's fields of the meta (step, model_config: the shapes
of the saved weights, tokenizer, world_size, picochat_version); what the run was (its hyperparameters) and where
it stood (loop and loader state) is here, each value once.
"""
from dataclasses import MISSING, dataclass, field, asdict, fields


@dataclass
class RunRecord:
    stage: str                  # base | sft | rl
    model_tag: str
    compute_dtype: str          # float32 | bfloat16 | float16
    max_seq_len: int            # tokens per training row
    device_batch_size: int      # rows per forward/backward pass on one rank
    total_batch_size: int       # tokens (base, sft) or questions (rl) per optimizer step, all ranks
    lrs: dict                   # {"embedding", "unembedding", "matrix", "scalar"} as given, before any batch scaling
    num_iterations: int         # the horizon (a --max-time-s base run: -1 until its first steps fix it)
    parent: dict | None = None  # the checkpoint this run started from: {"source", "model_tag", "step"}
    derived: dict = field(default_factory=dict)      # what followed from the flags (base-train's derivations)
    user_config: dict = field(default_factory=dict)  # the flags as parsed, for the record
    loop: dict = field(default_factory=dict)         # loop state at the checkpoint (smoothed loss, time, ...)
    loader: dict | None = None  # loader state, {"world_size": W, "ranks": [...]} (train_loop.gather_loader_states)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict, where: str = "the checkpoint") -> "RunRecord":
        run = meta.get("run")
        if not isinstance(run, dict):
            raise ValueError(f"{where} has no run record (meta['run']): it was not written by this picochat's "
                             "training stages; retrain it, or import it with `picochat import-nanochat`")
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        unknown, missing = set(run) - names, required - set(run)
        if unknown or missing:
            raise ValueError(f"{where}: run record fields differ from this picochat's (unknown {sorted(unknown)}, "
                             f"missing {sorted(missing)})")
        return cls(**run)
