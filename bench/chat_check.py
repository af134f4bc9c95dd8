"""
Does a chat checkpoint answer like a chat model? ~30 fixed everyday prompts (greetings, identity, simple facts,
arithmetic, small coding requests), answered greedily, with automatic checks:

  * no_spelling: the reply is not a letter-counting transcript (asked of every prompt: none asks for spelling);
  * identity:    identity prompts' replies name picochat (what the identity data teaches);
  * arithmetic:  the right number appears in the reply: stated in its text or returned by its python tool call
                 (a tool call's own expression is not counted: "<|python_start|>144 / 12" mentions 12 but
                 computes nothing; a call that copies the numbers wrongly returns the wrong result and fails);
  * ends:        the reply ends with <|assistant_end|> within the token budget.

    python bench/chat_check.py                       # latest sft/rl checkpoint under $PICOCHAT_HOME
    python bench/chat_check.py -i sft -g d2 --max-tokens 128 --show

Prints pass rates per check (over the prompts it applies to) and, with --show, every reply.
"""
import re
import sys
import argparse

import torch

from picochat.checkpoint import latest_source, load_model
from picochat.engine import Engine

PROMPTS = {
    "greeting": ["hello", "Hi there!", "Good morning, how are you?", "hey, what's up?", "Thanks for your help!"],
    "identity": ["Who are you?", "What is your name?", "Are you ChatGPT?", "Introduce yourself.",
                 "Who made you?", "What kind of model are you?", "What should I call you?", "who are you?"],
    "fact": ["What is the capital of France?", "How many days are in a week?", "What color is the sky on a clear day?",
             "What is water made of?", "Name a planet in our solar system.", "What do bees make?"],
    "arithmetic": [("What is 12*7?", 84), ("what is 15 + 27?", 42), ("Compute 100 - 37.", 63),
                   ("What is 9 times 8?", 72), ("How much is 144 / 12?", 12), ("What is 23 + 19?", 42)],
    "coding": ["Write a python function to reverse a string.", "How do I print hello world in Python?",
               "Write a function that returns the sum of a list.", "What does len() do in Python?",
               "Write a python function that checks if a number is even."],
}
TOOL_CALL = re.compile(r"<\|python_start\|>.*?(<\|python_end\|>|$)", re.S)
# the spelling tasks' transcripts (not "#### N", which GSM8K answers end with too)
SPELLING = re.compile(r"count the letter|spell it out|\.count\(|letters? ['\"]?\w['\"]? in the word", re.I)


def check(category, prompt, answer, reply, ended):
    """-> {check: passed} for the checks that apply to this prompt."""
    out = {"no_spelling": not SPELLING.search(reply), "ends": ended}
    if category == "identity":
        out["identity"] = "picochat" in reply.lower()
    if category == "arithmetic":
        said = TOOL_CALL.sub(" ", reply).replace(",", "")   # text and tool outputs, without the calls themselves
        out["arithmetic"] = float(answer) in [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", said)]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-i", "--source", choices=["sft", "rl"], default=None, help="default: the latest (rl > sft)")
    ap.add_argument("-g", "--model-tag", default=None)
    ap.add_argument("-s", "--step", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--show", action="store_true", help="print every reply")
    args = ap.parse_args(argv)
    source = args.source or latest_source(args.model_tag)
    model, tok, meta = load_model(source, torch.device("cpu"), model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tok)
    totals = {}
    for category, prompts in PROMPTS.items():
        for p in prompts:
            prompt, answer = p if isinstance(p, tuple) else (p, None)
            ids = engine.chat_prompt([{"role": "user", "content": prompt}], args.max_tokens)
            out, _ = engine.generate_batch(ids, max_tokens=args.max_tokens, temperature=0.0)
            gen = out[0][len(ids):]
            budget = min(args.max_tokens, engine.sequence_len - len(ids))
            ended = len(gen) < budget  # generate_batch stops at (and drops) a terminal token
            reply = tok.decode(gen)
            for name, ok in check(category, prompt, answer, reply, ended).items():
                passed, n = totals.get(name, (0, 0))
                totals[name] = (passed + ok, n + 1)
            if args.show:
                print(f"[{category}] {prompt!r} -> {reply!r}{'' if ended else ' [no end]'}")
    print(f"{source} {meta['model_tag']} step {meta['step']}: {sum(len(p) for p in PROMPTS.values())} prompts, "
          f"greedy, max {args.max_tokens} tokens")
    for name, (passed, n) in totals.items():
        print(f"  {name:<12} {passed:>3}/{n:<3} {100 * passed / n:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
