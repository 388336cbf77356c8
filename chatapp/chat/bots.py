"""Bot engines. One small interface: given the history as plain data, yield text chunks.

Engines never see a session or an ORM object, so nothing they do can hold a connection.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

import requests
import urllib3


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
    def stream(self, history: list[dict], cancel: Cancel | None = None) -> Iterator[str]:
        """Yield the reply to ``history`` ([{"role", "content"}, ...]) as text chunks,
        ending early (and closing any request) once ``cancel`` is set."""


class EchoBot:
    """Answers with the user's last message, word by word, spread evenly over ``delay`` seconds."""

    def __init__(self, delay: float = 0.0):
        self.delay = max(0.0, float(delay))

    def stream(self, history: list[dict], cancel: Cancel | None = None) -> Iterator[str]:
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
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout = (connect_timeout, read_timeout)
        self.system_prompt = system_prompt

    def _payload(self, history: list[dict]) -> dict:
        messages = [{"role": m["role"], "content": m["content"]} for m in history]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return {"model": self.model, "messages": messages, "stream": True}

    def _silence_message(self) -> str:
        return f"the model server sent nothing for {self.timeout[1]:g} s; it may be overloaded"

    def _detail(self, what: object) -> str:
        """For the log: the server's URL and what happened, with any credentials masked."""
        return f"{masked_url(self.url)}: {self._redact(str(what))[:500]}"

    def _redact(self, text: str) -> str:
        # The URL's user info and the API key can reappear in an exception's text.
        parts = urlsplit(self.url)
        userinfo = parts.netloc.rpartition("@")[0]
        for secret in (userinfo, parts.password, unquote(parts.password or ""), self.api_key, parts.query):
            if secret and len(secret) >= 4:
                text = text.replace(secret, "***")
        return text

    def stream(self, history: list[dict], cancel: Cancel | None = None) -> Iterator[str]:
        headers = {"Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        answered = False  # whether the server sent its response headers
        try:
            with requests.post(
                self.url,
                json=self._payload(history),
                headers=headers,
                stream=True,
                timeout=self.timeout,
            ) as response:
                answered = True
                if cancel is not None:
                    # A silent model would keep the read blocked for up to read_timeout:
                    # shutting the socket down wakes it, and the server sees the client go.
                    cancel.on_cancel(lambda: _shut_down(response))
                if response.status_code >= 400:
                    raise BotError(
                        f"the model server answered with an error (HTTP {response.status_code}); try again later",
                        self._detail(f"HTTP {response.status_code}: {_error_detail(response)}"),
                    )
                yield from self._parse_event_stream(response)
        except requests.exceptions.ConnectTimeout as exc:
            raise BotError("could not reach the model server in time; try again later", self._detail(exc)) from None
        except requests.exceptions.ReadTimeout as exc:
            raise BotError(self._silence_message(), self._detail(exc)) from None
        except requests.exceptions.ConnectionError as exc:
            # A read timeout while iterating the body arrives wrapped in a ConnectionError.
            if exc.args and isinstance(exc.args[0], urllib3.exceptions.ReadTimeoutError):
                raise BotError(self._silence_message(), self._detail(exc)) from None
            if answered:
                raise BotError(
                    "lost the connection to the model server; regenerate to retry", self._detail(exc)
                ) from None
            raise BotError("could not reach the model server; try again later", self._detail(exc)) from None
        except requests.exceptions.RequestException as exc:
            raise BotError("the request to the model server failed; try again later", self._detail(exc)) from None

    def _parse_event_stream(self, response: requests.Response) -> Iterator[str]:
        for raw in response.iter_lines(decode_unicode=False):
            line = raw.decode("utf-8", errors="replace").strip()
            if not line or line.startswith(":") or not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
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
        raise BotError(
            "the model server closed the stream before it finished; regenerate to retry",
            self._detail("the stream ended without [DONE]"),
        )

    def _malformed(self, data: str) -> BotError:
        return BotError("the model server sent a malformed reply", self._detail(f"malformed chunk: {data[:200]!r}"))


def _shut_down(response: requests.Response) -> None:
    """Close a streaming response's connection from another thread, waking its reader.

    The socket is the connection's, or (a response that closes its connection at the end)
    the response's own: http.client hands it over. Shutting it down, unlike closing it,
    wakes a thread blocked reading it.
    """
    raw = response.raw
    sock = getattr(getattr(raw, "_connection", None), "sock", None)
    if sock is None:
        reader = getattr(getattr(getattr(raw, "_fp", None), "fp", None), "raw", None)
        sock = getattr(reader, "_sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed
            sock.shutdown(socket.SHUT_RDWR)
    response.close()


def masked_url(url: str) -> str:
    """``url`` with its user info and query (where credentials go) replaced by ``***``."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"***@{host}" if "@" in parts.netloc else host
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


def _error_detail(response: requests.Response) -> str:
    try:
        body = response.json()
        detail = body.get("error", body)
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
        return str(detail)[:300]
    except ValueError:
        return response.text[:300] or response.reason


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
        )
    raise BotError(f"unknown BOT_ENGINE {engine!r}; use 'echo' or 'openai'")
