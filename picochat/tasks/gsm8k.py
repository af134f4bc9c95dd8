"""
GSM8K (openai/gsm8k, subset main): grade-school math word problems. Generative.
The reference answer's calculator annotations <<expr=result>> become tool calls, so SFT teaches the
model to emit python parts and the engine's calculator supplies the outputs at inference time.
Scored by exact match of the number after '#### ' (commas removed).
"""
import re

from picochat.tasks.common import RowsTask, load_rows

ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
CALC_RE = re.compile(r"(<<[^>]*>>)")


def extract_answer(text: str):
    """The number after '#### ' with commas removed, or None."""
    m = ANSWER_RE.search(text)
    if m is None:
        return None
    return m.group(1).strip().replace(",", "")


def answer_to_parts(answer: str) -> list:
    """Split a GSM8K solution into text / python / python_output parts at the <<expr=result>> annotations."""
    parts = []
    for piece in CALC_RE.split(answer):
        if not piece:
            continue
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, eq, result = inner.rpartition("=")
            if not eq:   # no '=': the whole thing is the expression, no output
                expr, result = inner, ""
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})
    return parts


def final_answer_matches(conversation, response: str) -> int:
    """1 when the response's '#### answer' equals the reference reply's (its last text part), else 0."""
    last = conversation["messages"][-1]["content"]
    ref = extract_answer(last[-1]["text"] if isinstance(last, list) else last)
    pred = extract_answer(response)
    return int(pred is not None and pred == ref)


def gsm8k_conversation(row: dict) -> dict:
    return {"messages": [
        {"role": "user", "content": row["question"]},
        {"role": "assistant", "content": answer_to_parts(row["answer"])},
    ]}


class GSM8K(RowsTask):

    def __init__(self, subset="main", split="train", **kwargs):
        super().__init__(**kwargs)
        assert subset in ("main", "socratic"), f"GSM8K subset must be main|socratic, got {subset!r}"
        assert split in ("train", "test"), f"GSM8K split must be train|test, got {split!r}"
        rel = f"gsm8k/{split}.jsonl" if subset == "main" else f"gsm8k/socratic_{split}.jsonl"
        self.set_rows(load_rows(rel, ("openai/gsm8k", subset, split)))

    eval_type = "generative"

    def get_example(self, index):
        return gsm8k_conversation(self.row(index))

    def evaluate(self, conversation, response: str) -> int:
        return final_answer_matches(conversation, response)
