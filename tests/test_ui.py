"""The web UI (picochat/ui.html) in headless Chromium, driven over the Chrome DevTools Protocol.
CDP runs over --remote-debugging-pipe (fds 3/4, NUL-separated JSON), so no websocket library and no
debugging port are needed. Skipped, with the reason, where Debian's chromium is not installed."""
import os
import json
import time
import fcntl
import shutil
import select
import tempfile
import subprocess

import pytest
import torch

from picochat.stages.serve import create_app
from picochat.server_thread import ServerThread

CHROMIUM = os.environ.get("PICOCHAT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"Chromium not found at {CHROMIUM} (apt-get install chromium, "
                                       "or set PICOCHAT_CHROMIUM) - the UI test needs a headless browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--mute-audio", "--remote-debugging-pipe"]

class Browser:
    """Minimal CDP client: one page target, commands in order, events ignored."""
    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="picochat-chromium-")
        to_child_r, self._w = os.pipe()     # we write commands, Chromium reads fd 3
        self._r, from_child_w = os.pipe()   # Chromium writes fd 4, we read
        def fds():  # in the child: our pipe ends become fds 3 and 4 (via high numbers, so nothing is clobbered)
            hi_r, hi_w = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 100), fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 100)
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)
        # pass_fds=(3, 4): close_fds runs after preexec_fn and keeps only these
        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     preexec_fn=fds, pass_fds=(3, 4),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self.buf, self.next_id, self.session = b"", 0, None
        try:
            # generous: a cold Chromium start on a loaded 2-core machine can take 15 s or more
            target = self.call("Target.createTarget", {"url": "about:blank"}, timeout=120)["targetId"]
            self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.call("Page.enable")
            self.call("Runtime.enable")
        except BaseException:
            self.close()
            raise

    def call(self, method, params=None, timeout=30):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise RuntimeError(f"CDP {method}: {reply['error']}")
                    return reply.get("result", {})
            left = deadline - time.time()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError(f"CDP {method}: no reply in {timeout}s")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium exited")
            self.buf += chunk

    def js(self, expr):
        r = self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"JS error in {expr!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expr, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expr)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"timed out waiting for {expr}")

    def open(self, url, width=1280, height=800, mobile=False, keep_history=False):
        """Load the page; unless keep_history, with this browser's saved conversations (localStorage) wiped first."""
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                         "deviceScaleFactor": 1, "mobile": mobile})
        self.call("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete' && !!document.getElementById('input')")
        if not keep_history:
            self.js("localStorage.clear()")
            self.call("Page.reload")
            self.wait_for("document.readyState === 'complete' && !!document.getElementById('input') && "
                          "typeof state === 'object' && state.chats.length === 1")

    def type_and_enter(self, text):
        self.js("document.getElementById('input').focus()")
        self.call("Input.insertText", {"text": text})
        for kind in ("keyDown", "keyUp"):  # a real Enter key press: the page's keydown handler sends
            self.call("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                                 "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13})

    def screenshot(self, path):
        import base64
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)
        shutil.rmtree(self.profile, ignore_errors=True)

@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()

@pytest.fixture(scope="module")
def stack(tiny_tokenizer):
    from picochat.gpt import GPTConfig, build_model
    from picochat.engine import Engine
    cfg = GPTConfig(sequence_len=64, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                    n_kv_head=2, n_embd=64, window_pattern="L")
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"))
    model.eval()
    return Engine(model, tiny_tokenizer), tiny_tokenizer

@pytest.fixture(scope="module")
def server(stack):
    engine, tok = stack
    # truncate_prompts: the page tests send long texts to a tiny-context model and check layout and streaming
    with ServerThread(create_app([(engine, tok, "cpu")], model_name="picochat-ui-test", truncate_prompts=True)) as srv:
        yield srv

def greedy_reply(stack, messages, max_tokens=512):
    """What the page must show for a temperature-0 request: the Engine's greedy completion, decoded."""
    engine, tok = stack
    prompt = engine.chat_prompt(messages, max_tokens)
    results, _ = engine.generate_batch(prompt, max_tokens=max_tokens, temperature=0.0, top_k=50)
    return tok.decode_bytes(results[0][len(prompt):]).decode("utf-8", errors="replace")

# answers: the raw text of each answer (the page renders it as Markdown), from the page's own state
STATE = """JSON.stringify({
  users: [...document.querySelectorAll('.msg.user')].map(e => e.textContent),
  answers: state.chats.find(c => c.id === state.current).messages.filter(m => m.role === 'assistant')
    .map(m => m.content),
  error: (document.querySelector('.error') || {}).textContent || null,
  busy: document.getElementById('send').textContent === 'Stop'})"""

def state(browser):
    return json.loads(browser.js(STATE))

def wait_idle(browser, n_answers):
    browser.wait_for(f"(() => {{ const s = {STATE.strip()}; const j = JSON.parse(s);"
                     f" return !j.busy && (j.answers.length === {n_answers} || j.error); }})()")
    return state(browser)

def test_chat_streams_a_reply_edit_and_regenerate(browser, server, stack, tmp_path):
    browser.open(server.url + "/")
    browser.wait_for("document.getElementById('status').className === 'ok'")  # /health checked on load
    assert browser.js("document.getElementById('banner').classList.contains('show')") is False
    browser.js("document.getElementById('temperature').value = '0'")  # greedy: the reply is predictable

    # HTML in a message is shown as text, never parsed
    text = "Hi <b>there</b> & <img src=x onerror=alert(1)>\n  indented"
    browser.type_and_enter(text)
    s = wait_idle(browser, 1)
    assert s["error"] is None
    assert s["users"] == [text]
    assert browser.js("document.querySelectorAll('.msg.user b, .msg.user img').length") == 0
    assert browser.js("getComputedStyle(document.querySelector('.msg.user')).whiteSpace") == "pre-wrap"
    expected = greedy_reply(stack, [{"role": "user", "content": text}])
    assert expected and s["answers"] == [expected]
    assert browser.js("document.getElementById('input').value") == ""
    browser.screenshot(tmp_path / "desktop.png")

    # a second turn, then regenerate the second answer: same (greedy) answer, no extra messages
    browser.type_and_enter("and then?")
    s = wait_idle(browser, 2)
    history = [{"role": "user", "content": text}, {"role": "assistant", "content": expected},
               {"role": "user", "content": "and then?"}]
    second = greedy_reply(stack, history)
    assert s["answers"] == [expected, second]
    browser.js("document.querySelectorAll('.msg.assistant .regen')[1].click()")
    s = wait_idle(browser, 2)
    assert s["users"] == [text, "and then?"] and s["answers"] == [expected, second]

    # edit the first user message: the conversation is truncated there and resent
    browser.js("document.querySelector('.msg.user').click()")
    browser.wait_for("!!document.querySelector('.edit-box textarea')")
    browser.js("document.querySelector('.edit-box textarea').value = 'What is 6*7?'")
    browser.js("[...document.querySelectorAll('.edit-box button')].find(b => b.textContent.startsWith('Save')).click()")
    s = wait_idle(browser, 1)
    assert s["users"] == ["What is 6*7?"]
    assert s["answers"] == [greedy_reply(stack, [{"role": "user", "content": "What is 6*7?"}])]

    # new conversation clears everything
    browser.js("document.getElementById('new-chat').click()")
    assert state(browser)["users"] == [] and state(browser)["answers"] == []

def test_shift_enter_does_not_send(browser, server):
    browser.open(server.url + "/")
    browser.js("document.getElementById('input').focus()")
    browser.call("Input.insertText", {"text": "line one"})
    for kind in ("keyDown", "keyUp"):  # modifiers 8 = Shift
        browser.call("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter", "modifiers": 8,
                                                "windowsVirtualKeyCode": 13, "text": "\r" if kind == "keyDown" else ""})
    time.sleep(0.2)
    s = state(browser)
    assert s["users"] == [] and not s["busy"]
    assert browser.js("document.getElementById('input').value").startswith("line one")

def test_errors_show_in_a_red_box(browser, server):
    browser.open(server.url + "/")
    browser.js("document.getElementById('temperature').value = '0'")
    browser.type_and_enter("x" * 9000)  # over the server's 8000-character limit -> HTTP 400
    s = wait_idle(browser, 0)
    assert "too long" in s["error"]
    # the rejected message is not kept in the conversation; it goes back to the input box to be fixed
    assert s["users"] == [] and browser.js("document.getElementById('input').value") == "x" * 9000
    assert browser.js("getComputedStyle(document.querySelector('.error')).color") == "rgb(153, 27, 27)"

def test_phone_width_has_no_horizontal_overflow(browser, server, tmp_path):
    browser.open(server.url + "/", width=375, height=740, mobile=True)
    browser.js("document.getElementById('temperature').value = '0'")
    browser.type_and_enter("a" * 300 + " a long unbroken word, then some text")
    s = wait_idle(browser, 1)
    assert s["error"] is None and s["answers"][0]
    widths = browser.js("""[document.documentElement.scrollWidth, document.body.scrollWidth, window.innerWidth,
        Math.max(...[...document.querySelectorAll('body *')].map(e => e.getBoundingClientRect().right))]""")
    doc, body, inner, rightmost = widths
    assert inner == 375 and doc <= inner and body <= inner and rightmost <= inner + 0.5, widths
    send = browser.js("JSON.stringify(document.getElementById('send').getBoundingClientRect())")
    assert json.loads(send)["right"] <= 375
    browser.screenshot(tmp_path / "phone.png")

def test_model_not_loaded_banner(browser):
    with ServerThread(create_app([], model_name="none")) as srv:
        browser.open(srv.url + "/")
        banner = browser.wait_for("document.getElementById('banner').classList.contains('show') && "
                                  "document.getElementById('banner').textContent")
        assert "Model not loaded" in banner

# -----------------------------------------------------------------------------
# Markdown, tool blocks, history, settings, stop, favicon, dark mode

class ScriptedEngine:
    """Answers every request with the same text, token by token (optionally slowly): what the page must render."""
    def __init__(self, tok, text, delay=0.0):
        from types import SimpleNamespace
        self.tok, self.ids, self.delay, self.yielded = tok, tok.encode(text), delay, 0
        self.model = SimpleNamespace(config=SimpleNamespace(sequence_len=256))
    def chat_prompt(self, messages, max_tokens):
        return [self.tok.get_bos_token_id()]
    def generate(self, prompt, num_samples=1, max_tokens=None, **kw):
        for t in self.ids[:max_tokens] + [self.tok.encode_special("<|assistant_end|>")]:
            time.sleep(self.delay)
            self.yielded += 1
            yield [t] * num_samples, [1] * num_samples

MARKDOWN = """# Title

Some **bold** and `inline` code, a [link](https://example.com).

```python
def double(x):
    return x * 2
```

<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"><a href="javascript:window.pwned = 3">j</a>
<|python_start|>'ab'.upper()<|python_end|><|output_start|>AB<|output_end|> done."""

def test_markdown_code_and_tool_calls_render_safely(browser, stack):
    _, tok = stack
    with ServerThread(create_app([(ScriptedEngine(tok, MARKDOWN), tok, "cpu")], model_name="md")) as srv:
        browser.open(srv.url + "/")
        browser.type_and_enter("show me")
        s = wait_idle(browser, 1)
        assert s["error"] is None and s["answers"] == [MARKDOWN]
        q = lambda sel: f"document.querySelector('.msg.assistant .text {sel}')"
        assert browser.js(q("h1") + ".textContent") == "Title"
        assert browser.js(q("strong") + ".textContent") == "bold"
        assert browser.js(q("p code") + ".textContent") == "inline"
        assert browser.js(q('a[href="https://example.com"]') + ".target") == "_blank"
        # the code block is highlighted: highlight.js marked it up (def is a keyword)
        assert browser.js(q("pre code.hljs") + ".textContent").startswith("def double(x):")
        assert browser.js(q("pre code .hljs-keyword") + ".textContent") == "def"
        # the tool call is a collapsible block with the code and its output, not markup
        assert browser.js(q("details.tool summary") + ".textContent").startswith("python")
        assert browser.js(q("details.tool code") + ".textContent") == "'ab'.upper()"
        assert browser.js(q("details.tool .tool-output") + ".textContent") == "AB"
        assert "<|python_start|>" not in browser.js("document.querySelector('.msg.assistant .text').textContent")
        # nothing the model wrote can run: no script, no handler, no javascript: link
        time.sleep(0.3)
        assert browser.js("typeof window.pwned") == "undefined"
        assert browser.js("document.querySelectorAll('.msg.assistant script, .msg.assistant [onerror], "
                          ".msg.assistant a[href^=\"javascript\"]').length") == 0
        assert browser.js("typeof marked + typeof DOMPurify + typeof hljs") == "objectfunctionobject"  # the libraries loaded (marked is a namespace)

def test_history_survives_a_reload_and_can_be_switched_and_deleted(browser, server, stack):
    browser.open(server.url + "/")
    browser.js("document.getElementById('temperature').value = '0'")
    browser.type_and_enter("first chat")
    first = wait_idle(browser, 1)["answers"]
    browser.js("document.getElementById('new-chat').click()")
    browser.type_and_enter("second chat")
    wait_idle(browser, 1)
    browser.open(server.url + "/", keep_history=True)  # a reload: both conversations are still there
    titles = browser.js("[...document.querySelectorAll('#chats li .open')].map(b => b.textContent)")
    assert titles == ["second chat", "first chat"]  # newest first; the last one used is open
    assert state(browser)["users"] == ["second chat"]
    browser.js("document.querySelectorAll('#chats li .open')[1].click()")
    s = state(browser)
    assert s["users"] == ["first chat"] and s["answers"] == first
    browser.js("document.querySelectorAll('#chats li .delete')[0].click()")  # delete "second chat"
    browser.open(server.url + "/", keep_history=True)
    assert browser.js("[...document.querySelectorAll('#chats li .open')].map(b => b.textContent)") == ["first chat"]

def test_system_prompt_max_tokens_stats_and_copy(browser, server, stack):
    browser.open(server.url + "/")
    browser.call("Browser.grantPermissions", {"permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    browser.js("document.getElementById('temperature').value = '0'")
    browser.js("document.getElementById('max-tokens').value = '5'")
    browser.js("document.getElementById('system-box').open = true")
    browser.js("document.getElementById('system').value = 'Be brief.'")
    browser.type_and_enter("hi")
    s = wait_idle(browser, 1)
    # the system prompt went to the server (the engine merges it into the first user turn)
    assert s["answers"] == [greedy_reply(stack, [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "hi"}], max_tokens=5)]
    stats = browser.js("document.querySelector('.msg.assistant .stats').textContent")
    n = int(stats.split(" tokens")[0])
    assert 1 <= n <= 5 and "context" in stats and "/ 64" in stats, stats
    browser.js("document.querySelector('.msg.assistant .copy').click()")
    assert browser.wait_for("document.querySelector('.msg.assistant .copy').textContent === 'Copied'")
    browser.wait_for("document.querySelector('.msg.assistant .copy').textContent === 'Copy'", timeout=5)

def test_stop_cancels_the_generation_on_the_server(browser, stack):
    _, tok = stack
    slow = ScriptedEngine(tok, "word " * 200, delay=0.05)
    with ServerThread(create_app([(slow, tok, "cpu")], model_name="slow")) as srv:
        browser.open(srv.url + "/")
        browser.type_and_enter("go")
        browser.wait_for("state.chats.find(c => c.id === state.current).messages.some(m => m.role === 'assistant' "
                         "&& m.content.length > 0)")
        browser.js("document.getElementById('send').click()")  # the button says Stop while busy
        wait_idle(browser, 1)
        deadline = time.time() + 10
        while time.time() < deadline:
            stats = json.loads(browser.js("fetch('/stats').then(r => r.text())"))
            if stats["requests_cancelled"] == 1 and stats["available_workers"] == 1:
                break
            time.sleep(0.1)
        assert stats["requests_cancelled"] == 1 and stats["available_workers"] == 1, stats
        assert slow.yielded < 150

def test_favicon_static_files_and_dark_mode(browser, server):
    import hashlib
    import re
    from pathlib import Path
    import httpx
    assert httpx.get(server.url + "/favicon.ico").headers["content-type"] == "image/svg+xml"
    for name in ("vendor/marked.umd.js", "vendor/purify.min.js", "vendor/highlight.min.js", "favicon.svg",
                 "vendor/licenses/dompurify.LICENSE"):
        assert httpx.get(server.url + "/static/" + name).status_code == 200, name
    for bad in ("../ui.html", "vendor/../../ui.html", "nope.js", "%2e%2e/ui.html"):
        assert httpx.get(server.url + "/static/" + bad).status_code == 404, bad
    vendor = Path(__file__).resolve().parents[1] / "picochat" / "static" / "vendor"
    for name, digest in re.findall(r"\| (\S+\.(?:js|css)) \|.*\| ([0-9a-f]{64}) \|", (vendor / "README.md").read_text()):
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name  # the vendored files are unchanged
    browser.open(server.url + "/")
    assert browser.js("document.querySelector('link[rel=icon]').getAttribute('href')") == "/static/favicon.svg"
    for scheme, bg in (("dark", "rgb(13, 17, 23)"), ("light", "rgb(255, 255, 255)")):
        browser.call("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": scheme}]})
        assert browser.js("getComputedStyle(document.body).backgroundColor") == bg, scheme
