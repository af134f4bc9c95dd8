"""
MMLU (cais/mmlu): 57-subject multiple choice, letters A-D. Categorical.
Training uses the `auxiliary_train` split of subset "all" (the test split is for evaluation only). The mirror has no
auxiliary_train: we then train on mmlu/dev plus ARC-Easy train rendered the same way, and say so loudly.
"""
from picochat.tasks.common import RowsTask, render_mc, load_rows, have_mirror, mirror_has, loud_fallback

LETTERS = ("A", "B", "C", "D")


def mmlu_conversation(row: dict) -> dict:
    return {
        "messages": [
            {"role": "user", "content": render_mc(row["question"], LETTERS, row["choices"])},
            {"role": "assistant", "content": LETTERS[row["answer"]]},
        ],
        "subject": row.get("subject", ""),
        "letters": LETTERS,
    }


def _arc_as_mmlu(row: dict) -> dict:
    """An ARC-Easy row in MMLU's shape (4 choices relettered A-D), for the aux-train substitute."""
    labels, texts = row["choices"]["label"], row["choices"]["text"]
    return {"question": row["question"], "choices": list(texts), "answer": list(labels).index(row["answerKey"]),
            "subject": "arc_easy"}


class MMLU(RowsTask):

    def __init__(self, subset="all", split="test", **kwargs):
        super().__init__(**kwargs)
        assert subset in ("all", "auxiliary_train"), f"MMLU subset must be all|auxiliary_train, got {subset!r}"
        if subset == "auxiliary_train":  # March-version spelling of the same data
            subset, split = "all", "auxiliary_train"
        assert split in ("auxiliary_train", "dev", "validation", "test"), f"bad MMLU split {split!r}"
        self.split = split
        if split == "auxiliary_train" and have_mirror() and not mirror_has("mmlu/auxiliary_train.jsonl"):
            dev = load_rows("mmlu/dev.jsonl")
            arc = [_arc_as_mmlu(r) for r in load_rows("arc/ARC-Easy/train.jsonl")
                   if len(r["choices"]["label"]) == 4]
            loud_fallback(f"MMLU auxiliary_train is not in the mirror; using mmlu/dev ({len(dev)} rows) + "
                          f"ARC-Easy train ({len(arc)} four-choice rows) rendered as MMLU instead "
                          f"({len(dev) + len(arc)} rows vs ~100K in the reference)")
            rows = dev + arc
        else:
            rows = load_rows(f"mmlu/{split}.jsonl", ("cais/mmlu", subset, split))
        if rows and "train" in rows[0] and "question" not in rows[0]:
            rows = [r["train"] for r in rows]   # old hub layout wrapped aux rows in a `train` field
        self.set_rows(rows)

    eval_type = "categorical"

    def get_example(self, index):
        return mmlu_conversation(self.row(index))

    def evaluate(self, conversation, response):
        assert response in LETTERS, f"MMLU answer {response!r} not in {LETTERS}"
        return response == conversation["messages"][-1]["content"]
