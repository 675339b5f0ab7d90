"""LLM-judge grading: one call per (response, rubric list), a JSON list of 0/1 back.

    judge = make_judge(cfg.grade.judge, cache_path)
    verdicts = judge.grade_many([JudgeTask(conversation, response, criteria), ...])

Backends: `openai` (any OpenAI-compatible HTTP endpoint through the openai client:
vLLM's `vllm serve`, a hosted API) and `local` (one of herl's generation engines on a
local model folder). openai calls run `concurrency` at a time, each with a timeout,
retried with exponential backoff on timeouts, connection errors, HTTP 429 and 5xx, and
once more on an unparseable reply. The local backend answers all prompts in one batch,
without retries: an unparseable reply is `unknown` at once, and an engine error fails the
call (it would fail again). Definitive answers are cached in SQLite under the key
(judge model, prompt) -- the prompt holds the conversation, response and rubric -- so
a resumed stage does not pay twice; failures are not cached. When no verdict can be
had the items are `unknown` with the reason as detail: never a silent 0/1.

The API key is read from the environment variable `api_key_env` or the Prefect Secret
block `api_key_secret` at call time and is never written anywhere: every failure reason
is passed through `redact` (the key's value, and any Authorization / API-key header a
server echoes back) before it is stored as a verdict's detail or logged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herl.grading.checks import JUDGE_KIND, MET, UNKNOWN, UNMET, Verdict
from herl.util.templating import template
from schemas.errors import UserError


@dataclass(frozen=True)
class JudgeTask:
    conversation: str
    response: str
    criteria: tuple[str, ...]
    weights: tuple[float, ...] = ()  # shown beside the items when any differs from 1 (the reference shows them)
    question: str = ""  # the user turns, joined by newlines: what the reference's judge wording shows


@dataclass
class JudgeStats:
    calls: int = 0
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


def _render_fenced(name: str, task: JudgeTask) -> str:
    # the fence id is a hash of the response: the response cannot contain its own marker
    fence = hashlib.sha256(task.response.encode()).hexdigest()[:16]
    show = any(w != 1.0 for w in task.weights)
    items = [f"{c} (weight {w:g})" if show else c for c, w in zip(task.criteria, task.weights or [1.0] * len(task.criteria))]
    return template(name).render(conversation=task.conversation, response=task.response, fence=fence,
                                 items=items).strip()


# the reference's system prompt for its per-item judge (rar_implicit.py SYSTEM_PROMPT, lines 33-37)
REFERENCE_SYSTEM = (
    "You are an expert evaluator. For each rubric item, decide whether the response satisfies it. "
    "Return a JSON object with a single key \"results\" whose value is a list of 0/1 integers. "
    "The list length must equal the number of rubrics and each entry corresponds to the rubric with the same index."
)


def build_judge_prompt(task: JudgeTask, wording: str = "herl") -> str:
    """The user prompt of a per-item judge call (grade.judge.template): herl's judge.j2, or
    the reference's (sent under REFERENCE_SYSTEM), whose rubric lines always carry weights."""
    if wording == "reference":
        weights = task.weights or (1.0,) * len(task.criteria)
        items = [f"{c.strip()} (weight: {w:g})" for c, w in zip(task.criteria, weights)]
        return template("judge_reference.j2").render(question=task.question, response=task.response,
                                                     items=items).strip()
    return _render_fenced("judge.j2", task)


def judge_system(wording: str) -> str | None:
    """The system prompt of a per-item judge call, or None (herl's wording sends none)."""
    return REFERENCE_SYSTEM if wording == "reference" else None


def build_holistic_prompt(task: JudgeTask) -> str:
    return _render_fenced("judge_holistic.j2", task)


def parse_score(text: str) -> int:
    """The last integer from 1 to 10 in the judge's reply."""
    found = [int(x) for x in re.findall(r"(?<![\d.])(10|[1-9])(?![\d.])", text)]
    if not found:
        raise ParseError(f"no score from 1 to 10 in the judge's reply: {text[:200]!r}")
    return found[-1]


def conversation_text(messages: list[dict]) -> str:
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages)


class ParseError(ValueError):
    pass


REDACTED = "[REDACTED]"
# header-like credentials a server may echo back: "Authorization: Bearer x", "'api-key': 'x'", "X-Api-Key=x"
_CREDENTIAL = re.compile(
    r"""(?i)((?:proxy-)?authorization|x-api-key|api[-_]?key|openai-api-key)(["']?\s*[:=]\s*["']?)"""
    r"""(?:(bearer|basic|token)\s+)?[^\s"',;}\]]+""")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` with the given secrets and any echoed credential header replaced by [REDACTED]."""
    text = _CREDENTIAL.sub(lambda m: f"{m.group(1)}{m.group(2)}{(m.group(3) + ' ') if m.group(3) else ''}{REDACTED}", text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    for secret in secrets:  # last: the key's value wherever else it appears
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    return text


def parse_verdicts(text: str, n: int) -> list[int]:
    """The last JSON list of n 0/1 values in `text` (code fences and prose around it allowed)."""
    candidates = re.findall(r"\[[^\[\]]*\]", text)
    if not candidates:
        raise ParseError(f"no JSON list in the judge's reply: {text[:200]!r}")
    last_error = ""
    for raw in reversed(candidates):
        try:
            values = json.loads(raw)
        except json.JSONDecodeError as exc:
            last_error = f"malformed JSON list {raw[:80]!r}: {exc}"
            continue
        out: list[int] = []
        binary = True
        for v in values:
            if isinstance(v, bool) or (isinstance(v, (int, float)) and v in (0, 1)):
                out.append(int(v))
            elif isinstance(v, str) and v.strip() in ("0", "1"):
                out.append(int(v.strip()))
            else:
                binary = False
                break
        if not binary:
            last_error = f"list has values other than 0/1: {raw[:80]!r}"
            continue
        if len(out) != n:
            last_error = f"list has {len(out)} values for {n} rubric items: {raw[:80]!r}"
            continue
        return out
    raise ParseError(last_error)



def _verdict_parser(n: int) -> Callable[[str], list[int]]:
    """parse_verdicts bound to one task's criterion count."""
    return lambda text: parse_verdicts(text, n)

class JudgeCache:
    """SQLite cache of definitive judge answers, safe across threads."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._con = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._con = sqlite3.connect(str(path), check_same_thread=False)
            self._con.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._con.commit()

    @staticmethod
    def key(model: str, prompt: str) -> str:
        return hashlib.sha256(f"{model}\0{prompt}".encode()).hexdigest()

    def get(self, key: str) -> list[int] | None:
        if self._con is None:
            return None
        with self._lock:
            row = self._con.execute("SELECT value FROM verdicts WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: list[int]) -> None:
        if self._con is None:
            return
        with self._lock:
            self._con.execute("INSERT OR REPLACE INTO verdicts (key, value) VALUES (?, ?)", (key, json.dumps(value)))
            self._con.commit()

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None


class TransientError(RuntimeError):
    """A call that may succeed when repeated (timeout, connection, 429, 5xx)."""


class Judge:
    """Grades judge items through a backend's `complete(prompts) -> texts`."""

    def __init__(self, cfg, backend, cache: JudgeCache):
        self.cfg, self.backend, self.cache = cfg, backend, cache
        self.stats = JudgeStats()
        self.name = f"judge:{cfg.backend}:{cfg.model}"
        self.wording = getattr(cfg, "template", "herl")

    def grade_many(self, tasks: list[JudgeTask]) -> list[list[Verdict]]:
        if not tasks:
            return []
        if getattr(self.backend, "batched", False):
            return self._grade_batched(tasks)
        from herl.util.progress import Progress

        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool, \
                Progress("judge", len(tasks), "answers") as progress:
            out = []
            for verdicts in pool.map(self._grade_one, tasks):  # in order, as they finish
                out.append(verdicts)
                progress.update(1)
            return out

    def _verdicts(self, values: list[int], detail: str = "") -> list[Verdict]:
        return [Verdict(MET if v else UNMET, self.name, detail) for v in values]

    def _unknown(self, task: JudgeTask, reason: str) -> list[Verdict]:
        self.stats.add(failures=1)
        return [Verdict(UNKNOWN, self.name, self._redact(reason)[:500]) for _ in task.criteria]

    def _redact(self, reason: str) -> str:
        return redact(reason, tuple(getattr(self.backend, "secrets", ())))

    def _grade_one(self, task: JudgeTask) -> list[Verdict]:
        n = len(task.criteria)
        values, reason, cached = self._ask(build_judge_prompt(task, self.wording), lambda text: parse_verdicts(text, n),
                                           judge_system(self.wording))
        return self._verdicts(values, "cached" if cached else "") if values is not None else self._unknown(task, reason)

    def _grade_batched(self, tasks: list[JudgeTask]) -> list[list[Verdict]]:
        answers = self._ask_batched([build_judge_prompt(t, self.wording) for t in tasks],
                                    [_verdict_parser(len(t.criteria)) for t in tasks], judge_system(self.wording))
        return [self._verdicts(v, "cached" if c else "") if v is not None else self._unknown(t, r)
                for t, (v, r, c) in zip(tasks, answers)]

    def score_many(self, tasks: list[JudgeTask]) -> list[tuple[float | None, str]]:
        """RaR's implicit reward: one holistic 1-10 score per response, as (score - 1) / 9 in [0, 1]."""
        prompts = [build_holistic_prompt(t) for t in tasks]
        if getattr(self.backend, "batched", False):
            answers = self._ask_batched(prompts, [parse_score] * len(prompts))
        else:
            with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
                answers = list(pool.map(lambda p: self._ask(p, parse_score), prompts))
        out = []
        for value, reason, _ in answers:
            if value is None:
                self.stats.add(failures=1)
            out.append(((value - 1) / 9 if value is not None else None, self._redact(reason)))
        return out

    def _key(self, prompt: str, system: str | None) -> str:
        """The cache key of a call: the model, the system prompt if any, the prompt."""
        return self.cache.key(self.cfg.model, prompt if system is None else f"{system}\n\n{prompt}")

    def _ask(self, prompt: str, parse, system: str | None = None) -> tuple[Any, str, bool]:
        """One prompt (under a system prompt, if given) with cache, retries and parsing:
        (value or None, failure reason, from cache)."""
        key = self._key(prompt, system)
        cached = self.cache.get(key)
        if cached is not None:
            self.stats.add(cache_hits=1)
            return cached, "", True
        reason = ""
        parse_failures = 0
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                self.stats.add(retries=1)
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                self.stats.add(calls=1)
                text = self.backend.complete_one(prompt, system)
                value = parse(text)
            except TransientError as exc:
                reason = f"judge call failed: {exc}"
                continue
            except ParseError as exc:  # the reply's text, or the reply itself (not text)
                reason = f"unparseable judge reply: {exc}"
                parse_failures += 1
                if parse_failures > self.cfg.parse_retries:
                    break
                continue
            except Exception as exc:  # a permanent error (4xx, bad config): no point retrying
                return None, f"judge call failed: {type(exc).__name__}: {exc}", False
            self.cache.put(key, value)
            return value, "", False
        return None, reason, False

    def _ask_batched(self, prompts: list[str], parsers, system: str | None = None) -> list[tuple[Any, str, bool]]:
        keys = [self._key(p, system) for p in prompts]
        out: list[tuple[object | None, str, bool] | None] = [None] * len(prompts)
        todo = []
        for i, key in enumerate(keys):
            cached = self.cache.get(key)
            if cached is not None:
                self.stats.add(cache_hits=1)
                out[i] = (cached, "", True)
            else:
                todo.append(i)
        if todo:
            self.stats.add(calls=len(todo))
            for i, text in zip(todo, self.backend.complete_batch([prompts[i] for i in todo], system)):
                try:
                    value = parsers[i](text)
                except ParseError as exc:
                    out[i] = (None, f"unparseable judge reply: {exc}", False)
                    continue
                self.cache.put(keys[i], value)
                out[i] = (value, "", False)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.cache.close()
        close = getattr(self.backend, "close", None)
        if close:
            close()


class JudgeKeyError(UserError, ValueError):
    """No API key for an OpenAI-compatible judge (the user's to set)."""


def resolve_api_key(cfg) -> str:
    """The judge API key from the environment or a Prefect Secret block (never stored)."""
    if cfg.api_key_secret:
        from prefect.blocks.system import Secret

        secret: Any = Secret.load(cfg.api_key_secret)  # a block (sync context), not a coroutine
        return secret.get()
    key = os.environ.get(cfg.api_key_env)
    if key:
        return key
    if cfg.base_url:
        return "EMPTY"  # local OpenAI-compatible servers (vllm serve) accept any key
    raise JudgeKeyError(f"no judge API key: set the environment variable {cfg.api_key_env} or "
                     "grade.judge.api_key_secret (a Prefect Secret block), or point grade.judge.base_url at a local server")


class OpenAIBackend:
    """Chat completions on an OpenAI-compatible endpoint."""

    batched = False

    def __init__(self, cfg):
        import openai

        self.cfg = cfg
        self._openai = openai
        key = resolve_api_key(cfg)
        self.secrets = (key,)  # what Judge redacts from every failure reason
        self.client = openai.OpenAI(base_url=cfg.base_url, api_key=key, timeout=cfg.timeout_s, max_retries=0)

    def complete_one(self, prompt: str, system: str | None = None) -> str:
        o = self._openai
        messages: list[Any] = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": prompt}]
        try:
            resp = self.client.chat.completions.create(
                model=self.cfg.model, messages=messages,
                temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens)
        except (o.APITimeoutError, o.APIConnectionError, o.RateLimitError, o.InternalServerError) as exc:
            raise TransientError(f"{type(exc).__name__}: {exc}") from None
        except o.APIStatusError as exc:
            if exc.status_code >= 500:
                raise TransientError(f"HTTP {exc.status_code}") from None
            raise
        if not hasattr(resp, "choices"):  # a 200 whose body is not a chat completion (an HTML page, a proxy's)
            raise TransientError(f"the reply is not a chat completion but {type(resp).__name__} "
                                 f"{str(resp)[:60]!r}: is grade.judge.base_url the API's /v1 address?")
        content = resp.choices[0].message.content if resp.choices else None
        if content is None:
            raise TransientError("empty completion")
        return message_text(content)

    def close(self) -> None:
        self.client.close()


def message_text(content: object) -> str:
    """A reply message's text: a string, or a list of content parts (some OpenAI-compatible
    servers send [{"type": "text", "text": ...}, ...]) whose text parts are joined. Anything
    else is an unparseable reply (ParseError): retried, then `unknown`."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") in ("text", "output_text")]
        if texts and all(isinstance(t, str) for t in texts):
            return "".join(texts)  # type: ignore[arg-type]
    raise ParseError(f"message content is {type(content).__name__} {str(content)[:60]!r}, not text")


class LocalBackend:
    """A herl generation engine on a local model folder, all prompts in one batch."""

    batched = True

    def __init__(self, cfg):
        from herl.generation.engines import load_engine
        from herl.models.paths import resolve_model_path

        self.cfg = cfg
        self.engine = load_engine(cfg.local_engine, resolve_model_path(cfg.model))

    def complete_batch(self, prompts: list[str], system: str | None = None) -> list[str]:
        from herl.generation.engines import GenRequest, SamplingParams, derive_seed, render_chat

        head = [{"role": "system", "content": system}] if system else []
        reqs = [GenRequest(str(i), render_chat(self.engine.tokenizer, head + [{"role": "user", "content": p}])[1],
                           derive_seed("judge", p), 1) for i, p in enumerate(prompts)]
        outs = self.engine.generate(reqs, SamplingParams(self.cfg.temperature, 1.0, 0, self.cfg.max_tokens))
        return [o[0].text for o in outs]

    def close(self) -> None:
        self.engine.close()


def make_judge(cfg, cache_path: Path | None) -> Judge:
    backend = OpenAIBackend(cfg) if cfg.backend == "openai" else LocalBackend(cfg)
    return Judge(cfg, backend, JudgeCache(cache_path if cfg.cache else None))


# Items of known answer the pre-flight asks a judge (grade.judge.probe): (task, expected 0/1 per item)
PROBE: tuple[tuple[JudgeTask, tuple[int, ...]], ...] = (
    (JudgeTask("user: What is the capital of France?", "The capital of France is Paris.",
               ("The response names Paris as the capital of France.", "The response is written in German."),
               question="What is the capital of France?"), (1, 0)),
    (JudgeTask("user: Write one sentence about cats.", "Dogs bark loudly at night.",
               ("The response is about cats.", "The response is a single sentence."),
               question="Write one sentence about cats."), (0, 1)),
)


def probe_judge(cfg, need_right: int = 3) -> str | None:
    """Ask the judge (grade.judge) the PROBE items; None when it answers at least
    `need_right` of them right, else why not, with what it replied (its first unparsed
    reply, or its verdicts). No cache: the probe asks the judge itself."""
    judge = make_judge(cfg.model_copy(update={"cache": False}), None)
    try:
        got = judge.grade_many([task for task, _ in PROBE])
    finally:
        judge.close()
    expected = [e for _, want in PROBE for e in want]
    verdicts = [v for vs in got for v in vs]
    right = sum((v.strict == MET) == bool(e) and v.strict != UNKNOWN for v, e in zip(verdicts, expected, strict=True))
    if right >= need_right:
        return None
    unknown = sum(v.strict == UNKNOWN for v in verdicts)
    said = next((v.detail for v in verdicts if v.strict == UNKNOWN and v.detail), None)
    shown = f"it replied: {said[:300]!r}" if said else "its verdicts: " + ", ".join(v.strict for v in verdicts)
    return (f"the judge ({cfg.backend} {cfg.model}) answered {right} of {len(expected)} probe items of known answer "
            f"right ({unknown} unknown); {shown}")


class JudgeProbeError(UserError, RuntimeError):
    """The judge answered too few items of known answer right (grade.judge.probe)."""


def check_judge(grade_cfg, rubrics) -> None:
    """The pre-flight's judge probe: when `rubrics` (the items of every prompt) hold judge
    items, or the reward is the judge's holistic score, and grade.judge.probe is on."""
    if not grade_cfg.judge.probe:
        return
    if grade_cfg.reward != "implicit" and not any(it.get("kind") == JUDGE_KIND for items in rubrics for it in items):
        return
    key = grade_cfg.judge.model_dump_json()
    if key in _PROBED:  # once per process: the pre-flight and the flow both check the pool
        return
    why = probe_judge(grade_cfg.judge)
    if why is not None:
        raise JudgeProbeError(f"{why}. A judge must answer in the required format: serve an instruction model "
                              "(examples/served_judge.toml), or set grade.judge.probe = false to go on anyway")
    _PROBED.add(key)


_PROBED: set[str] = set()  # judge configs that passed the probe in this process
