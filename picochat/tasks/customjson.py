"""
CustomJSON: your own conversations, one per line of a .jsonl file. Each line is either a JSON array of
{"role", "content"} messages or an object {"messages": [...]}; roles alternate user/assistant
(an optional leading system message is allowed), at least one exchange, string contents.
Used for the identity conversations written by `picochat gen-identity`.
"""
import json
from pathlib import Path

from picochat.tasks.common import Task, validate_messages


def parse_conversation_line(line: str, where: str) -> list:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg}); each line must be one conversation") from None
    if isinstance(obj, dict):
        if "messages" not in obj:
            raise ValueError(f"{where}: a JSON object must have a 'messages' list")
        obj = obj["messages"]
    validate_messages(obj, where)
    return obj


class CustomJSON(Task):

    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        self.filepath = Path(filepath)
        if not self.filepath.exists():
            raise FileNotFoundError(f"CustomJSON file {self.filepath} does not exist "
                                    "(for identity data run `picochat gen-identity`)")
        self.conversations = []
        with open(self.filepath, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    self.conversations.append(parse_conversation_line(line, f"{self.filepath}:{lineno}"))

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return {"messages": self.conversations[index]}
