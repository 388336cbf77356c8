"""A real OpenAI-compatible streaming server on loopback, with scripted behaviours."""

from __future__ import annotations

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _chunk(text: str) -> bytes:
    body = {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}
    return f"data: {json.dumps(body)}\n\n".encode()


class FakeOpenAIServer:
    """Modes: "ok" streams reply_words then [DONE]; "die" stops mid-stream; "hang" sends one
    chunk then nothing; "silent" sends one chunk, then nothing until the client hangs up;
    "http500" answers an error; "garbage" sends a malformed chunk.

    ``client_gone`` is set when a client is seen to close its request before the end. With a
    ``gate`` (an Event), "ok" sends the first word, then waits for the gate before the rest.
    ``first_token_delay`` (plus up to ``first_token_jitter``, at random) seconds pass in "ok"
    before the first word: a model thinking before it answers.

    ``GET /v1/models`` lists ``models`` (``models_status`` other than 200: an error instead),
    and a non-streamed completion (the title request) answers ``title_text``, after
    ``title_gate`` is set if there is one (``title_waiting`` tells the test it is there).
    """

    def __init__(self, mode: str = "ok", reply_words: list[str] | None = None, delay: float = 0.0):
        self.mode = mode
        self.reply_words = reply_words or ["Hello", " from", " the", " model."]
        self.delay = delay
        self.requests: list[dict] = []  # the streamed (reply) requests
        self.title_requests: list[dict] = []  # the bodies of non-streamed (title) requests
        self.release = threading.Event()
        self.client_gone = threading.Event()
        self.models = ["test-model", "other-model"]
        self.models_status = 200
        self.model_requests = 0
        self.title_text = "Greetings From The Model"
        self.title_gate: threading.Event | None = None
        self.title_waiting = threading.Event()
        self.gate: threading.Event | None = None
        self.first_token_delay = 0.0
        self.first_token_jitter = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _json(self, status: int, body: dict) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except OSError:  # the client gave up waiting (a title timeout)
                    server.client_gone.set()

            def do_GET(self):
                if self.path != "/v1/models":
                    return self._json(404, {"error": {"message": "no such path"}})
                server.model_requests += 1
                if server.models_status != 200:
                    return self._json(server.models_status, {"error": {"message": "models are sleeping"}})
                self._json(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in server.models]})

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                if body.get("stream") is False:
                    server.title_requests.append(body)
                    server.title_waiting.set()
                    if server.title_gate is not None:
                        server.title_gate.wait(30)
                    message = {"role": "assistant", "content": server.title_text}
                    return self._json(200, {"object": "chat.completion", "choices": [{"index": 0, "message": message}]})
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if server.mode == "http500":
                    payload = json.dumps({"error": {"message": "model is overloaded"}}).encode()
                    self.send_response(500)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                if server.mode == "silent":
                    # As model servers send a stream: chunked, so each piece is read on arrival.
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                words = server.reply_words
                if server.mode == "ok" and server.first_token_delay + server.first_token_jitter > 0:
                    time.sleep(server.first_token_delay + random.uniform(0, server.first_token_jitter))
                if server.mode == "silent":
                    piece = _chunk(words[0])
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.flush()
                    # The client sends nothing more: readable means it closed its side.
                    self.connection.settimeout(30)
                    try:
                        gone = self.connection.recv(1) == b""
                    except OSError:
                        gone = True
                    if gone:
                        server.client_gone.set()
                    return
                if server.mode == "garbage":
                    self.wfile.write(_chunk(words[0]) + b"data: {not json\n\n")
                    self.wfile.flush()
                    return
                for index, word in enumerate(words):
                    if server.mode == "die" and index == 2:
                        self.wfile.flush()
                        self.connection.shutdown(2)  # cut the stream without [DONE]
                        return
                    if server.mode == "hang" and index == 1:
                        self.wfile.flush()
                        server.release.wait(30)
                        return
                    try:
                        self.wfile.write(_chunk(word))
                        self.wfile.flush()
                    except OSError:
                        server.client_gone.set()
                        return
                    if server.delay:
                        time.sleep(server.delay)
                    if server.gate is not None and index == 0:
                        server.gate.wait(60)
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        if self.gate is not None:
            self.gate.set()
        if self.title_gate is not None:
            self.title_gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()
