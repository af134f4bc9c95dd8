r"""
Synthetic identity conversations: teach the chat model its name and what it is.

Writes get_base_dir()/identity_conversations.jsonl (one JSON array of messages per line, the CustomJSON
format that chat-sft mixes in twice). Every claim comes from a user-editable knowledge file
(picochat/data/identity_knowledge.md by default; its header explains the format).

Two generators:
  * templates (default, offline, seconds): diverse by construction: persona x topic x question wording x
    conversation dynamic (Q&A, greeting first, follow-ups, skeptic, misconception, multi-topic...),
    each conversation seeded by (seed, index);
  * any OpenAI-compatible chat endpoint (--api-base/--api-key/--model): the LLM writes each conversation
    from the knowledge file and a sampled persona/topic/dynamic; every result is validated (alternation,
    non-empty, length, ASCII assistant text); invalid ones are retried, then dropped, and counted.

Examples:
    picochat gen-identity                                   # 1000 template conversations
    picochat gen-identity --num 2000 --knowledge my_facts.md --output /tmp/identity.jsonl
    picochat gen-identity --api-base https://openrouter.ai/api/v1 --api-key $OPENROUTER_API_KEY \
        --model google/gemini-3-flash-preview --num 1000 --workers 8
"""
import re
import json
import random
import argparse
import threading
import logging
from pathlib import Path
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import requests

from picochat import PACKAGE_DIR
from picochat.common import HelpFormatter, atomic_path
from picochat.tasks import identity_path

log = logging.getLogger("picochat.gen_identity")

DEFAULT_KNOWLEDGE = PACKAGE_DIR / "data" / "identity_knowledge.md"

# -----------------------------------------------------------------------------
# Knowledge file

def parse_knowledge(text: str, where: str = "knowledge file") -> dict:
    """-> {"name", "creator", "topics": {topic: {"questions": [...], "facts": [...]}}, "text"}"""
    kb = {"name": None, "creator": "its developers", "topics": {}, "text": text}
    topic = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or (line.startswith("#") and not line.startswith("##")):
            continue
        if line.startswith("## "):
            topic = line[3:].strip().lower()
            kb["topics"].setdefault(topic, {"questions": [], "facts": []})
        elif line.lower().startswith("name:") and topic is None:
            kb["name"] = line.split(":", 1)[1].strip()
        elif line.lower().startswith("creator:") and topic is None:
            kb["creator"] = line.split(":", 1)[1].strip()
        elif line.startswith("Q:") and topic is not None:
            kb["topics"][topic]["questions"].append(line[2:].strip())
        elif line.startswith("- ") and topic is not None:
            kb["topics"][topic]["facts"].append(line[2:].strip())
        else:
            raise ValueError(f"{where}:{lineno}: cannot parse {line!r}; expected 'name:', '## topic', "
                             "'Q: question' or '- fact' (see the header of picochat/data/identity_knowledge.md)")
    if not kb["name"]:
        raise ValueError(f"{where}: missing a 'name: <model name>' line before the first topic")
    kb["topics"] = {t: v for t, v in kb["topics"].items() if v["facts"]}
    if not kb["topics"]:
        raise ValueError(f"{where}: no topic has any '- fact' lines")
    for t, v in kb["topics"].items():
        if not v["questions"]:
            v["questions"].append(f"Tell me about your {t}.")
    return kb

def load_knowledge(path=None) -> dict:
    path = Path(path) if path else DEFAULT_KNOWLEDGE
    if not path.exists():
        raise FileNotFoundError(f"knowledge file {path} not found (pass --knowledge PATH)")
    return parse_knowledge(path.read_text(encoding="utf-8"), str(path))

# -----------------------------------------------------------------------------
# Template generator

def _plain(q):       return q
def _casual(q):      return q[0].lower() + q[1:].rstrip("?.") if q else q
def _terse(q):       return re.sub(r"[?.!]+$", "", q).lower()
def _polite(q):      return f"Excuse me, {q[0].lower() + q[1:]}"
def _student(q):     return f"I'm learning about AI for a class. {q}"
def _developer(q):   return f"Quick question from a developer: {q[0].lower() + q[1:]}"
def _skeptic(q):     return f"{q} And please be honest."
def _enthusiast(q):  return f"{q} I'm really curious!"
def _kid(q):         return f"hi!! {q.lower()}"
def _teacher(q):     return f"I'm preparing a lesson about chatbots. {q}"
def _shouty(q):      return q.upper()
def _nonnative(q):   return f"Sorry for my english. {q}"

PERSONAS = {"plain": _plain, "casual": _casual, "terse": _terse, "polite": _polite, "student": _student,
            "developer": _developer, "skeptic": _skeptic, "enthusiast": _enthusiast, "kid": _kid,
            "teacher": _teacher, "shouty": _shouty, "nonnative": _nonnative}

GREETINGS_EN = ["hi", "Hello!", "hey there", "Good morning!", "yo", "Hi, how are you?", "hello?", "Hey!"]
GREETINGS_OTHER = ["hola", "Bonjour !", "Hallo!", "Ciao", "Olá", "こんにちは", "你好", "안녕하세요", "Привет"]
OPENERS = ["", "", "Sure! ", "Good question. ", "Happy to explain. ", "Of course. ", "Great question! "]
CLOSERS = ["", "", "", " Is there anything else you would like to know?", " Let me know if you have more questions.",
           " Happy to help with anything else."]
FOLLOW_UPS = ["Tell me more.", "Interesting, can you say more?", "And?", "What else?", "Go on.",
              "Can you elaborate on that?"]
THANKS = ["thanks!", "Thank you, that helps.", "cool, thanks", "Great, thanks a lot!", "ok got it"]
CHALLENGES = ["I don't believe you.", "Are you sure about that?", "Really? Prove it.", "That sounds made up.",
              "Hmm, I think you're lying."]
MISCONCEPTIONS = ["You're ChatGPT, right?", "So you were made by OpenAI?", "Are you a real person typing?",
                  "You must be a huge model like GPT-4.", "You can look things up online for me, right?"]

DYNAMICS = ["qa", "greeting_then_question", "follow_up", "multi_topic", "skeptical", "thanks_close",
            "misconception", "deep_dive", "foreign_greeting", "qa"]


def _sub(s, kb):
    return s.replace("{name}", kb["name"]).replace("{creator}", kb["creator"])

def _answer(rng, kb, topic, used=None, k=None):
    facts = [f for f in kb["topics"][topic]["facts"] if not used or f not in used]
    facts = facts or kb["topics"][topic]["facts"]
    k = k or rng.randint(1, min(3, len(facts)))
    chosen = rng.sample(facts, min(k, len(facts)))
    if used is not None:
        used.update(chosen)
    return _sub(rng.choice(OPENERS) + " ".join(chosen) + rng.choice(CLOSERS), kb).strip()

def _identity_line(kb):
    return f"I'm {kb['name']}, an AI assistant made by {kb['creator']}."

def template_conversation(kb: dict, seed: int, idx: int) -> list:
    """One conversation, a pure function of (knowledge, seed, idx)."""
    rng = random.Random(seed * 1_000_003 + idx)
    persona = PERSONAS[rng.choice(sorted(PERSONAS))]
    topics = sorted(kb["topics"])
    topic = rng.choice(topics)
    ask = lambda t: persona(_sub(rng.choice(kb["topics"][t]["questions"]), kb))
    dyn = rng.choice(DYNAMICS)
    used, msgs = set(), []
    def turn(user, assistant):
        msgs.extend([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}])
    if dyn == "greeting_then_question":
        turn(rng.choice(GREETINGS_EN), f"Hello! {_identity_line(kb)} How can I help you today?")
        turn(ask(topic), _answer(rng, kb, topic, used))
    elif dyn == "foreign_greeting":
        turn(rng.choice(GREETINGS_OTHER), f"Hello! {_identity_line(kb)} I work best in English, but I will "
             "do my best in other languages. How can I help?")
        turn(ask(topic), _answer(rng, kb, topic, used))
    elif dyn == "follow_up":
        turn(ask(topic), _answer(rng, kb, topic, used, k=1))
        turn(persona(rng.choice(FOLLOW_UPS)), _answer(rng, kb, topic, used))
    elif dyn == "multi_topic":
        for t in rng.sample(topics, min(3, len(topics))):
            turn(ask(t), _answer(rng, kb, t, used))
    elif dyn == "deep_dive":
        turn(ask(topic), _answer(rng, kb, topic, used, k=1))
        for _ in range(rng.randint(1, 3)):
            t = rng.choice(topics)
            turn(ask(t) if rng.random() < 0.6 else persona(rng.choice(FOLLOW_UPS)), _answer(rng, kb, t, used))
    elif dyn == "skeptical":
        turn(ask(topic), _answer(rng, kb, topic, used))
        turn(persona(rng.choice(CHALLENGES)), f"I understand the doubt, and I try to be honest. "
             f"{_identity_line(kb)} {_answer(rng, kb, topic, used, k=1)}")
    elif dyn == "thanks_close":
        turn(ask(topic), _answer(rng, kb, topic, used))
        turn(rng.choice(THANKS), rng.choice(["You're welcome!", "Glad I could help!", "Anytime!"])
             + f" - {kb['name']}" * (rng.random() < 0.3))
    elif dyn == "misconception":
        first = "identity" if "identity" in kb["topics"] else topic
        turn(persona(rng.choice(MISCONCEPTIONS)), f"Not quite. {_identity_line(kb)} "
             f"{_answer(rng, kb, first, used, k=2)}")
        if rng.random() < 0.5:
            turn(ask(topic), _answer(rng, kb, topic, used))
    else:  # qa
        turn(ask(topic), _answer(rng, kb, topic, used))
    return msgs

# -----------------------------------------------------------------------------
# Validation (every conversation, whichever generator wrote it)

MAX_CHARS = 4000

def validate_conversation(msgs) -> str | None:
    """None when valid, else the reason."""
    if isinstance(msgs, dict):
        msgs = msgs.get("messages")
    if not isinstance(msgs, list) or len(msgs) < 2:
        return "not a list of at least 2 messages"
    if len(msgs) > 16:
        return f"too many messages ({len(msgs)})"
    for i, m in enumerate(msgs):
        role = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or m.get("role") != role:
            return f"message {i} is not a {role} message (roles must alternate, user first)"
        c = m.get("content")
        if not isinstance(c, str) or not c.strip():
            return f"message {i} is empty or not a string"
        if len(c) > MAX_CHARS:
            return f"message {i} is too long ({len(c)} chars)"
        if role == "assistant":
            non_ascii = sum(ord(ch) > 127 for ch in c)
            if non_ascii > 0.02 * len(c):
                return f"message {i} (assistant) is not plain ASCII text"
    if len(msgs) % 2:
        return "conversation ends with a user message"
    return None

# -----------------------------------------------------------------------------
# OpenAI-compatible endpoint

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["messages"],
          "properties": {"messages": {"type": "array", "items": {
              "type": "object", "additionalProperties": False, "required": ["role", "content"],
              "properties": {"role": {"type": "string", "enum": ["user", "assistant"]},
                             "content": {"type": "string"}}}}}}

def api_prompt(kb: dict, rng: random.Random) -> list:
    topic = rng.choice(sorted(kb["topics"]))
    persona = rng.choice(sorted(PERSONAS))
    dyn = rng.choice(DYNAMICS)
    firsts = rng.sample(GREETINGS_EN + GREETINGS_OTHER + MISCONCEPTIONS, 3)
    system = (f"You write training conversations between a user and an AI assistant named {kb['name']}. "
              "Rules: the assistant writes plain ASCII only; it states only facts from the knowledge base "
              "below; it is honest about its limitations; when the user writes in another language it "
              "briefly notes it works best in English; it gently corrects misconceptions. "
              "Return JSON {\"messages\": [{\"role\": \"user\"|\"assistant\", \"content\": str}, ...]}, "
              "alternating user/assistant, starting with the user.\n\nKNOWLEDGE BASE:\n" + kb["text"])
    user = (f"Write one conversation. User persona: {persona}. Topic: {topic}. Conversation dynamic: {dyn} "
            f"(2 to 8 messages). Inspiration for the user's first message (pick a style, do not copy): "
            + " | ".join(firsts))
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]

def parse_api_content(content: str):
    content = content.strip()
    m = re.match(r"^```(?:json)?\s*(.*?)\s*```$", content, re.DOTALL)
    if m:
        content = m.group(1)
    obj = json.loads(content)
    return obj["messages"] if isinstance(obj, dict) else obj

_STATS_LOCK = threading.Lock()

def api_conversation(kb, args, idx, stats) -> list | None:
    rng = random.Random(args.seed * 1_000_003 + idx)
    url = args.api_base.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    for attempt in range(args.retries + 1):
        body = {"model": args.model, "messages": api_prompt(kb, rng), "temperature": args.temperature}
        if not args.no_schema:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "conversation", "strict": True, "schema": SCHEMA}}
        try:
            r = requests.post(url, headers=headers, json=body, timeout=args.timeout)
            r.raise_for_status()
            msgs = parse_api_content(r.json()["choices"][0]["message"]["content"])
            msgs = [{"role": m["role"], "content": m["content"]} if isinstance(m, dict) else m for m in msgs]
            reason = validate_conversation(msgs)
        except Exception as e:  # network, HTTP, JSON, shape: all count as a failed attempt
            reason = f"{type(e).__name__}: {e}"
        if reason is None:
            return msgs
        with _STATS_LOCK:   # worker threads share the counters
            stats["invalid"] += 1
            stats.setdefault("reasons", []).append(reason)
        log.debug(f"conversation {idx} attempt {attempt}: {reason}")
    with _STATS_LOCK:
        stats["dropped"] += 1
    return None

# -----------------------------------------------------------------------------

def write_jsonl(path, convs, append=False):
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines() if (append and path.exists()) else []
    lines += [json.dumps(c, ensure_ascii=False) for c in convs]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")

def generate_templates(kb, num, seed=42) -> list:
    """num conversations, exact duplicates removed (up to 20*num draws)."""
    seen, out, idx = set(), [], 0
    while len(out) < num and idx < 20 * num:
        conv = template_conversation(kb, seed, idx)
        idx += 1
        key = json.dumps(conv)
        if key in seen:
            continue
        assert validate_conversation(conv) is None, validate_conversation(conv)
        seen.add(key)
        out.append(conv)
    return out

def main(argv=None):
    p = argparse.ArgumentParser(prog="picochat gen-identity", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--num", type=int, default=1000, help="number of conversations")
    p.add_argument("--output", type=str, default=None, help="default: $PICOCHAT_HOME/identity_conversations.jsonl")
    p.add_argument("--append", action="store_true", help="append to an existing output file")
    p.add_argument("--knowledge", type=str, default=None, help=f"knowledge file (default {DEFAULT_KNOWLEDGE})")
    p.add_argument("--seed", type=int, default=42, help='seed of the template sampling')
    p.add_argument("--api-base", type=str, default=None,
                   help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1 (default: none, "
                        "template-generated conversations)")
    p.add_argument("--api-key", type=str, default=None,
                   help="API key of --api-base, sent as a Bearer token (default: none)")
    p.add_argument("--model", type=str, default=None,
                   help="model name at the endpoint (default: the endpoint's default for --api-base)")
    p.add_argument("--temperature", type=float, default=1.0, help='sampling temperature of the LLM (--api-base)')
    p.add_argument("--workers", type=int, default=4, help="parallel API requests")
    p.add_argument("--retries", type=int, default=2, help="extra attempts per conversation when invalid")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per API request")
    p.add_argument("--no-schema", action="store_true", help="do not send a JSON-schema response_format")
    args = p.parse_args(argv)
    if args.num < 1:
        p.error("--num must be >= 1")
    kb = load_knowledge(args.knowledge)
    out = Path(args.output) if args.output else identity_path()
    if args.api_base:
        if not args.model:
            p.error("--api-base needs --model (the model name at that endpoint)")
        stats = {"invalid": 0, "dropped": 0}
        with ThreadPoolExecutor(max(1, args.workers)) as pool:
            results = list(pool.map(lambda i: api_conversation(kb, args, i, stats), range(args.num)))
        convs = [c for c in results if c is not None]
        print(f"API: {len(convs)}/{args.num} valid conversations; {stats['invalid']} invalid attempts, "
              f"{stats['dropped']} dropped after {args.retries + 1} attempts")
        for reason, n in sorted(Counter(stats.get("reasons", [])).items(), key=lambda kv: -kv[1])[:5]:
            print(f"  {n} x {reason[:160]}")
        if not convs:
            print("error: the endpoint produced no valid conversation; check --api-base/--model/--api-key "
                  "(run with a small --num to debug)")
            return 1
    else:
        convs = generate_templates(kb, args.num, args.seed)
        if len(convs) < args.num:
            log.warning(f"only {len(convs)} distinct template conversations could be made; add questions or "
                        "facts to the knowledge file for more variety")
    write_jsonl(out, convs, append=args.append)
    print(f"wrote {len(convs)} conversations to {out}")
    return 0
