"""Bot engines. One small interface: given the history as plain data, yield text chunks.

Engines never see a session or an ORM object, so nothing they do can hold a connection.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx
from httpx_sse import EventSource, SSEError


class BotError(Exception):
    """The engine could not produce a reply.

    The message is shown to the user, so it says what went wrong in general terms and never
    names the model server's address or repeats what it answered; ``detail`` is for the
    operator's log (chatapp.chat.pipeline logs it with the reply).
    """

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


class Cancel(Protocol):
    """A run's stop switch (chatapp.chat.runner.Cancellation)."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float) -> bool: ...

    def on_cancel(self, callback) -> None: ...


class Bot(Protocol):
    default_model: str

    def stream(
        self,
        history: list[dict],
        cancel: Cancel | None = None,
        *,
        model: str | None = None,
        system_prompt: str | None = None,
    ) -> Iterator[str]:
        """Yield the reply to ``history`` ([{"role", "content"}, ...]) as text chunks,
        ending early (and closing any request) once ``cancel`` is set. ``model`` (None: the
        default) and ``system_prompt`` (None: the configured one) come from the conversation."""

    def models(self) -> list[str]:
        """The model ids this engine offers (BotError if it cannot say)."""

    def title(self, first_message: str, reply: str, *, model: str | None = None) -> str:
        """A short title for a conversation that began with ``first_message`` and ``reply``."""


TITLE_WORDS = 6


def first_words(text: str, max_length: int, words: int = TITLE_WORDS) -> str:
    """The first ``words`` words of ``text`` on one line, cut to ``max_length`` characters."""
    title = " ".join(text.split()[:words])
    if len(title) > max_length:
        title = title[: max_length - 1].rstrip() + "…"
    return title


class EchoBot:
    """Answers with the user's last message, word by word, spread evenly over ``delay`` seconds."""

    default_model = "echo"
    MODELS = ("echo",)

    def __init__(self, delay: float = 0.0):
        self.delay = max(0.0, float(delay))

    def models(self) -> list[str]:
        return list(self.MODELS)

    def title(self, first_message: str, reply: str, *, model: str | None = None) -> str:
        return first_words(first_message, 200)

    def stream(
        self,
        history: list[dict],
        cancel: Cancel | None = None,
        *,
        model: str | None = None,
        system_prompt: str | None = None,
    ) -> Iterator[str]:
        last = next((m["content"] for m in reversed(history) if m["role"] == "user"), "")
        # Words keep their following whitespace, so the chunks join back to the message.
        words = re.findall(r"\S+\s*|\s+", last) or [""]
        pause = self.delay / len(words)
        for word in words:
            if pause:
                if cancel is not None:
                    if cancel.wait(pause):
                        return
                else:
                    time.sleep(pause)
            yield word


# One connection pool per process and server settings: httpx clients are thread-safe, and
# building one (its TLS context) costs more than a short request. Keyed by pid too, so a
# forked worker never shares a parent's sockets.
_clients: dict[tuple, httpx.Client] = {}
_clients_lock = threading.Lock()
# GET /models answers, per process: (expires at, ids), by base URL and key.
_models_cache: dict[tuple[str, str], tuple[float, list[str]]] = {}
_models_lock = threading.Lock()


def _client(connect_timeout: float, read_timeout: float) -> httpx.Client:
    key = (os.getpid(), connect_timeout, read_timeout)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            timeout = httpx.Timeout(
                connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout
            )
            # No cap on connections: REPLY_WORKERS (and the title workers) bound the requests in
            # flight, and may be in the hundreds under gevent; httpx's default cap of 100 would
            # fail the replies past it (PoolTimeout) rather than run them.
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=20)
            # No environment proxies: the model server is the operator's, named in config.
            client = _clients[key] = httpx.Client(timeout=timeout, limits=limits, trust_env=False)
        return client


@atexit.register
def close_clients() -> None:
    """Close this process's connections to model servers (at exit: no socket left to the GC)."""
    with _clients_lock:
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        with contextlib.suppress(Exception):
            client.close()


def clear_model_cache() -> None:
    """Forget every cached model list (tests; an operator's new model shows within MODELS_CACHE_SECONDS anyway)."""
    with _models_lock:
        _models_cache.clear()


class OpenAIBot:
    """Any OpenAI-compatible ``/v1/chat/completions`` server, streamed (OpenAI, Ollama, vLLM, llama.cpp)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "",
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        system_prompt: str = "",
        models_cache_seconds: float = 60.0,
        title_prompt: str = "",
        title_timeout: float = 20.0,
    ):
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = self.default_model = model
        self.api_key = api_key
        self.timeout = (connect_timeout, read_timeout)
        self.system_prompt = system_prompt
        self.models_cache_seconds = models_cache_seconds
        self.title_prompt = title_prompt or DEFAULT_TITLE_PROMPT
        self.title_timeout = title_timeout

    def _payload(self, history: list[dict], model: str | None, system_prompt: str | None, stream: bool) -> dict:
        messages = [{"role": m["role"], "content": m["content"]} for m in history]
        prompt = self.system_prompt if system_prompt is None else system_prompt
        if prompt:
            messages.insert(0, {"role": "system", "content": prompt})
        return {"model": model or self.model, "messages": messages, "stream": stream}

    def _headers(self, accept: str) -> dict:
        headers = {"Accept": accept}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _silence_message(self) -> str:
        return f"the model server sent nothing for {self.timeout[1]:g} s; it may be overloaded"

    def _detail(self, what: object, url: str | None = None) -> str:
        """For the log: the server's URL and what happened, with any credentials masked."""
        return f"{masked_url(url or self.url)}: {self._redact(str(what) or type(what).__name__)[:500]}"

    def _redact(self, text: str) -> str:
        # The URL's user info and the API key can reappear in an exception's text.
        parts = urlsplit(self.url)
        userinfo = parts.netloc.rpartition("@")[0]
        for secret in (userinfo, parts.password, unquote(parts.password or ""), self.api_key, parts.query):
            if secret and len(secret) >= 4:
                text = text.replace(secret, "***")
        return text

    def _translate(self, exc: httpx.HTTPError, answered: bool, url: str | None = None) -> BotError:
        """The user's message for a failed request (never its address), with the details for the log."""
        detail = self._detail(f"{type(exc).__name__}: {exc}", url)
        if isinstance(exc, httpx.ConnectTimeout):
            return BotError("could not reach the model server in time; try again later", detail)
        if isinstance(exc, httpx.ReadTimeout):
            return BotError(self._silence_message(), detail)
        if isinstance(exc, httpx.ConnectError):
            return BotError("could not reach the model server; try again later", detail)
        if answered and isinstance(exc, httpx.TransportError):
            return BotError("lost the connection to the model server; regenerate to retry", detail)
        return BotError("the request to the model server failed; try again later", detail)

    def stream(
        self,
        history: list[dict],
        cancel: Cancel | None = None,
        *,
        model: str | None = None,
        system_prompt: str | None = None,
    ) -> Iterator[str]:
        answered = False  # whether the server sent its response headers
        client = _client(*self.timeout)
        try:
            with client.stream(
                "POST",
                self.url,
                json=self._payload(history, model, system_prompt, stream=True),
                headers=self._headers("text/event-stream"),
            ) as response:
                answered = True
                if cancel is not None:
                    # A silent model would keep the read blocked for up to read_timeout:
                    # shutting the socket down wakes it, and the server sees the client go.
                    cancel.on_cancel(lambda: _shut_down(response))
                if response.status_code >= 400:
                    response.read()
                    raise BotError(
                        f"the model server answered with an error (HTTP {response.status_code}); try again later",
                        self._detail(f"HTTP {response.status_code}: {_error_detail(response)}"),
                    )
                yield from self._parse_event_stream(response)
        except httpx.HTTPError as exc:
            raise self._translate(exc, answered) from None

    def _parse_event_stream(self, response: httpx.Response) -> Iterator[str]:
        try:
            for event in EventSource(response).iter_sse():
                data = event.data.strip()
                if not data:
                    continue
                if data == "[DONE]":
                    return
                yield from self._chunk_text(data)
        except SSEError as exc:
            raise BotError("the model server sent a malformed reply", self._detail(exc)) from None
        raise BotError(
            "the model server closed the stream before it finished; regenerate to retry",
            self._detail("the stream ended without [DONE]"),
        )

    def _chunk_text(self, data: str) -> Iterator[str]:
        try:
            chunk = json.loads(data)
        except ValueError:
            raise self._malformed(data) from None
        if not isinstance(chunk, dict):
            raise self._malformed(data)
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise BotError(
                "the model server reported an error; try again later",
                self._detail(f"error in the stream: {str(message)[:300]}"),
            )
        try:
            delta = chunk["choices"][0].get("delta") or {}
        except (KeyError, IndexError, TypeError, AttributeError):
            raise self._malformed(data) from None
        text = delta.get("content") if isinstance(delta, dict) else None
        if text:
            yield str(text)

    def _malformed(self, data: str) -> BotError:
        return BotError("the model server sent a malformed reply", self._detail(f"malformed chunk: {data[:200]!r}"))

    def models(self) -> list[str]:
        """The server's ``GET /models`` ids, cached for ``models_cache_seconds`` per process."""
        key = (self.base_url, self.api_key)
        now = time.monotonic()
        with _models_lock:
            cached = _models_cache.get(key)
            if cached is not None and cached[0] > now:
                return list(cached[1])
        # Fetched outside the lock: a slow server must not queue every other caller behind
        # it (two may fetch at once; both store the same answer).
        ids = self._fetch_models()
        with _models_lock:
            _models_cache[key] = (time.monotonic() + self.models_cache_seconds, ids)
        return list(ids)

    def cached_models(self) -> list[str] | None:
        """The cached model list if fresh, else None: never waits for the server (pages)."""
        with _models_lock:
            cached = _models_cache.get((self.base_url, self.api_key))
        return list(cached[1]) if cached is not None and cached[0] > time.monotonic() else None

    def _fetch_models(self) -> list[str]:
        url = self.base_url + "/models"
        try:
            response = _client(*self.timeout).get(url, headers=self._headers("application/json"))
        except httpx.HTTPError as exc:
            raise self._translate(exc, answered=False, url=url) from None
        if response.status_code >= 400:
            raise BotError(
                f"the model server answered with an error (HTTP {response.status_code}); try again later",
                self._detail(f"HTTP {response.status_code}: {_error_detail(response)}", url),
            )
        try:
            data = response.json()["data"]
            ids = [str(item["id"]) for item in data if isinstance(item, dict) and item.get("id")]
        except (ValueError, KeyError, TypeError):
            raise BotError(
                "the model server sent a malformed list of models",
                self._detail(f"malformed models list: {response.text[:200]!r}", url),
            ) from None
        return ids

    def title(self, first_message: str, reply: str, *, model: str | None = None) -> str:
        """A short, separate, non-streamed request; bounded by ``title_timeout`` seconds."""
        history = [
            {"role": "user", "content": first_message[:2000]},
            {"role": "assistant", "content": reply[:2000]},
            {"role": "user", "content": self.title_prompt},
        ]
        payload = self._payload(history, model, system_prompt="", stream=False)
        payload["max_tokens"] = 30
        timeout = httpx.Timeout(self.title_timeout, connect=min(self.timeout[0], self.title_timeout))
        try:
            response = _client(*self.timeout).post(
                self.url, json=payload, headers=self._headers("application/json"), timeout=timeout
            )
        except httpx.HTTPError as exc:
            raise self._translate(exc, answered=False) from None
        if response.status_code >= 400:
            raise BotError(
                f"the model server answered with an error (HTTP {response.status_code})",
                self._detail(f"HTTP {response.status_code}: {_error_detail(response)}"),
            )
        try:
            text = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise self._malformed(response.text) from None
        return str(text or "")


DEFAULT_TITLE_PROMPT = (
    "Write a title of at most six words for this conversation. "
    "Answer with the title alone: no quotes, no punctuation at the end."
)


def _shut_down(response: httpx.Response) -> None:
    """Close a streaming response's connection from another thread, waking its reader.

    Shutting the socket down, unlike closing it, wakes a thread blocked reading it; httpcore
    exposes the socket through the response's ``network_stream`` extension.
    """
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):  # already closed
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):  # closing races the reader's own close
        response.close()


def masked_url(url: str) -> str:
    """``url`` with its user info and query (where credentials go) replaced by ``***``."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"***@{host}" if "@" in parts.netloc else host
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


def _error_detail(response: httpx.Response) -> str:
    try:
        body = response.json()
        detail = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
        return str(detail)[:300]
    except ValueError:
        return response.text[:300] or response.reason_phrase


def bot_from_config(config) -> Bot:
    engine = config["BOT_ENGINE"]
    if engine == "echo":
        return EchoBot(delay=config["BOT_ECHO_DELAY"])
    if engine == "openai":
        return OpenAIBot(
            base_url=config["OPENAI_BASE_URL"],
            model=config["OPENAI_MODEL"],
            api_key=config["OPENAI_API_KEY"],
            connect_timeout=config["OPENAI_CONNECT_TIMEOUT"],
            read_timeout=config["OPENAI_READ_TIMEOUT"],
            system_prompt=config["OPENAI_SYSTEM_PROMPT"],
            models_cache_seconds=config.get("MODELS_CACHE_SECONDS", 60.0),
            title_prompt=config.get("TITLE_PROMPT", ""),
            title_timeout=config.get("TITLE_TIMEOUT", 20.0),
        )
    raise BotError(f"unknown BOT_ENGINE {engine!r}; use 'echo' or 'openai'")
