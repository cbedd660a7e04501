"""`llmbook serve` over real HTTP on 127.0.0.1: the OpenAI completions API (plain and streamed,
as the `openai` client speaks it), its errors, 50 requests at once, the page, and the command."""

import json
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from llmbook.cli import main
from llmbook.data import poem_header
from llmbook.env import REPO_ROOT
from llmbook.generate import generate
from llmbook.model import GPT, GPTConfig
from llmbook.pretrained import load_pretrained
from llmbook.serve import MAX_BODY, MAX_TOKENS, create_app, running
from llmbook.tokenizer import CharTokenizer
from llmbook.verse import FORM_SHAPES

TOK = CharTokenizer(dict.fromkeys("白日依山尽黄河入海流欲穷千里目更上一层楼，。\n五言绝句《》"))
PROMPT = "五言绝句《白日》"
TIMEOUT = 60  # seconds for one request (the machine may be busy)


@pytest.fixture(scope="module")
def tiny():
    """A tiny random GPT: fast, and its samples differ from seed to seed."""
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=TOK.vocab_size, n_layer=1, n_head=2,
                         n_embd=32)).eval()


@pytest.fixture(scope="module")
def url(tiny):
    with running(create_app(tiny, TOK, "tiny")) as base:
        yield base


@pytest.fixture(scope="module")
def shipped_url():
    model, tokenizer = load_pretrained("poetry-small", "cpu")
    with running(create_app(model, tokenizer, "poetry-small")) as base:
        yield base


def post(url: str, body=None, content: bytes | None = None, timeout: float = TIMEOUT,
         **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, content=content, timeout=timeout, **kw)


def complete(url: str, **body) -> dict:
    r = post(url, {"prompt": PROMPT, **body})
    assert r.status_code == 200, r.text
    return r.json()


def complete_streamed(url: str, **body) -> list[dict]:
    """The chunks of a streamed completion, checking the server-sent events' framing."""
    r = post(url, {"prompt": PROMPT, **body, "stream": True})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], events[-3:]
    assert all(e.startswith("data: ") for e in events[:-2])
    return [json.loads(e.removeprefix("data: ")) for e in events[:-2]]


def check_completion(c: dict, name: str, n_prompt: int, finish: str | None, usage: bool = True):
    assert set(c) == {"id", "object", "created", "model", "choices", "usage"}
    assert c["id"].startswith("cmpl-") and c["object"] == "text_completion"
    assert c["model"] == name and abs(c["created"] - time.time()) < 600
    (choice,) = c["choices"]
    assert choice.keys() == {"text", "index", "logprobs", "finish_reason"}
    assert isinstance(choice["text"], str) and choice["index"] == 0
    assert choice["logprobs"] is None and choice["finish_reason"] == finish
    if usage:
        u = c["usage"]
        assert u["prompt_tokens"] == n_prompt and u["completion_tokens"] >= 1
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    else:
        assert c["usage"] is None


def joined(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["text"] for c in chunks)


def expected_ids(model, max_tokens: int, seed: int, **kw) -> list[int]:
    """The tokens llmbook.generate writes after PROMPT in this process."""
    idx = torch.tensor([TOK.encode(PROMPT)])
    out = generate(model, idx, max_tokens, generator=torch.Generator().manual_seed(seed), **kw)
    return out[0, idx.size(1):].tolist()


def expected_text(model, max_tokens: int, seed: int, **kw) -> str:
    """What the server must send: the text of those tokens (<unk> is 5 characters)."""
    return TOK.decode(expected_ids(model, max_tokens, seed, **kw))


# ----------------------------------------------------------------------------- good requests

def test_health_models_and_page(url):
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/v1/models").json() == {
        "object": "list", "data": [{"id": "tiny", "object": "model", "owned_by": "llmbook"}]}
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # the four regular forms, in the corpus's spelling, and nothing fetched from elsewhere
    assert re.findall(r'<option value="([^"]+)"', page.text) == list(FORM_SHAPES)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text)
    assert "fetch(\"/v1/completions\"" in page.text and "stream: true" in page.text


def test_a_completion_is_what_generate_writes(url, tiny):
    c = complete(url, model="tiny", max_tokens=12, temperature=0.9, top_k=8, seed=3)
    check_completion(c, "tiny", len(PROMPT), "length")
    assert c["usage"]["completion_tokens"] == 12
    assert c["choices"][0]["text"] == expected_text(tiny, 12, 3, temperature=0.9, top_k=8)
    omitted = complete(url, max_tokens=12, temperature=0.9, top_k=8, seed=3)  # no "model"
    assert omitted["choices"] == c["choices"] and omitted["id"] != c["id"]
    greedy = complete(url, max_tokens=10, temperature=0)
    assert greedy["choices"][0]["text"] == expected_text(tiny, 10, 0, greedy=True)
    nucleus = complete(url, max_tokens=10, top_p=0.5, seed=1)
    assert nucleus["choices"][0]["text"] == expected_text(tiny, 10, 1, top_p=0.5)
    assert complete(url, seed=5)["usage"]["completion_tokens"] == 16  # OpenAI's default


def test_same_seed_same_text_other_seed_other_text(url):
    texts = [complete(url, max_tokens=24, seed=s)["choices"][0]["text"] for s in (7, 7, 8)]
    assert texts[0] == texts[1] != texts[2]


@pytest.mark.parametrize("settings", [dict(seed=11, temperature=1.2), dict(temperature=0),
                                      dict(seed=2, top_k=3, top_p=0.9)])
def test_streamed_pieces_add_up_to_the_plain_completion(url, settings):
    plain = complete(url, max_tokens=20, **settings)
    chunks = complete_streamed(url, max_tokens=20, **settings)
    assert len(chunks) > 1
    for c in chunks[:-1]:
        check_completion(c, "tiny", len(PROMPT), None, usage=False)
        assert c["id"] == chunks[0]["id"] and c["choices"][0]["text"]
    check_completion(chunks[-1], "tiny", len(PROMPT), "length")
    assert chunks[-1]["usage"] == plain["usage"]
    assert joined(chunks) == plain["choices"][0]["text"]


def test_stop_strings_end_the_completion_before_them(url, tiny):
    ids = expected_ids(tiny, 30, 4)
    full = TOK.decode(ids)
    stop = full[10:12]  # a string the completion is known to contain
    end = full.index(stop)
    n_tokens = next(n for n in range(31) if stop in TOK.decode(ids[:n]))  # generated up to it
    for kind in (complete, complete_streamed):
        chunks = kind(url, max_tokens=30, seed=4, stop=stop)
        chunks = chunks if isinstance(chunks, list) else [chunks]
        assert joined(chunks) == full[:end]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["usage"]["completion_tokens"] == n_tokens
    # the earliest of several stops wins; one that never completes holds nothing back for good
    earliest = complete(url, max_tokens=30, seed=4, stop=["\x00", full[20:22], stop])
    assert earliest["choices"][0]["text"] == full[:min(end, full.index(full[20:22]))]
    never = complete_streamed(url, max_tokens=30, seed=4, stop=[full[3] + "\x00"])
    assert joined(never) == full and never[-1]["choices"][0]["finish_reason"] == "length"


# ----------------------------------------------------------------------------- bad requests

LONG_PROMPT = "白" * 33  # the tiny model's context is 32
BAD = [  # (body: JSON-able, or bytes sent as they are), status, param, words in the message
    (b"{not json", 400, None, "not valid JSON"),
    (b"", 400, None, "not valid JSON"),
    (b"\xff\xfe\x00garbage", 400, None, "not valid JSON"),
    (b"[" * 100_00 + b"]" * 100_00, 400, None, "not valid JSON"),  # nested deeper than Python
    ([PROMPT], 400, None, "must be a JSON object, got a list"),
    ("a poem", 400, None, "must be a JSON object, got a str"),
    ({"model": "gpt-4", "prompt": PROMPT}, 404, "model", "'gpt-4' does not exist"),
    ({"max_tokens": 4}, 400, "prompt", "prompt: field required"),
    ({"prompt": ""}, 400, "prompt", "prompt is empty"),
    ({"prompt": [PROMPT]}, 400, "prompt", "valid string"),
    ({"prompt": 5}, 400, "prompt", "valid string"),
    ({"prompt": LONG_PROMPT}, 400, "prompt", "33 tokens long, longer than the model's context"),
    ({"prompt": "Hello 白日"}, 400, "prompt", "'H' (U+0048)"),
    ({"prompt": PROMPT, "temperature": -1}, 400, "temperature", "greater than or equal to 0"),
    ({"prompt": PROMPT, "temperature": "hot"}, 400, "temperature", "valid number"),
    ({"prompt": PROMPT, "temperature": True}, 400, "temperature", "valid number"),
    (b'{"prompt": "' + PROMPT.encode() + b'", "temperature": NaN}', 400, "temperature",
     "finite number"),
    (b'{"prompt": "' + PROMPT.encode() + b'", "temperature": 1e999}', 400, "temperature",
     "finite number"),
    ({"prompt": PROMPT, "top_k": 0}, 400, "top_k", "greater than or equal to 1"),
    ({"prompt": PROMPT, "top_k": -3}, 400, "top_k", "greater than or equal to 1"),
    ({"prompt": PROMPT, "top_k": 2.5}, 400, "top_k", "valid integer"),
    ({"prompt": PROMPT, "top_k": "5"}, 400, "top_k", "valid integer"),
    ({"prompt": PROMPT, "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"prompt": PROMPT, "top_p": 1.5}, 400, "top_p", "less than or equal to 1"),
    ({"prompt": PROMPT, "top_p": "all"}, 400, "top_p", "valid number"),
    ({"prompt": PROMPT, "seed": "1"}, 400, "seed", "valid integer"),
    ({"prompt": PROMPT, "seed": 1.5}, 400, "seed", "valid integer"),
    ({"prompt": PROMPT, "seed": True}, 400, "seed", "valid integer"),
    ({"prompt": PROMPT, "seed": -1}, 400, "seed", "greater than or equal to 0"),
    ({"prompt": PROMPT, "seed": 2**64}, 400, "seed", "less than"),
    ({"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"prompt": PROMPT, "max_tokens": MAX_TOKENS + 1}, 400, "max_tokens",
     f"less than or equal to {MAX_TOKENS}"),
    ({"prompt": PROMPT, "max_tokens": 2.0}, 400, "max_tokens", "valid integer"),
    ({"prompt": PROMPT, "max_tokens": "16"}, 400, "max_tokens", "valid integer"),
    ({"prompt": PROMPT, "max_tokens": True}, 400, "max_tokens", "valid integer"),
    ({"prompt": PROMPT, "stream": "yes"}, 400, "stream", "valid boolean"),
    ({"prompt": PROMPT, "stream": 1}, 400, "stream", "valid boolean"),
    ({"prompt": PROMPT, "stream": [True]}, 400, "stream", "valid boolean"),
    ({"prompt": PROMPT, "stop": ""}, 400, "stop", "non-empty string"),
    ({"prompt": PROMPT, "stop": ["。", ""]}, 400, "stop", "non-empty string"),
    ({"prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "up to 4"),
    ({"prompt": PROMPT, "stop": [1]}, 400, "stop", "non-empty string"),
    ({"prompt": PROMPT, "n": 2}, 400, "n", "input should be 1"),
]


def check_error(r: httpx.Response, status: int, param: str | None, words: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error.keys() == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    message = error["message"]
    assert words in message and "\n" not in message and len(message) < 400, message
    return error


@pytest.mark.parametrize("body,status,param,words", BAD,
                         ids=[f"{i}-{b[2] or 'body'}" for i, b in enumerate(BAD)])
def test_a_bad_request_is_a_4xx_with_an_openai_error(url, body, status, param, words):
    for stream in (False, True):  # the same answer when a stream was asked for
        if isinstance(body, dict):
            r = post(url, {**body, "stream": stream} if param != "stream" else body)
        elif isinstance(body, bytes):
            r = post(url, content=body, headers={"Content-Type": "application/json"})
        else:
            r = post(url, body)
        error = check_error(r, status, param, words)
        assert error["code"] == ("model_not_found" if status == 404 else None)
    assert complete(url, max_tokens=2)["usage"]["completion_tokens"] == 2  # still serving


def test_a_body_over_the_cap_is_413_with_or_without_its_length(url):
    big = json.dumps({"prompt": PROMPT, "padding": "x" * MAX_BODY}).encode()
    check_error(post(url, content=big), 413, None, "larger than 64 KiB")
    chunked = iter([big[i:i + 4096] for i in range(0, len(big), 4096)])  # no Content-Length
    check_error(post(url, content=chunked), 413, None, "larger than 64 KiB")
    assert httpx.get(f"{url}/health").status_code == 200


def test_other_routes_and_methods_answer_in_the_same_shape(url):
    check_error(httpx.get(f"{url}/v1/chat"), 404, None, "GET /v1/chat: Not Found")
    check_error(httpx.get(f"{url}/v1/completions"), 405, None, "Method Not Allowed")


def test_null_means_the_default_as_openai_allows(url):
    fields = ("model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stream", "stop")
    c = complete(url, **dict.fromkeys(fields))
    check_completion(c, "tiny", len(PROMPT), "length")
    assert c["usage"]["completion_tokens"] == 16


def test_clients_that_leave_mid_stream_do_not_hang_the_server(url):
    """An abandoned stream is closed by the garbage collector, which may run inside another
    request's locked step: nothing done then may wait for the lock (this once deadlocked)."""
    for _ in range(20):
        with httpx.stream("POST", f"{url}/v1/completions", timeout=20,
                          json={"prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True}) as r:
            assert next(r.iter_lines()).startswith("data: {")
        r = post(url, {"prompt": PROMPT, "max_tokens": 30}, timeout=20)
        assert r.json()["usage"]["completion_tokens"] == 30


def test_a_json_body_needs_no_content_type(url):
    """curl -d sends a form content type; the body is still read as JSON."""
    r = post(url, content=json.dumps({"prompt": PROMPT, "max_tokens": 3}).encode(),
             headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


# ----------------------------------------------------------------------------- concurrency

def test_fifty_requests_at_once_each_get_their_own_answer(url):
    bodies = [{"prompt": PROMPT, "max_tokens": 6 + i % 7, "seed": i, "temperature": 1.1,
               "stream": i % 2 == 1} for i in range(45)]
    bodies += [{"prompt": PROMPT, "top_k": 0}] * 5  # bad ones among them

    def answer(body: dict) -> tuple[int, str, str | None]:
        if body.get("stream"):
            chunks = complete_streamed(url, **{k: v for k, v in body.items() if k != "prompt"})
            return 200, joined(chunks), chunks[-1]["choices"][0]["finish_reason"]
        r = post(url, body)
        if r.status_code != 200:
            return r.status_code, r.json()["error"]["param"], None
        c = r.json()
        check_completion(c, "tiny", len(PROMPT), "length")
        assert c["usage"]["completion_tokens"] == body["max_tokens"]
        return 200, c["choices"][0]["text"], c["choices"][0]["finish_reason"]

    alone = [answer(b) for b in bodies]
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        together = list(pool.map(answer, bodies))
    assert together == alone
    assert alone[-1] == (400, "top_k", None) and alone[0][0] == 200
    assert len({text for _, text, _ in alone[:45]}) > 40  # seeds differ, so do the samples
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


# ----------------------------------------------------------------------------- openai client

def test_the_openai_client_writes_a_poem(shipped_url):
    client = openai.OpenAI(base_url=f"{shipped_url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["poetry-small"]
    ask = dict(model="poetry-small", prompt=poem_header("五言绝句", "静夜思"), max_tokens=100,
               temperature=0.8, seed=0, stop=["\n\n"], extra_body={"top_k": 50})
    c = client.completions.create(**ask)
    text = c.choices[0].text
    assert c.choices[0].finish_reason == "stop" and "\n\n" not in text
    author, *verse = text.split("\n")
    assert 1 <= len(author) <= 6 and len(verse) >= 2, text  # an author's name, then lines
    assert c.usage.prompt_tokens == len(ask["prompt"]) and c.usage.completion_tokens > len(text)
    pieces = [chunk.choices[0].text for chunk in client.completions.create(**ask, stream=True)]
    assert len(pieces) > 1 and "".join(pieces) == text
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(**{**ask, "temperature": -1})
    assert bad.value.param == "temperature" and "greater than or equal to 0" in bad.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(**{**ask, "model": "gpt-3.5-turbo-instruct"})
    assert missing.value.code == "model_not_found" and "poetry-small" in missing.value.message


# ----------------------------------------------------------------------------- the command

def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_serve_command_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "nope.safetensors")]) == 2
    assert one_line_error(capsys).startswith("llmbook serve: no model file at")
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["serve", "--checkpoint", str(tmp_path / "notes.txt")]) == 2
    assert "refused to load" in one_line_error(capsys)
    (tmp_path / "fake.safetensors").write_bytes(b"\x00" * 100)
    assert main(["serve", "--checkpoint", str(tmp_path / "fake.safetensors")]) == 2
    assert "is not a safetensors model file" in one_line_error(capsys)
    for port in ("http", "-1", "65536"):
        with pytest.raises(SystemExit) as exit_:
            main(["serve", "--port", port])
        assert exit_.value.code == 2 and "--port" in one_line_error(capsys)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--port", str(taken.getsockname()[1])]) == 2
    assert "address already in use" in one_line_error(capsys).lower()


def test_serve_command_serves_until_ctrl_c():
    proc = subprocess.Popen([sys.executable, "-m", "llmbook", "serve", "--port", "0"],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1",
                                            "LLMBOOK_DEVICE": "cpu", "PATH": "/usr/bin:/bin"})
    try:
        first = proc.stdout.readline()
        found = re.search(r"at (http://127\.0\.0\.1:\d+)/ ", first)
        assert found, first + proc.stderr.read()
        base = found.group(1)
        assert httpx.get(f"{base}/health", timeout=TIMEOUT).json() == {"status": "ok"}
        c = httpx.post(f"{base}/v1/completions", timeout=TIMEOUT,
                       json={"model": "poetry-small", "prompt": "七言绝句《春》", "max_tokens": 5})
        assert c.json()["usage"]["completion_tokens"] == 5
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=TIMEOUT) == 130  # as every llmbook command after Ctrl-C
    finally:
        proc.kill()
        proc.wait()
    err = proc.stderr.read()
    assert err.endswith("llmbook serve: interrupted\n") and "Traceback" not in err, err

