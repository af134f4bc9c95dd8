"""
Talk to a model in the terminal, with streaming output.

    picochat chat                          # latest available model: rl > sft > base
    picochat chat -i sft -t 0.8 -k 50      # a chosen stage, temperature, top-k
    picochat chat -p "Why is the sky blue?"   # one-shot: answer once and exit
    picochat chat -i base -p "The capital of France is"   # base models continue plain text
    picochat chat -i sft -g d12 -s 800 --device-type cpu

Commands in interactive mode: `clear` starts a new conversation, `exit` / `quit` (or Ctrl-D) leaves;
empty input is ignored. The model's context length is shown at start. A conversation that outgrows it keeps
going: the engine drops the oldest turns (keeping the first one), and the chat says how many tokens were
dropped. (`picochat serve` refuses such a request with a 400 instead, unless started with --truncate-prompts.)
Tool calls print readably, e.g. `[python] 'strawberry'.count('r') -> 3`, never as special-token markup.
"""
import sys
import random
import argparse

import torch

from picochat import sandbox
from picochat.common import HelpFormatter, compute_init
from picochat.checkpoint import latest_source, load_model
from picochat.engine import DECODE_DTYPES, Engine, TextStreamer, resolve_decode_dtype

def tokens_to_parts(tokens, tokenizer) -> list:
    """An assistant reply's tokens -> message content parts (text / python / python_output), so the next
    turn re-renders tool calls with their special tokens rather than as literal text."""
    sp = tokenizer.encode_special
    opens = {sp("<|python_start|>"): "python", sp("<|output_start|>"): "python_output"}
    closes = {sp("<|python_end|>"), sp("<|output_end|>")}
    parts, kind, buf = [], "text", []
    def flush():
        if buf:
            parts.append({"type": kind, "text": tokenizer.decode(buf)})
    for t in tokens:
        if t in opens:
            flush(); kind, buf = opens[t], []
        elif t in closes:
            flush(); kind, buf = "text", []
        else:
            buf.append(t)
    flush()
    return parts

def stream_reply(engine, tokenizer, prompt, args, out=None) -> list:
    """Generate one sample, printing text as soon as it is complete UTF-8; returns the reply tokens."""
    out = out or sys.stdout  # looked up per call: a default bound at import time goes stale when stdout is swapped
    streamer = TextStreamer(tokenizer)
    terminal = {engine.assistant_end, engine.bos}
    # tool-call markers print as readable text: [python] code -> result
    markers = {engine.python_start: "[python] ", engine.python_end: " -> ", engine.output_start: "",
               engine.output_end: "\n"}
    seed = args.seed if args.seed is not None else random.randrange(2 ** 31)
    reply = []
    for column, _ in engine.generate(prompt, num_samples=1, max_tokens=args.max_tokens,
                                     temperature=args.temperature, top_k=args.top_k, seed=seed):
        token = column[0]
        if token in terminal:
            break
        reply.append(token)
        out.write(streamer.finish() + markers[token] if token in markers else streamer.add(token))
        out.flush()
    out.write(streamer.finish() + "\n")
    out.flush()
    return reply

def main(argv=None):
    parser = argparse.ArgumentParser(prog="picochat chat", description="Chat with a picochat model in the terminal",
                                     formatter_class=HelpFormatter)
    parser.add_argument("-i", "--source", choices=("rl", "sft", "base"), default=None,
                        help="checkpoint stage (default: the latest available, rl > sft > base)")
    parser.add_argument("-g", "--model-tag", default=None, help="model tag, e.g. d12 (default: the largest)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last complete)")
    parser.add_argument("-p", "--prompt", default=None,
                        help="one-shot mode: answer this prompt and exit (default: interactive)")
    parser.add_argument("-t", "--temperature", type=float, default=0.6, help='sampling temperature (0: greedy)')
    parser.add_argument("-k", "--top-k", type=int, default=50, help="0 = no top-k")
    parser.add_argument("-m", "--max-tokens", type=int, default=256, help="max new tokens per reply")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: random per reply)")
    parser.add_argument("--sandbox", action="store_true", help="let the python tool run code in the sandbox")
    sandbox.add_unsafe_flag(parser)
    parser.add_argument("--device-type", default="", choices=["", "cuda", "cpu", "mps"], help="default: autodetect")
    parser.add_argument("--decode-dtype", default="auto", choices=DECODE_DTYPES,
                        help="weights the reply is decoded with: auto = a bf16 copy where the model computes in fp32 "
                             "on CPU (about twice the tokens/s), model = the model's own")
    args = parser.parse_args(argv)
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    if args.max_tokens < 1:
        parser.error("--max-tokens must be >= 1")

    sandbox_mode = False
    if args.sandbox or args.unsafe_sandbox:  # --unsafe-sandbox alone also turns the tool's code execution on
        sandbox_mode = sandbox.mode_for_cli(parser, args.unsafe_sandbox, log=lambda s: print(s, file=sys.stderr))
    rt = compute_init(args.device_type)
    try:
        source = args.source or latest_source(args.model_tag)
        model, tokenizer, meta = load_model(source, rt.device, phase="eval", model_tag=args.model_tag, step=args.step)
    except FileNotFoundError as e:
        print(f"picochat chat: error: {e}", file=sys.stderr)
        return 2
    decode_dtype, decode_note = resolve_decode_dtype(args.decode_dtype, model)
    engine = Engine(model, tokenizer, sandbox=sandbox_mode, decode_dtype=decode_dtype)
    print(decode_note, file=sys.stderr)
    is_chat = source != "base"
    print(f"Loaded the {source} model (step {meta.get('step')}, {model.config.n_layer} layers) on {rt.device}, "
          f"context {engine.sequence_len} tokens (a reply takes up to {min(args.max_tokens, engine.sequence_len // 2)})."
          " "
          + ("Chat mode." if is_chat else "Base model: plain-text continuation, no chat tokens."), file=sys.stderr)

    messages = []
    def respond(text):
        if is_chat:
            messages.append({"role": "user", "content": text})
            prompt = engine.chat_prompt(messages, args.max_tokens)
            whole = len(tokenizer.render_conversation({"messages": messages}, max_tokens=1 << 62)[0]) + 1
            if whole > len(prompt):
                print(f"(the conversation is {whole} tokens; the {engine.sequence_len}-token context kept "
                      f"{len(prompt)}: {whole - len(prompt)} of the oldest were dropped)", file=sys.stderr)
            reply = stream_reply(engine, tokenizer, prompt, args)
            messages.append({"role": "assistant", "content": tokens_to_parts(reply, tokenizer) or ""})
        else:
            stream_reply(engine, tokenizer, tokenizer.encode(text, prepend="<|bos|>"), args)

    with torch.inference_mode():
        if args.prompt is not None:
            if not args.prompt.strip():
                parser.error("--prompt is empty")
            if not is_chat:
                sys.stdout.write(args.prompt)
            respond(args.prompt)
            return 0
        print("picochat — type a message; 'clear' starts over, 'exit' or 'quit' leaves.", file=sys.stderr)
        while True:
            try:
                text = input("\nUser: ")
            except (EOFError, KeyboardInterrupt):
                print()
                break
            cmd = text.strip()
            if not cmd:
                continue
            if cmd.lower() in ("exit", "quit"):
                break
            if cmd.lower() == "clear":
                messages.clear()
                print("(conversation cleared)")
                continue
            print("Assistant: " if is_chat else text, end="", flush=True)
            try:
                respond(text)
            except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
                print("\n(interrupted)")
                if is_chat and messages and messages[-1]["role"] == "user":
                    messages.pop()
    return 0
