"""Chat tasks: rendering (golden token layout and mask), GSM8K parsing, SpellingBee correctness vs str.count,
Task slicing, mixtures, CustomJSON, mirror-sourced loading with the loud substitutions."""
import gzip
import json
import logging
import re

import pytest

from picochat import fetch
from picochat.tasks import (Task, TaskMixture, TaskSequence, render_mc, ARC, MMLU, GSM8K, HumanEval, SmolTalk,
                            SpellingBee, SimpleSpelling, Arithmetic, CustomJSON, parse_mixture, build_mixture)
from picochat.engine import use_calculator
from picochat.tasks import MixItem, mixture_counts, composition
from picochat.tasks.gsm8k import extract_answer, answer_to_parts
from picochat.tasks.humaneval import extract_imports, extract_program

# -----------------------------------------------------------------------------
# A tiny mirror directory laid out like ../shared/data (hermetic; also used by test_chat_stages.py)

NATALIA = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                       "in May. How many clips did Natalia sell altogether in April and May?",
           "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
                     "clips altogether in April and May.\n#### 72"}
GSM_ROWS = [NATALIA,
            {"question": "What is 1,000 plus 234?", "answer": "It is 1000+234=<<1000+234=1234>>1,234.\n#### 1,234"},
            {"question": "Tom has 5 apples and eats 2. How many are left?", "answer": "5-2=<<5-2=3>>3\n#### 3"},
            {"question": "A pen costs 3 dollars. How much do 4 pens cost?", "answer": "3*4=<<3*4=12>>12\n#### 12"}]
MMLU_ROWS = [{"subject": "math", "question": "What is 2+2?", "choices": ["3", "4", "5", "6"], "answer": 1},
             {"subject": "geo", "question": "Capital of France?", "choices": ["Rome", "Paris", "Oslo", "Bern"], "answer": 1},
             {"subject": "bio", "question": "Which is a mammal?", "choices": ["Shark", "Frog", "Whale", "Trout"], "answer": 2}]
ARC_ROWS = [{"id": "a1", "question": "Which is a liquid at room temperature?",
             "choices": {"text": ["ice", "water", "steam", "salt"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
            {"id": "a2", "question": "What do plants need for photosynthesis?",
             "choices": {"text": ["light", "sand", "noise"], "label": ["1", "2", "3"]}, "answerKey": "1"},
            {"id": "a3", "question": "Which planet is closest to the Sun?",
             "choices": {"text": ["Earth", "Mars", "Mercury", "Venus"], "label": ["A", "B", "C", "D"]}, "answerKey": "C"}]
HUMANEVAL_ROWS = [
    {"task_id": "HumanEval/0", "prompt": "from typing import List\n\n\ndef add(a: int, b: int) -> int:\n    \"\"\"Add.\"\"\"\n",
     "entry_point": "add", "canonical_solution": "    return a + b\n",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"},
    {"task_id": "HumanEval/1", "prompt": "def double(x):\n    \"\"\"Twice x.\"\"\"\n",
     "entry_point": "double", "canonical_solution": "    return 2 * x\n",
     "test": "def check(candidate):\n    assert candidate(4) == 8\n"},
]
WORDS = ["apple", "banana", "strawberry", "letter", "mississippi", "bookkeeper", "cat", "dog", "queue", "rhythm",
         "committee", "balloon", "coffee", "pepper", "success", "assess", "level", "kayak", "zebra", "yellow"]
SFT_ROWS = [{"messages": [{"role": "user", "content": f"Say hello number {i}."},
                          {"role": "assistant", "content": f"Hello number {i}!"}]} for i in range(6)]
SFT_ROWS.append({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey."},
                              {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"}]})


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_tiny_mirror(root):
    _jsonl(root / "gsm8k" / "train.jsonl", GSM_ROWS)
    _jsonl(root / "gsm8k" / "test.jsonl", GSM_ROWS[:3])
    _jsonl(root / "mmlu" / "dev.jsonl", MMLU_ROWS)
    _jsonl(root / "mmlu" / "test.jsonl", MMLU_ROWS)
    for split in ("train", "test"):
        _jsonl(root / "arc" / "ARC-Easy" / f"{split}.jsonl", ARC_ROWS)
    _jsonl(root / "arc" / "ARC-Challenge" / "test.jsonl", ARC_ROWS)
    (root / "humaneval").mkdir(parents=True, exist_ok=True)
    with gzip.open(root / "humaneval" / "HumanEval.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in HUMANEVAL_ROWS))
    (root / "words").mkdir(parents=True, exist_ok=True)
    (root / "words" / "words_alpha.txt").write_text("\n".join(WORDS) + "\n")
    _jsonl(root / "sft" / "chat.jsonl", SFT_ROWS)
    (root / "README.md").write_text("tiny mirror for tests\n")
    return root


@pytest.fixture
def tiny_mirror(tmp_path, picochat_home, monkeypatch):
    root = make_tiny_mirror(tmp_path / "mirror")
    fetch.set_mirror(None)
    monkeypatch.setenv("PICOCHAT_MIRROR", str(root))
    return root


@pytest.fixture
def loud_caplog(caplog, monkeypatch):
    # the picochat logger does not propagate to root (its own handler); let caplog see it
    monkeypatch.setattr(logging.getLogger("picochat"), "propagate", True)
    caplog.set_level(logging.WARNING)
    return caplog

# -----------------------------------------------------------------------------
# Golden rendering, built from tokenizer.encode pieces (the reference's chat layout)

def golden(tok, messages):
    sp = tok.encode_special
    ids, mask = [tok.get_bos_token_id()], [0]
    for m in messages:
        if m["role"] == "user":
            piece = [sp("<|user_start|>")] + tok.encode(m["content"]) + [sp("<|user_end|>")]
            ids += piece
            mask += [0] * len(piece)
            continue
        ids.append(sp("<|assistant_start|>"))
        mask.append(0)
        parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        for part in parts:
            if part["type"] == "text":
                piece, bit = tok.encode(part["text"]), 1
            elif part["type"] == "python":
                piece, bit = [sp("<|python_start|>")] + tok.encode(part["text"]) + [sp("<|python_end|>")], 1
            else:
                piece, bit = [sp("<|output_start|>")] + tok.encode(part["text"]) + [sp("<|output_end|>")], 0
            ids += piece
            mask += [bit] * len(piece)
        ids.append(sp("<|assistant_end|>"))
        mask.append(1)
    return ids, mask


def check_render(tok, conv):
    ids, mask = tok.render_conversation(conv, max_tokens=100000)
    exp_ids, exp_mask = golden(tok, conv["messages"])
    assert ids == exp_ids
    assert mask == exp_mask
    return ids, mask


def test_render_mc_layout():
    text = render_mc("What is 2+2?", ["A", "B"], ["3", "4"])
    assert text == ("Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n\n"
                    "Respond only with the letter of the correct answer.")


def test_mmlu_arc_render_and_evaluate(tiny_mirror, tiny_tokenizer, loud_caplog):
    tok = tiny_tokenizer
    mmlu = MMLU("all", "test")
    assert len(mmlu) == 3
    seen = set()
    for conv in mmlu:
        ids, mask = check_render(tok, conv)
        row = next(r for r in MMLU_ROWS if r["question"] in conv["messages"][0]["content"])
        letter = "ABCD"[row["answer"]]
        seen.add(row["question"])
        # the supervised tokens are exactly the answer letter and <|assistant_end|>
        sup = [i for i, m in zip(ids, mask) if m]
        assert sup == tok.encode(letter) + [tok.encode_special("<|assistant_end|>")]
        assert f"- {row['choices'][row['answer']]}={letter}\n" in conv["messages"][0]["content"]
        assert mmlu.evaluate(conv, letter) and not mmlu.evaluate(conv, "D" if letter != "D" else "A")
    assert len(seen) == 3
    arc = ARC("ARC-Easy", "test")
    numeric = [c for c in arc if c["letters"] == ["1", "2", "3"]]
    assert len(numeric) == 1 and numeric[0]["messages"][1]["content"] == "1"
    for conv in arc:
        check_render(tok, conv)


def test_gsm8k_parsing_real_format():
    parts = answer_to_parts(NATALIA["answer"])
    assert parts == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]
    # the text parts alone give back the answer without the annotations
    assert "".join(p["text"] for p in parts if p["type"] == "text") == re.sub(r"<<[^>]*>>", "", NATALIA["answer"])
    assert extract_answer("so #### 1,234") == "1234"
    assert extract_answer("#### -5") == "-5"
    assert extract_answer("no answer here") is None


def test_gsm8k_task_render_and_evaluate(tiny_mirror, tiny_tokenizer):
    task = GSM8K("main", "train")
    assert len(task) == 4
    for conv in task:
        ids, mask = check_render(tiny_tokenizer, conv)
        # python_output tokens are never trained
        out_start = tiny_tokenizer.encode_special("<|output_start|>")
        assert all(m == 0 for i, m in zip(ids, mask) if i == out_start)
    conv = next(c for c in task if "1,000" in c["messages"][0]["content"])
    assert task.evaluate(conv, "blah #### 1234") == 1
    assert task.evaluate(conv, "blah #### 1,234") == 1
    assert task.evaluate(conv, "blah #### 1235") == 0
    assert task.reward(conv, "no number") == 0.0


def test_humaneval_extraction_and_sandbox(tiny_mirror, tiny_tokenizer):
    task = HumanEval()
    assert len(task) == 2
    conv = next(c for c in task if c["entry_point"] == "add")
    check_render(tiny_tokenizer, conv)
    assert extract_imports(conv["messages"][0]["content"]) == "from typing import List"
    assert extract_program("Here:\n```python\nx = 1\n```\nmore ```y```") == "x = 1\n"
    assert extract_program("def f(): pass") == "def f(): pass"
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```\ndef add(a, b):\n    return a - b\n```"
    assert task.evaluate(conv, good) is True
    assert task.evaluate(conv, bad) is False
    assert task.evaluate(conv, conv["messages"][1]["content"]) is True   # the canonical answer passes


def test_spellingbee_counts_match_str_count(tiny_mirror, tiny_tokenizer):
    task = SpellingBee(size=300, split="train")
    for i in range(300):
        conv = task[i]
        word, letter = conv["word"], conv["letter"]
        assert word in WORDS and len(letter) == 1 and letter.isalpha()
        assert word in conv["messages"][0]["content"] and letter in conv["messages"][0]["content"]
        parts = conv["messages"][1]["content"]
        expected = word.count(letter)
        assert parts[-1]["text"].endswith(f"#### {expected}")
        assert task.evaluate(conv, parts[-1]["text"]) == 1
        assert task.evaluate(conv, f"#### {expected + 1}") == 0
        python = next(p for p in parts if p["type"] == "python")["text"]
        assert eval(python) == expected     # the tool call computes the same number
        assert next(p for p in parts if p["type"] == "python_output")["text"] == str(expected)
        manual = parts[0]["text"]
        assert f"{word}:{','.join(word)}\n" in manual       # no space before the first letter
        assert manual.count("hit!") == expected
    check_render(tiny_tokenizer, task[0])
    # deterministic per index, and the test split is a different stream (seed offset, not a sign flip)
    assert SpellingBee(size=300, split="train")[7] == task[7]
    test = SpellingBee(size=300, split="test")
    assert [test[i]["messages"][0]["content"] for i in range(20)] != [task[i]["messages"][0]["content"] for i in range(20)]


def test_simplespelling(tiny_mirror, tiny_tokenizer):
    task = SimpleSpelling(size=10, split="train")
    for conv in task:
        word = conv["messages"][0]["content"].removeprefix("Spell the word: ")
        assert conv["messages"][1]["content"] == word + ":" + ",".join(word)
        check_render(tiny_tokenizer, conv)


def test_arithmetic_tool_calls_match_the_engine_calculator(tiny_tokenizer):
    task = Arithmetic(size=400, split="train")
    ops = set()
    for i in range(len(task)):
        conv = task[i]
        user, parts = conv["messages"][0]["content"], conv["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["python", "python_output", "text"]   # the reply OPENS with the tool
        expr = parts[0]["text"]
        a, op, b = expr.split(" ")
        ops.add(op)
        assert a in user and b in user
        # training shows exactly what inference forces: the engine's calculator output for the same expression
        assert parts[1]["text"] == str(use_calculator(expr))
        x, y = int(a), int(b)
        if op == "/":
            assert y != 0 and x % y == 0, expr   # exact quotients only: the final answer is an integer
        value = {"+": lambda: x + y, "-": lambda: x - y, "*": lambda: x * y, "/": lambda: x // y}[op]()
        assert parts[2]["text"].endswith(f"#### {value}")
        assert task.evaluate(conv, parts[2]["text"]) == 1
        assert task.evaluate(conv, f"#### {value + 1}") == 0
    assert ops == {"+", "-", "*", "/"}
    check_render(tiny_tokenizer, task[0])
    assert Arithmetic(size=400, split="train")[5] == task[5]
    test = Arithmetic(size=400, split="test")
    assert [test[i]["messages"][0]["content"] for i in range(20)] != [task[i]["messages"][0]["content"] for i in range(20)]


def test_smoltalk_mirror_substitution_is_loud(tiny_mirror, tiny_tokenizer, loud_caplog):
    # a task-oriented booking dialogue file: left out of the substitute (it is not general chat)
    _jsonl(tiny_mirror / "sft" / "sgd_train.jsonl", [{"messages": [{"role": "user", "content": "Book a table."},
                                                                   {"role": "assistant", "content": "Which city?"}]}])
    train, test = SmolTalk("train"), SmolTalk("test")
    assert len(train) + len(test) == len(SFT_ROWS)   # nothing else silently dropped
    assert "Which city?" not in [m["content"] for conv in list(train) + list(test) for m in conv["messages"]]
    assert "not the task-oriented sgd_* dialogues" in loud_caplog.text
    assert "DATA SUBSTITUTION" in loud_caplog.text and "SmolTalk" in loud_caplog.text
    for conv in train:
        check_render(tiny_tokenizer, conv)


def test_mmlu_aux_train_substitution_is_loud(tiny_mirror, loud_caplog):
    task = MMLU("all", "auxiliary_train")
    four_choice_arc = sum(len(r["choices"]["label"]) == 4 for r in ARC_ROWS)
    assert len(task) == len(MMLU_ROWS) + four_choice_arc
    assert "DATA SUBSTITUTION" in loud_caplog.text and "auxiliary_train" in loud_caplog.text
    for conv in task:
        assert conv["messages"][1]["content"] in "ABCD"

# -----------------------------------------------------------------------------
# Task views and mixtures

class Numbers(Task):
    def __init__(self, n, tag="n", **kw):
        super().__init__(**kw)
        self.n, self.tag = n, tag
    def num_examples(self):
        return self.n
    def get_example(self, i):
        return (self.tag, i)


def test_task_slicing():
    t = Numbers(10, start=2, stop=9, step=3)
    assert len(t) == 3                       # ceil((9-2)/3)
    assert [t[i] for i in range(3)] == [("n", 2), ("n", 5), ("n", 8)]
    assert t[-1] == ("n", 8)
    with pytest.raises(IndexError):
        t[3]
    with pytest.raises(TypeError):
        t[0:2]
    assert len(Numbers(10, stop=100)) == 10  # stop is clipped to the data
    assert len(Numbers(10, start=4)) == 6
    assert list(Numbers(5, step=2)) == [("n", 0), ("n", 2), ("n", 4)]


def test_mixture_determinism_and_coverage():
    a, b = Numbers(5, "a"), Numbers(3, "b")
    m1, m2 = TaskMixture([a, b, b]), TaskMixture([a, b, b])
    items = [m1[i] for i in range(len(m1))]
    assert items == [m2[i] for i in range(len(m2))]           # same order every time
    assert len(items) == 5 + 3 + 3
    assert sorted(items) == sorted([("a", i) for i in range(5)] + [("b", i) for i in range(3)] * 2)
    assert items != [("a", i) for i in range(5)] + [("b", i) for i in range(3)] * 2   # actually shuffled
    seq = TaskSequence([a, b])
    assert [seq[i] for i in range(len(seq))] == [("a", i) for i in range(5)] + [("b", i) for i in range(3)]
    assert len(TaskMixture([a, b], start=0, stop=4)) == 4


def test_mixture_spec(tiny_mirror):
    assert parse_mixture("smoltalk,mmlu:3,gsm8k@420:2") == [MixItem("smoltalk"), MixItem("mmlu", epochs=3),
                                                            MixItem("gsm8k", 420, None, 2)]
    assert parse_mixture("a=0.5,b@7=0.25:3") == [MixItem("a", None, 0.5), MixItem("b", 7, 0.25, 3)]
    for bad in ("gsm8k@x", "a=0.5,b", "a=-1", "a=x"):
        with pytest.raises(ValueError):
            parse_mixture(bad)
    with pytest.raises(ValueError):
        build_mixture("nosuchtask")
    m = build_mixture("gsm8k@2:3,spellingbee@5")
    assert len(m) == 2 * 3 + 5


def test_mixture_keeps_its_proportions_when_a_source_is_small(tiny_mirror, tiny_tokenizer, tmp_path):
    """With full data the default mixture is the reference's (every row, its epochs); with a tiny conversation
    source, every task shrinks with it and none exceeds its planned share."""
    items = parse_mixture("smoltalk,mmlu:3,gsm8k:4,identity:2,simplespelling,spellingbee")
    full = [460_000, 99_842, 7_473, 1_000, 200_000, 80_000]
    assert mixture_counts(items, full) == [460_000, 3 * 99_842, 4 * 7_473, 2_000, 200_000, 80_000]
    planned = [n / sum(mixture_counts(items, full)) for n in mixture_counts(items, full)]
    small = [600, 99_842, 7_473, 1_000, 200_000, 80_000]  # a chat source 1/770th of SmolTalk
    counts = mixture_counts(items, small)
    shares = [c / sum(counts) for c in counts]
    # no task over its planned share by more than the one row rounding can add
    assert counts[0] == 600 and all(s <= p + 1 / sum(counts) for s, p in zip(shares, planned)), (shares, planned)
    assert shares[4] + shares[5] < 0.27  # the spelling tasks stay near their ~26%, not the 99% they would take
    # explicit shares, built for real: a tiny custom chat set (40 rows) and the spelling task
    chat = tmp_path / "chat.jsonl"
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    chat.write_text("".join(json.dumps(conv) + "\n" for _ in range(40)))
    m = build_mixture(f"{chat}=0.8,spellingbee=0.2")
    assert [(r["task"], r["rows"]) for r in m.composition] == [(str(chat), 40), ("spellingbee", 10)]
    rows = composition(m, tiny_tokenizer)
    assert abs(rows[0]["rows_pct"] - 80) < 1e-9 and rows[0]["tokens"] > 0 and abs(sum(r["tokens_pct"] for r in rows) - 100) < 1e-9
    kinds = [("hello there" in json.dumps(m[i])) for i in range(len(m))]
    assert sum(kinds) == 40 and len(m) == 50  # the mixture really holds those rows

# -----------------------------------------------------------------------------
# CustomJSON

def test_customjson_both_formats_and_errors(tmp_path, tiny_tokenizer):
    good = tmp_path / "good.jsonl"
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    good.write_text(json.dumps(conv) + "\n\n" + json.dumps({"messages": conv + conv}) + "\n")
    task = CustomJSON(good)
    assert len(task) == 2
    assert task[0] == {"messages": conv} and len(task[1]["messages"]) == 4
    check_render(tiny_tokenizer, task[1])
    cases = {
        "not json": "line 1",
        json.dumps([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]): "role 'user'",
        json.dumps({"msgs": conv}): "'messages'",
        json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]): "non-empty",
        json.dumps([{"role": "user", "content": "only"}]): "at least one",
    }
    for line, needle in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(conv) + "\n" + line + "\n")
        with pytest.raises(ValueError) as e:
            CustomJSON(bad)
        assert "bad.jsonl:2" in str(e.value)
        if needle != "line 1":
            assert needle in str(e.value)
    with pytest.raises(FileNotFoundError):
        CustomJSON(tmp_path / "missing.jsonl")

# -----------------------------------------------------------------------------
# The real data (../shared/data) through the HTTP mirror

def test_real_mirror_sources(shared_data, mirror_url, picochat_home, monkeypatch, loud_caplog):
    fetch.set_mirror(None)
    monkeypatch.setenv("PICOCHAT_MIRROR", mirror_url)
    gsm = GSM8K("main", "test")
    assert len(gsm) == 1319
    conv = gsm[0]
    assert conv["messages"][1]["content"][-1]["text"].rsplit("#### ", 1)[1].strip().replace(",", "").lstrip("-").replace(".", "").isdigit()
    assert len(ARC("ARC-Challenge", "test")) == 1172
    assert len(HumanEval()) == 164
    aux = MMLU("all", "auxiliary_train")
    assert len(aux) > 285
    assert "auxiliary_train is not in the mirror" in loud_caplog.text
    smol = SmolTalk("test")
    assert len(smol) > 100
    assert "SmolTalk is not in the mirror" in loud_caplog.text and "dolly_hhrlhf_small.jsonl" in loud_caplog.text
    # the whole HumanEval canonical set passes through our program builder (first few, to keep it quick)
    he = HumanEval()
    for i in range(3):
        c = he[i]
        assert he.evaluate(c, c["messages"][1]["content"]), c["entry_point"]


def test_hf_hub_source_without_mirror(tmp_path, picochat_home, monkeypatch):
    """No mirror: the HF parquet API lists files, each is downloaded once, manifest.json marks completion."""
    import functools
    import threading
    import pyarrow as pa
    import pyarrow.parquet as pq
    from http.server import ThreadingHTTPServer, SimpleHTTPRequestHandler
    import picochat.tasks.common as tc
    root = tmp_path / "hf"
    (root / "files").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(GSM_ROWS[:2]), root / "files" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(GSM_ROWS[2:]), root / "files" / "b.parquet")
    hits = []
    class H(SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass
        def do_GET(self):
            hits.append(self.path)
            return super().do_GET()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(H, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    listing = root / "api" / "openai" / "gsm8k" / "main"
    listing.mkdir(parents=True)
    (listing / "train").write_text(json.dumps([f"{base}/files/a.parquet", f"{base}/files/b.parquet"]))
    fetch.set_mirror(None)
    monkeypatch.delenv("PICOCHAT_MIRROR", raising=False)
    monkeypatch.setattr(tc, "HF_API", base + "/api/{repo}/{subset}/{split}")
    try:
        task = GSM8K("main", "train")
        assert len(task) == 4
        assert sorted(c["messages"][0]["content"] for c in task) == sorted(r["question"] for r in GSM_ROWS)
        d = picochat_home / "task_data" / "openai--gsm8k" / "main" / "train"
        assert json.loads((d / "manifest.json").read_text())["files"] == ["00000.parquet", "00001.parquet"]
        n = len(hits)
        GSM8K("main", "train")
        assert len(hits) == n   # cached: nothing fetched again
        # the hub listing 404s -> the datasets-server listing is used instead
        (root / "server.json").write_text(json.dumps({"parquet_files": [
            {"config": "main", "split": "test", "url": f"{base}/files/b.parquet"},
            {"config": "main", "split": "train", "url": f"{base}/files/a.parquet"}]}))
        monkeypatch.setattr(tc, "HF_SERVER_API", base + "/server.json?dataset={repo}")
        assert len(GSM8K("main", "test")) == 2
    finally:
        server.shutdown()
        server.server_close()
