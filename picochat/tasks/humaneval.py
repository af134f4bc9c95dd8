"""
HumanEval (openai/openai_humaneval): 164 Python functions to complete. Generative.
The program = prompt imports + the completion's first code block + the unit tests + check(entry_point),
run in picochat.sandbox; it passes iff the process exits cleanly.
"""
import re

from picochat.sandbox import execute_code
from picochat.tasks.common import RowsTask, load_rows

FENCE_RE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_imports(prompt: str) -> str:
    """The import lines at the top of the prompt (the completion may not repeat them)."""
    imports = []
    for line in prompt.splitlines():
        s = line.strip()
        if s.startswith("import ") or s.startswith("from "):
            imports.append(s)
        elif s and not s.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion: str) -> str:
    """Body of the first ```python (or bare ```) fence, else the whole completion."""
    m = FENCE_RE.search(completion)
    return m.group(1) if m else completion


class HumanEval(RowsTask):

    def __init__(self, sandbox_mode: str | None = None, **kwargs):
        """sandbox_mode: how the programs run, "kernel" or "unsafe" (None: picochat.sandbox's default)."""
        super().__init__(**kwargs)
        self.sandbox_mode = sandbox_mode
        self.set_rows(load_rows("humaneval/HumanEval.jsonl.gz", ("openai/openai_humaneval", "openai_humaneval", "test")))

    eval_type = "generative"

    def get_example(self, index):
        row = self.row(index)
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
            ],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def build_program(self, conversation, completion: str) -> str:
        imports = extract_imports(conversation["messages"][0]["content"])
        code = extract_program(completion)
        return (f"{imports}\n\n{code}\n\n{conversation['test']}\n"
                f"check({conversation['entry_point']})")

    def evaluate(self, conversation, completion: str) -> bool:
        result = execute_code(self.build_program(conversation, completion), mode=self.sandbox_mode)
        return bool(result.success)
