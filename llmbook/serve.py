"""`llmbook serve`: one model behind the OpenAI completions API, and a page that writes poems.

`POST /v1/completions` speaks the API as vLLM, llama.cpp and Ollama do (with `top_k` as vLLM's
extension), so the `openai` client and curl work with it; `GET /` is the poetry page, which uses
that endpoint with `stream: true`. Uvicorn serves requests concurrently; the generation steps
themselves run under one `threading.Lock`, so the model works on one token of one request at a
time and concurrent requests take turns, token by token (each with its own cache and generator).
"""

from __future__ import annotations

import json
import reprlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .env import get_device
from .errors import UserError
from .generate import stream
from .model import GPT, check_context
from .pretrained import load_any
from .tokenizer import CharTokenizer

MAX_TOKENS = 1024  # the most tokens one request may ask for
MAX_BODY = 64 * 1024  # bytes; a prompt is at most the model's context, far less than this
MAX_STOPS = 4  # as OpenAI


class Piece(NamedTuple):
    """New text of a completion, its finish reason ("stop", "length"; None until the last
    piece), and how many tokens have been generated so far."""

    text: str
    finish: str | None
    tokens: int


class ApiError(Exception):
    """A request the server refuses: answered with `status` and an OpenAI-style error object."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions; other OpenAI fields (logprobs, echo, penalties, ...)
    are ignored. Strict: a number is not a string, and true is not an integer."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None  # None: the loaded model
    prompt: str
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None
    temperature: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=1)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**64)] | None = None
    stream: bool | None = None  # None (as OpenAI allows): False
    stop: list[str] = []
    n: Literal[1] = 1  # one completion per request

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> list[str]:
        """OpenAI's stop: None, a string, or a list of up to 4 strings; as a list."""
        stops = [] if value is None else [value] if isinstance(value, str) else value
        if not (isinstance(stops, list) and len(stops) <= MAX_STOPS
                and all(isinstance(s, str) and s for s in stops)):
            raise PydanticCustomError("stop", f"must be a non-empty string or a list of up to "
                                      f"{MAX_STOPS} non-empty strings")
        return stops


def _error_response(status: int, message: str, param: str | None = None,
                    code: str | None = None) -> JSONResponse:
    message = " ".join(str(message).split("\n"))  # one line, whatever raised it
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error",
                                   "param": param, "code": code}}, status_code=status)


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """The first problem of a body as one line, e.g. "max_tokens: input should be less than
    or equal to 1024, got 5000", and the field it is about."""
    first = exc.errors()[0]
    param = str(first["loc"][0]) if first["loc"] else None
    msg = first["msg"][:1].lower() + first["msg"][1:]
    got = "" if first["type"] == "missing" else f", got {reprlib.repr(first['input'])}"
    return f"{param}: {msg}{got}", param


async def _read_body(request: Request) -> CompletionRequest:
    """The request's JSON body, read up to MAX_BODY bytes, as a checked CompletionRequest."""
    too_big = ApiError(413, f"the body is larger than {MAX_BODY // 1024} KiB; a prompt longer "
                       "than the model's context could not be used anyway")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise too_big
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8; nested too deep
        raise ApiError(400, f"the body is not valid JSON ({exc}); send an object such as "
                       '{"prompt": "...", "max_tokens": 16}') from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got a {type(data).__name__}")
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as exc:
        message, param = _validation_message(exc)
        raise ApiError(400, message, param) from None


def _sendable(text: str, stops: list[str]) -> int:
    """How much of `text` can be sent: all but its longest tail that a stop string starts with
    (held back until the next tokens show whether the stop string follows)."""
    for k in range(min(len(text), max(map(len, stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return len(text) - k
    return len(text)


def _find_stop(text: str, stops: list[str]) -> int | None:
    """Where the first stop string in `text` begins, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found, default=None)


class Completer:
    """One model and its tokenizer, turning checked requests into completions under one lock."""

    def __init__(self, model: GPT, tokenizer: CharTokenizer, name: str):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.device = next(model.parameters()).device
        self.lock = threading.Lock()

    def prompt_ids(self, req: CompletionRequest) -> list[int]:
        """The prompt's token ids, or an ApiError saying what is wrong with the prompt."""
        if req.model is not None and req.model != self.name:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server has "
                           f"{self.name!r} (see GET /v1/models)", "model", "model_not_found")
        if not req.prompt:
            raise ApiError(400, "prompt is empty; give the start of a text, e.g. 五言绝句《春晓》",
                           "prompt")
        unknown = sorted({c for c in req.prompt if c not in self.tokenizer.stoi})
        if unknown:
            shown = " ".join(f"{c!r} (U+{ord(c):04X})" for c in unknown[:10])
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise ApiError(400, f"prompt has characters outside the model's vocabulary: "
                           f"{shown}{more}; remove or replace them", "prompt")
        ids = self.tokenizer.encode(req.prompt)
        try:
            check_context(len(ids), self.model.config.block_size)
        except UserError as exc:
            raise ApiError(400, str(exc), "prompt") from None
        return ids

    def start(self, ids: list[int], req: CompletionRequest) -> Iterator[Piece]:
        """The completion in pieces as it is generated, the last one with its finish reason;
        the sampling arguments are checked here, before the first piece."""
        generator = (None if req.seed is None
                     else torch.Generator(self.device).manual_seed(req.seed))
        with self.lock:
            steps = stream(self.model, torch.tensor([ids], device=self.device),
                           16 if req.max_tokens is None else req.max_tokens,
                           temperature=1.0 if req.temperature is None else req.temperature,
                           top_k=req.top_k, top_p=req.top_p, generator=generator)
        return self._pieces(steps, req.stop)

    def _pieces(self, steps: Iterator[torch.Tensor], stops: list[str]) -> Iterator[Piece]:
        # No lock is taken when this generator is closed: a client that leaves mid-stream leaves
        # it to the garbage collector, which may run inside another request's locked step.
        new: list[int] = []
        sent = 0  # characters of the completion already given out
        while True:
            with self.lock:
                step = next(steps, None)
            if step is None:
                yield Piece(self.tokenizer.decode(new)[sent:], "length", len(new))
                return
            new.append(step.item())
            text = self.tokenizer.decode(new)  # all of it each time: right for any tokenizer
            end = _find_stop(text, stops)
            if end is not None:
                yield Piece(text[sent:end], "stop", len(new))
                return
            ready = _sendable(text, stops)
            if ready > sent:
                yield Piece(text[sent:ready], None, len(new))
                sent = ready

    def completion(self, cid: str, created: int, text: str, finish: str | None,
                   usage: dict | None) -> dict:
        """An OpenAI text_completion object, or one chunk of a streamed one."""
        return {"id": cid, "object": "text_completion", "created": created, "model": self.name,
                "choices": [{"text": text, "index": 0, "logprobs": None,
                             "finish_reason": finish}],
                "usage": usage}


def create_app(model: GPT, tokenizer: CharTokenizer, name: str) -> FastAPI:
    """The server's app for one model kept in memory, answering as `name` (its model id)."""
    completer = Completer(model, tokenizer, name)
    page = (files("llmbook") / "static" / "index.html").read_text(encoding="utf-8")
    # no /docs: FastAPI's API pages load their scripts from a CDN, and this runs offline
    app = FastAPI(title=f"llmbook serve: {name}", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, str(exc), exc.param, exc.code)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error_response(exc.status_code, f"{request.method} {request.url.path}: "
                               f"{exc.detail}; the API is POST /v1/completions, GET /v1/models")

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "llmbook"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _read_body(request)
        ids = completer.prompt_ids(req)
        pieces = await run_in_threadpool(completer.start, ids, req)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def usage(last: Piece) -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": last.tokens,
                    "total_tokens": len(ids) + last.tokens}

        if not req.stream:  # None or False
            parts = await run_in_threadpool(list, pieces)
            return completer.completion(cid, created, "".join(p.text for p in parts),
                                        parts[-1].finish, usage(parts[-1]))

        def events() -> Iterator[str]:  # server-sent events; Starlette runs it in a thread
            for p in pieces:
                chunk = completer.completion(cid, created, p.text, p.finish,
                                             usage(p) if p.finish else None)
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return app


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), or a UserError saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind(address)
        sock.listen(2048)  # connections wait from now on, before uvicorn starts (its backlog)
    except OSError as exc:
        sock.close()
        hint = "; is another server using it? pick another --port" if port else ""
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` with uvicorn in a background thread (for tests and notebooks): yields the
    base URL, e.g. "http://127.0.0.1:PORT" (port 0: a free one), and stops the server on exit."""
    sock = _listen(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server stopped while starting; see its log above")
            time.sleep(0.01)
        yield _url(sock)
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Load a model (a shipped name, a .safetensors file or a training checkpoint) and serve it
    until Ctrl-C; its model id is `checkpoint` as given (as vLLM names a model by its path)."""
    model, tokenizer, _ = load_any(checkpoint, get_device())
    sock = _listen(host, port)
    url = _url(sock)
    print(f"llmbook serve: {checkpoint} at {url}/ (the poetry page) and {url}/v1 (the OpenAI "
          "API); Ctrl-C stops it", flush=True)
    app = create_app(model, tokenizer, str(checkpoint))
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
