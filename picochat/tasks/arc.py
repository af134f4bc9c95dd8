"""
AI2 ARC (allenai/ai2_arc): grade-school science multiple choice, subsets ARC-Easy and ARC-Challenge.
Categorical: the assistant answers with one letter. Mirror: arc/<subset>/<split>.jsonl.
"""
from picochat.tasks.common import RowsTask, render_mc, load_rows


def arc_conversation(row: dict) -> dict:
    question, choices = row["question"], row["choices"]
    letters = list(choices["label"])   # usually A-D; a few rows use "1".."4"
    answer = row["answerKey"]
    assert answer in letters, f"ARC answerKey {answer!r} not among labels {letters}"
    return {
        "messages": [
            {"role": "user", "content": render_mc(question, letters, choices["text"])},
            {"role": "assistant", "content": answer},
        ],
        "letters": letters,
    }


class ARC(RowsTask):

    def __init__(self, subset="ARC-Easy", split="train", **kwargs):
        super().__init__(**kwargs)
        assert subset in ("ARC-Easy", "ARC-Challenge"), f"ARC subset must be ARC-Easy or ARC-Challenge, got {subset!r}"
        assert split in ("train", "validation", "test"), f"ARC split must be train|validation|test, got {split!r}"
        self.subset, self.split = subset, split
        self.set_rows(load_rows(f"arc/{subset}/{split}.jsonl", ("allenai/ai2_arc", subset, split)))

    eval_type = "categorical"

    def get_example(self, index):
        return arc_conversation(self.row(index))

    def evaluate(self, conversation, response):
        assert response in conversation["letters"], f"ARC answer {response!r} not in {conversation['letters']}"
        return response == conversation["messages"][-1]["content"]
