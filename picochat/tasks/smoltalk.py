"""
SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations for SFT (~460K train, ~24K test).

The mirror has no SmolTalk. With PICOCHAT_MIRROR set we substitute the mirror's sft/*.jsonl
conversations (messages format) and log that loudly: a deterministic 95% / 5% split of their union
(Random(42)) stands in for train / test.
The substitute leaves out the mirror's Schema-Guided Dialogue files (sgd_*): they are task-oriented booking
dialogues ("What city do you want to search in?"), ~18 turns each, so they were 72% of the substitute's rows and
most of its tokens, and the CPU demo's model answered greetings, facts and sums with slot-filling questions.
SmolTalk is general assistant chat; the remaining files (instructions, harmless chat, code) are closer to it.
"""
import random
from pathlib import Path

from picochat.tasks.common import (Task, have_mirror, mirror_has, mirror_file, read_jsonl, load_hub_rows,
                                   shuffled_indices, validate_messages, loud_fallback, _mirror)

# The sft/ files of ../shared/data. A directory mirror is globbed; a URL mirror cannot be listed,
# so these names are tried (missing ones are skipped).
MIRROR_SFT_FILES = ["dolly_hhrlhf_small.jsonl", "gpteacher_codegen.jsonl", "hh_rlhf_harmless_base_test.jsonl",
                    "sgd_train.jsonl.gz", "sgd_dev.jsonl.gz", "sgd_test.jsonl.gz"]
TEST_FRACTION = 0.05
NOT_GENERAL_CHAT = ("sgd_",)   # file-name prefixes left out of the substitute (see the module docstring)


def mirror_sft_files() -> list:
    m = _mirror()
    if "://" not in m:
        names = sorted(p.name for p in (Path(m) / "sft").glob("*.jsonl*") if ".raw." not in p.name)
    else:
        names = [n for n in MIRROR_SFT_FILES if mirror_has(f"sft/{n}")]
    return [n for n in names if not n.startswith(NOT_GENERAL_CHAT)]


def load_mirror_conversations() -> tuple:
    """(valid conversations, number of rows skipped as malformed)"""
    convs, skipped = [], 0
    for name in mirror_sft_files():
        path = mirror_file(f"sft/{name}")
        for i, row in enumerate(read_jsonl(path)):
            msgs = row["messages"] if isinstance(row, dict) else row
            msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
            try:
                validate_messages(msgs, f"sft/{name} row {i}")
            except ValueError:
                skipped += 1   # e.g. empty turns or two user turns in a row: reported, not trained on
                continue
            convs.append(msgs)
    return convs, skipped


class SmolTalk(Task):

    def __init__(self, split="train", **kwargs):
        super().__init__(**kwargs)
        assert split in ("train", "test"), f"SmolTalk split must be train|test, got {split!r}"
        self.split = split
        if have_mirror() and not mirror_has("smoltalk/train.jsonl"):
            convs, skipped = load_mirror_conversations()
            if not convs:
                raise RuntimeError("PICOCHAT_MIRROR has neither smoltalk/ nor any sft/*.jsonl conversations; "
                                   "unset PICOCHAT_MIRROR to download SmolTalk from Hugging Face")
            random.Random(42).shuffle(convs)
            n_test = max(1, int(len(convs) * TEST_FRACTION))
            self.convs = convs[:n_test] if split == "test" else convs[n_test:]
            loud_fallback(f"SmolTalk is not in the mirror; using the mirror's sft/*.jsonl conversations "
                          f"({', '.join(mirror_sft_files())}; not the task-oriented sgd_* dialogues) instead: {len(self.convs)} {split} conversations "
                          f"(reference SmolTalk: ~460K train / ~24K test); {skipped} malformed rows skipped. An SFT "
                          f"mixture keeps its proportions, so it shrinks with this source (chat-sft prints the "
                          f"composition): chat stays its share, the other tasks do not take over")
        else:
            if have_mirror():
                rows = read_jsonl(mirror_file(f"smoltalk/{split}.jsonl"))
            else:
                rows = load_hub_rows("HuggingFaceTB/smol-smoltalk", "default", split)
            self.convs = [r["messages"] for r in rows]
        self.order = shuffled_indices(len(self.convs), 42)

    def num_examples(self):
        return len(self.convs)

    def get_example(self, index):
        msgs = self.convs[self.order[index]]
        validate_messages(msgs, f"SmolTalk {self.split} example {index}")
        return {"messages": msgs}
