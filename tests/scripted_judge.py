"""A scripted OpenAI-compatible chat server on loopback, to provoke judge errors.

The behaviour for a request is picked by a `CASE:<name>` marker inside the response
being graded; the server counts calls per case, records prompts and headers, and
tracks how many requests were in flight at once.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ScriptedJudge:
    def __init__(self, delay: float = 0.05, slow_seconds: float = 2.0):
        self.delay, self.slow_seconds = delay, slow_seconds
        self.calls: Counter = Counter()
        self.prompts: list[str] = []
        self.systems: list[str | None] = []  # each request's system message, if it had one
        self.auth: set[str] = set()
        self.in_flight = 0
        self.probe_case = "probe_right"  # how the pre-flight probe is answered
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def reply(self, case: str, n_items: int, attempt: int, prompt: str = "") -> tuple[int, str | None]:
        """(HTTP status, message content) for this case and attempt (1-based); the content is
        text, or for the content_* cases what a non-conforming server puts there."""
        if case.startswith("score"):  # holistic prompts: CASE:score7 -> "7"
            return 200, f"Overall: {case[5:]}"
        ones = json.dumps([1] * n_items)
        if case == "probe_right":  # herl.grading.judge.PROBE's known answers
            return 200, json.dumps([1, 0] if "Paris" in prompt else [0, 1])
        if case == "ok":
            return 200, f"Here is my grading:\n```json\n{ones}\n```"
        if case == "zeros":
            return 200, json.dumps([0] * n_items)
        if case == "results":  # the reference wording's reply
            return 200, json.dumps({"results": [1, 0] * (n_items // 2) + [1] * (n_items % 2)})
        if case == "timeout_once":
            if attempt == 1:
                time.sleep(self.slow_seconds)
            return 200, ones
        if case == "http500_once":
            return (500, None) if attempt == 1 else (200, ones)
        if case == "always500":
            return 500, None
        if case == "malformed":
            return 200, "[1, 0,"
        if case == "wrong_length":
            return 200, json.dumps([1] * (n_items + 1))
        if case == "not_binary":
            return 200, json.dumps([2] * n_items)
        if case == "content_parts":  # a list of content parts, as some servers send
            return 200, [{"type": "text", "text": "Grading: "}, {"type": "text", "text": ones}]  # type: ignore[return-value]
        if case == "content_int":
            return 200, 1  # type: ignore[return-value]
        if case == "content_image_part":
            return 200, [{"type": "image_url", "image_url": {"url": "x"}}]  # type: ignore[return-value]
        if case == "http400":
            return 400, None
        if case in ("echo_auth400", "echo_auth500"):  # a server that echoes the request's headers in its error
            return int(case[-3:]), None
        if case == "html200":  # a proxy's or a web server's page, with status 200
            return 200, None
        raise AssertionError(f"unknown case {case}")

    def _handler(self):
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                system = body["messages"][0]["content"] if body["messages"][0]["role"] == "system" else None
                marker = re.search(r"CASE:(\w+)", prompt)
                # the pre-flight probe's items carry no marker: answered right (or as probe_case says)
                case = marker.group(1) if marker else judge.probe_case
                # herl's wording lists the items under "## Rubric", the reference's inside <rubrics>
                section = prompt.rsplit("## Rubric", 1)[1] if "## Rubric" in prompt else \
                    prompt.rsplit("<rubrics>", 1)[1].split("</rubrics>", 1)[0]
                n_items = len(re.findall(r"^(?:\d+\.|-) ", section, flags=re.MULTILINE))
                with judge._lock:
                    judge.calls[case] += 1
                    attempt = judge.calls[case]
                    judge.prompts.append(prompt)
                    judge.systems.append(system)
                    judge.auth.add(self.headers.get("Authorization", ""))
                    judge.in_flight += 1
                    judge.max_in_flight = max(judge.max_in_flight, judge.in_flight)
                try:
                    time.sleep(judge.delay)
                    status, text = judge.reply(case, n_items, attempt, prompt)
                finally:
                    with judge._lock:
                        judge.in_flight -= 1
                if status != 200 and case.startswith("echo_auth"):
                    payload = {"error": {"message": f"bad request; you sent Authorization: "
                                                    f"{self.headers.get('Authorization')} and {dict(self.headers)}",
                                         "type": "invalid_request_error"}}
                elif status != 200:
                    payload = {"error": {"message": f"scripted {status}", "type": "server_error"}}
                else:
                    payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": text}}],
                               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                data = json.dumps(payload).encode()
                content_type = "application/json"
                if case == "html200":
                    data, content_type = b"<html><body>Welcome to nginx!</body></html>", "text/html"
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

        return Handler
