"""
One entry point: `picochat <stage> [flags]` == `python -m picochat <stage> [flags]`,
also under torchrun: `torchrun --nproc_per_node=8 -m picochat base-train --depth=24`.
Each stage is a module of picochat/stages with a `main(argv)` function; it is imported only when run. A ValueError or a
missing file raised by a stage is a user's mistake: one line on stderr, exit code 2 (`picochat --debug <stage>`
or PICOCHAT_DEBUG=1 shows the traceback).
"""
import os
import sys
import importlib

from picochat import __version__

# stage -> (module, one-line help). Order is the pipeline order.
STAGES = {
    "data":            ("picochat.stages.data", "download pretraining shards (data download -n N)"),
    "tok-train":       ("picochat.stages.tok_train", "train the BPE tokenizer on the pretraining shards"),
    "tok-eval":        ("picochat.stages.tok_eval", "compression (bytes/token) of our tokenizer vs GPT-2/GPT-4"),
    "base-train":      ("picochat.stages.base_train", "pretrain a GPT; every hyperparameter follows from --depth"),
    "base-eval":       ("picochat.stages.base_eval", "evaluate a base checkpoint: CORE, bits per byte, samples"),
    "gen-identity":    ("picochat.stages.gen_identity", "write synthetic identity conversations for SFT"),
    "chat-sft":        ("picochat.stages.chat_sft", "supervised finetuning into a chat model"),
    "chat-rl":         ("picochat.stages.chat_rl", "reinforcement learning on GSM8K (simplified GRPO)"),
    "chat-eval":       ("picochat.stages.chat_eval", "chat benchmarks: ARC, MMLU, GSM8K, HumanEval, SpellingBee; ChatCORE"),
    "chat":            ("picochat.stages.chat_cli", "talk to a model in the terminal"),
    "serve":           ("picochat.stages.serve", "OpenAI-compatible API server and web UI"),
    "infer-bench":     ("picochat.stages.infer_bench", "inference benchmark: prefill, TTFT, TPOT, MBU/MFU"),
    "export":          ("picochat.stages.export", "export a checkpoint to Hugging Face transformers format"),
    "import-nanochat": ("picochat.stages.import_nanochat", "convert a nanochat checkpoint into a picochat one"),
    "report":          ("picochat.stages.report", "render the run's report card (report.md + plots)"),
}

def usage() -> str:
    width = max(map(len, STAGES))
    lines = ["usage: picochat <stage> [flags]   (also: python -m picochat, torchrun -m picochat)", "", "stages:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in STAGES.items()]
    lines += ["", "picochat <stage> --help shows a stage's flags; picochat --debug <stage> ... shows tracebacks."]
    return "\n".join(lines)

def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv[:1]:  # `picochat --debug <stage> ...`: tracebacks instead of one-line errors
        argv = argv[1:]
        os.environ["PICOCHAT_DEBUG"] = "1"
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    stage, rest = argv[0], argv[1:]
    if stage in ("-V", "--version"):
        print(__version__)
        return 0
    if stage not in STAGES:
        print(f"picochat: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(STAGES[stage][0])
    try:
        return module.main(rest) or 0
    except RuntimeError as e:
        if not hasattr(e, "exit_code"):  # a failure the stage did not foresee: the traceback is the report
            raise
        print(f"picochat {stage}: error: {e}", file=sys.stderr)  # a foreseen failure (a NaN loss): one line
        return e.exit_code
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        # a user's mistake (a bad flag value, a missing file, tag or step): the stages raise these with a
        # message that names the problem and the fix, which is all the user needs to see
        if os.environ.get("PICOCHAT_DEBUG"):
            raise
        print(f"picochat {stage}: error: {e} (picochat --debug {stage} ... shows the traceback)", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
