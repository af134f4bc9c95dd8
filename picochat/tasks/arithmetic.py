"""
Arithmetic: a synthetic task that teaches a small chat model to hand arithmetic to its python tool.

"What is 37 times 12?" -> <|python_start|>37 * 12<|python_end|><|output_start|>444<|output_end|>
"37 * 12 = 444.\n\n#### 444". A model trained from scratch at CPU-demo size cannot multiply in its weights, but
it can learn to copy two numbers into a tool call; the engine's calculator then supplies the result. The reply
opens with the tool call, so the very first token already separates "compute this" from the spelling tasks'
"We need to count the letter..." (which small models otherwise confuse: both are short questions with numbers).
The tool's output part is the calculator's own rendering of the expression (str of eval: 144 / 12 -> 12.0), so
training shows exactly what inference will force. Evaluated like GSM8K (the number after '#### ').

Each example comes from its own seed (tasks.common.SyntheticTask), like SpellingBee.
"""
import random

from picochat.engine import use_calculator
from picochat.tasks.common import SyntheticTask
from picochat.tasks.gsm8k import final_answer_matches

# operator -> (python symbol, words a user might write for it)
OPERATORS = {
    "+": ["+", "plus", "and", "added to"],
    "-": ["-", "minus", "take away"],
    "*": ["*", "x", "times", "multiplied by", "×"],
    "/": ["/", "divided by", "÷", "over"],
}
# {a} {op} {b}: phrasings of "what is a op b"; some ask for the result of an expression written out
TEMPLATES = [
    "What is {a} {op} {b}?",
    "what's {a} {op} {b}",
    "Calculate {a} {op} {b}.",
    "Compute {a} {op} {b}",
    "How much is {a} {op} {b}?",
    "Can you work out {a} {op} {b} for me?",
    "Please evaluate {a} {op} {b}.",
    "{a} {op} {b} = ?",
    "{a} {op} {b}",
    "Quick question: {a} {op} {b}?",
    "I need the result of {a} {op} {b}.",
    "Solve {a} {op} {b}",
    "What do you get when you take {a} {op} {b}?",
    "Cuánto es {a} {op} {b}?",
    "Combien font {a} {op} {b} ?",
    "Was ist {a} {op} {b}?",
]


def operands(rng: random.Random, op: str) -> tuple:
    """Two operands of mixed sizes; a division always has an exact integer quotient."""
    digits = rng.choice([1, 2, 2, 3, 3, 4])
    hi = 10 ** digits - 1
    if op == "/":
        b = rng.randint(2, 99)
        return b * rng.randint(1, max(1, hi // b)), b
    if op == "*":
        return rng.randint(2, hi), rng.randint(2, rng.choice([12, 99, 999]))
    return rng.randint(0, hi), rng.randint(0, hi)


class Arithmetic(SyntheticTask):

    def __init__(self, size=50_000, split="train", **kwargs):
        super().__init__(size, split, **kwargs)

    def get_example(self, index):
        rng = self.rng(index)
        op = rng.choice(list(OPERATORS))
        a, b = operands(rng, op)
        user = rng.choice(TEMPLATES).format(a=a, op=rng.choice(OPERATORS[op]), b=b)
        if rng.random() < 0.3:
            user = user.lower()
        expr = f"{a} {op} {b}"
        output = str(use_calculator(expr))   # exactly what the engine forces at inference
        value = int(float(output))   # every result here is an integer (exact division)
        return {"messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [
                {"type": "python", "text": expr},
                {"type": "python_output", "text": output},
                {"type": "text", "text": f"\n\n{expr} = {value}.\n\n#### {value}"},
            ]},
        ]}

    def evaluate(self, conversation, response: str) -> int:
        return final_answer_matches(conversation, response)
