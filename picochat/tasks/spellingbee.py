"""
SpellingBee and SimpleSpelling: synthetic tasks that teach a token-level model to see letters.

SpellingBee: "how many 'r' in strawberry?" in several languages; the answer spells the word out
(`strawberry:s,t,r,...` with no space before the first letter, exactly as the reference renders it),
counts letter by letter, double-checks with a python tool call `'word'.count('r')` and ends with `#### k`.
Evaluated like GSM8K. Each example is generated from its own seed (tasks.common.SyntheticTask).

SimpleSpelling: "Spell the word: apple" -> "apple:a,p,p,l,e".
Word list: dwyl/english-words words_alpha.txt (mirror: words/words_alpha.txt).
"""
import random

from picochat import fetch
from picochat.tasks.common import SyntheticTask, task_data_dir
from picochat.tasks.gsm8k import final_answer_matches

WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
LETTERS = "abcdefghijklmnopqrstuvwxyz"

# Our own phrasings; {letter} and {word} are filled in (optionally quoted).
TEMPLATES = [
    # English
    "How many {letter} are in the word {word}",
    "How many times does the letter {letter} appear in {word}",
    "Count the number of {letter} in {word}",
    "In the word {word}, how many {letter} are there",
    "How often does {letter} occur in {word}",
    "What is the count of the letter {letter} in {word}",
    "Can you tell me how many {letter}'s are in {word}",
    "Number of {letter} letters in {word}",
    "I need to know how many {letter} the word {word} contains",
    "Please count how many times {letter} shows up in the word {word}",
    # Spanish
    "¿Cuántas {letter} hay en la palabra {word}",
    "Cuenta cuántas veces aparece la letra {letter} en {word}",
    "¿Cuántas veces sale la {letter} en {word}",
    # French
    "Combien de {letter} y a-t-il dans le mot {word}",
    "Compte le nombre de lettres {letter} dans {word}",
    "Combien de fois la lettre {letter} apparaît-elle dans {word}",
    # German
    "Wie viele {letter} hat das Wort {word}",
    "Wie oft kommt der Buchstabe {letter} in {word} vor",
    "Zähle die Buchstaben {letter} im Wort {word}",
    # Italian / Portuguese
    "Quante {letter} ci sono nella parola {word}",
    "Quantas letras {letter} existem na palavra {word}",
    # Chinese
    "单词 {word} 中有几个 {letter}",
    "{word} 这个词里字母 {letter} 出现了几次",
    # Japanese
    "{word} という単語に {letter} はいくつありますか",
    "単語 {word} の中の {letter} の数を数えて",
    # Korean
    "{word} 단어에 {letter}가 몇 개 있나요",
    "{word}에서 글자 {letter}는 몇 번 나오나요",
]
QUOTES = ["", "'", '"']


def load_words() -> list:
    dest = task_data_dir() / "words" / "words_alpha.txt"
    path = fetch.download("words/words_alpha.txt", WORDS_URL, dest)
    words = [w.strip() for w in path.read_text(encoding="utf-8").splitlines()]
    words = [w for w in words if w and w.isascii() and w.isalpha()]
    if not words:
        raise RuntimeError(f"word list {path} is empty; delete it and retry the download")
    return words


def spelling_solution(word: str, letter: str) -> list:
    """The assistant's parts: manual spelled-out count, then the python double check, then '#### k'."""
    count = word.count(letter)
    text = (f"We need to count the letter '{letter}' in the word '{word}'. Let me spell it out first:\n\n"
            f"{word}:{','.join(word)}\n\nNow I go through it one letter at a time:\n")
    running = 0
    for i, ch in enumerate(word, 1):
        if ch == letter:
            running += 1
            text += f"{i}:{ch} hit! count={running}\n"
        else:
            text += f"{i}:{ch}\n"
    text += f"\nThis gives us {running}."
    return [
        {"type": "text", "text": text},
        {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
    ]


class _SyntheticWordTask(SyntheticTask):
    """A synthetic task over the word list."""

    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(size, split, **kwargs)
        self.words = load_words()


class SpellingBee(_SyntheticWordTask):

    def get_example(self, index):
        rng = self.rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        template = rng.choice(TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        lq, wq = rng.choice(QUOTES), rng.choice(QUOTES)
        user = template.format(letter=f"{lq}{letter}{lq}", word=f"{wq}{word}{wq}")
        if rng.random() < 0.5:
            user += "?"
        return {"messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": spelling_solution(word, letter)},
        ], "word": word, "letter": letter}

    def evaluate(self, conversation, response: str) -> int:
        return final_answer_matches(conversation, response)


class SimpleSpelling(_SyntheticWordTask):

    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(size, split, **kwargs)
        random.Random(42).shuffle(self.words)

    def get_example(self, index):
        word = self.rng(index).choice(self.words)
        return {"messages": [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": f"{word}:{','.join(word)}"},
        ]}

    def evaluate(self, conversation, response: str) -> int:
        return int(response.strip() == conversation["messages"][-1]["content"])
