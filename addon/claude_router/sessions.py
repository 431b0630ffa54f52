"""Conversations: which requests belong together, and what the router knows of each.

Claude Code re-sends the whole conversation every turn, and most of its input is read from the
prompt cache of the endpoint that served the last turn. Each endpoint is its own cache, so
where a conversation goes next is a question of money (see `cost`). This module identifies a
conversation and keeps what it showed on its last turn. Pure: no I/O, times passed in.
"""

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

DEFAULT_TTL = 300.0  # "cache_control": {"type": "ephemeral"}
LONG_TTL = 3600.0  # "ttl": "1h"
_USER_SESSION = re.compile(r"_session_([0-9A-Za-z-]{8,64})$")


def digest(text: str, n: int) -> str:
    """The first ``n`` hex digits of the SHA-256 of ``text`` (any str, lone surrogates too):
    how a conversation's id, prompt or record is named wherever it must not be shown."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def session_id(headers: list[tuple[str, str]], doc: dict | None) -> str | None:
    """A conversation's identity: Claude Code's ``X-Claude-Code-Session-Id`` (with its agent
    id: a sub-agent has a prompt of its own), else the ``session_id`` in
    ``metadata.user_id`` (``user_..._session_<uuid>`` or a JSON string), else a hash of the
    cacheable prefix (tools, system and the first message). None when nothing identifies it."""
    session = agent = None
    for k, v in headers:
        lk = k.lower()
        if lk == "x-claude-code-session-id" and v.strip():
            session = v.strip()[:128]
        elif lk == "x-claude-code-agent-id" and v.strip():
            agent = v.strip()[:128]
    if session:
        return f"cc:{session}/{agent}" if agent else f"cc:{session}"
    return _from_body(doc)


def _from_body(doc: dict | None) -> str | None:
    if not isinstance(doc, dict):
        return None
    meta = doc.get("metadata")
    uid = meta.get("user_id") if isinstance(meta, dict) else None
    if isinstance(uid, str):
        if m := _USER_SESSION.search(uid):
            return f"u:{m.group(1)}"
        if uid.startswith("{"):
            try:
                sid = json.loads(uid).get("session_id")
            except (ValueError, AttributeError, RecursionError):
                sid = None
            if isinstance(sid, str) and sid:
                return f"u:{sid[:128]}"
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    try:
        basis = json.dumps([doc.get("tools"), doc.get("system"), messages[0]], sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return None
    return "p:" + digest(basis, 32)


def cache_ttl(doc: dict | None) -> float:
    """The cache TTL a request asks for: 1 h if any breakpoint says so, else 5 min; 0 when it
    marks no breakpoint (nothing is cached, so nothing is lost by moving)."""
    found = _ttls(doc)
    if not found:
        return 0.0
    return LONG_TTL if "1h" in found else DEFAULT_TTL


def _ttls(node, depth: int = 0) -> set[str]:
    if depth > 8:
        return set()
    found: set[str] = set()
    if isinstance(node, dict):
        cc = node.get("cache_control")
        if isinstance(cc, dict):
            found.add(str(cc.get("ttl", "5m")))
        for k in ("tools", "system", "messages", "content"):
            if k in node:
                found |= _ttls(node[k], depth + 1)
    elif isinstance(node, list):
        for item in node:
            found |= _ttls(item, depth + 1)
    return found


@dataclass(frozen=True)
class Session:
    """What one conversation showed on its last answered turn."""

    endpoint: str  # where its cache is warm
    prompt_tokens: int  # the last turn's whole prompt (fresh + written + read)
    output_tokens: float  # average output per turn
    ttl: float  # its cache TTL (seconds)
    last: float  # wall-clock end of the last turn
    turns: int = 1
    moved_from: str = ""  # the endpoint it left on its last move: it may still hold its prefix
    why: str = ""  # why it is where it is
    left_at: float = 0.0  # when it last used ``moved_from`` (its cache there ages from then)
    left_prompt: int = 0  # its prompt then: what ``moved_from`` may still hold

    def warm(self, now: float) -> bool:
        return self.ttl > 0 and now - self.last < self.ttl

    def cached_at(self, endpoint: str, now: float) -> int:
        """Prompt tokens ``endpoint`` may still hold for this conversation (0: cold)."""
        if self.ttl <= 0:
            return 0
        if endpoint == self.endpoint and now - self.last < self.ttl:
            return self.prompt_tokens
        if endpoint == self.moved_from and now - self.left_at < self.ttl:
            return self.left_prompt
        return 0

    def to_dict(self) -> dict:
        return {"e": self.endpoint, "p": self.prompt_tokens, "o": round(self.output_tokens, 1),
                "t": self.ttl, "l": round(self.last, 3), "n": self.turns, "m": self.moved_from,
                "w": self.why, "la": round(self.left_at, 3), "lp": self.left_prompt}

    @classmethod
    def from_dict(cls, d: dict) -> "Session":
        """From what a store holds; ValueError for anything out of range (garbage)."""
        s = cls(str(d["e"]), int(d["p"]), float(d["o"]), float(d["t"]), float(d["l"]),
                int(d.get("n", 1)), str(d.get("m", "")), str(d.get("w", "")),
                float(d.get("la", 0.0)), int(d.get("lp", 0)))
        if not (0 <= s.prompt_tokens < 1 << 40 and 0 <= s.output_tokens < 1e12
                and 0 <= s.left_prompt < 1 << 40 and 0 <= s.left_at < 1e11
                and 0 <= s.ttl <= 86400 and 0 <= s.last < 1e11 and 0 < s.turns < 1 << 31
                and len(s.endpoint) <= 64):
            raise ValueError("session state out of range")
        return s


def after_turn(prev: Session | None, endpoint: str, prompt_tokens: int, output_tokens: int,
               ttl: float, now: float, why: str = "") -> Session:
    """The session once a turn was answered by ``endpoint``."""
    if prev is None:
        return Session(endpoint, prompt_tokens, float(output_tokens), ttl, now, 1, "", why)
    n = prev.turns + 1
    avg = prev.output_tokens + (output_tokens - prev.output_tokens) / n
    if prev.endpoint != endpoint:  # it moved: the endpoint it left keeps its prefix a while
        return replace(prev, endpoint=endpoint, prompt_tokens=prompt_tokens, output_tokens=avg,
                       ttl=ttl or prev.ttl, last=now, turns=n, moved_from=prev.endpoint, why=why,
                       left_at=prev.last, left_prompt=prev.prompt_tokens)
    return replace(prev, prompt_tokens=prompt_tokens, output_tokens=avg, ttl=ttl or prev.ttl,
                   last=now, turns=n, why=why)


# -- whose conversation it is ------------------------------------------------------------------

def record_key(owner: str, sid: str, family: str) -> str:
    """The key of a conversation's record: the credential that started it (``owner``, a keyed
    hash: access.credential_id), a hash of its id (never the id itself: not in memory, Redis or
    the status) and its model family. A request that carries another client's session id
    finds, and changes, only its own credential's record."""
    hashed = digest(f"{owner}\n{sid}", 32)
    return f"{owner}:{hashed}#{family}"


def shown(key: str) -> dict:
    """What the status shows of a record's key: the credential hash and 12 hex digits of the
    conversation's hash (with its family), never a session id."""
    owner, _, rest = key.partition(":")
    hashed, _, family = rest.partition("#")
    return {"session": f"{hashed[:12]}#{family}" if family else hashed[:12], "client": owner[:16]}


def source(key: str) -> str:
    """A record's short, stable name among the evidence for a learned fact."""
    return digest(key, 12)


# -- how much of a request a cache could hold ----------------------------------------------------

# Tokens. The smallest prefix an endpoint caches depends on the model it serves (Anthropic:
# 1,024 for Sonnet 4.5 and Opus 4/4.1, 2,048 for Sonnet 4.6 and the Haiku 3 models, 4,096 for
# Opus 4.5/4.6 and Haiku 4.5), and relays map ids, so each family gets its largest minimum and
# an unknown model the largest of all: below it, no read or write is expected and none is missed.
MIN_CACHEABLE = 4096
MIN_CACHEABLE_BY_FAMILY = {"sonnet": 2048, "haiku": 4096, "opus": 4096}

_PIECE = re.compile(r"\s?\w+|\s?[^\w\s]|\s+")
MAX_TOKEN_CHARS = 16  # a word longer than this counts one token per 16 characters
_SKIPPED = frozenset({"cache_control", "type", "source", "signature", "data", "id", "tool_use_id"})


def min_cacheable(*models: str | None) -> int:
    """The smallest prefix cached for these model ids (the client's, and the one an endpoint
    maps it to): the largest of their minimums."""
    def one(model: str | None) -> int:
        lowered = model.lower() if isinstance(model, str) else ""
        return next((n for fam, n in MIN_CACHEABLE_BY_FAMILY.items() if fam in lowered), MIN_CACHEABLE)

    return max((one(m) for m in models), default=MIN_CACHEABLE)


def text_tokens(text: str, cap: int) -> int:
    """A low estimate of a text's tokens, counted up to ``cap``: one per word, mark or run of
    space (a word of more than 16 characters one per 16), and never more than one per 4
    characters. Padding that tokenizes into few tokens ("aaaa...", long runs of spaces) is not
    counted as many."""
    quarter = (len(text) + 3) // 4
    limit = min(cap, quarter)
    n = 0
    for m in _PIECE.finditer(text):
        n += -(-(m.end() - m.start()) // MAX_TOKEN_CHARS)
        if n >= limit:
            return limit
    return n


def _block_tokens(node, cap: int, depth: int = 0) -> int:
    """Tokens of the strings a block renders (not its type, ids, signatures, image or document
    payloads, nor earlier turns' thinking, which the API drops), counted up to ``cap``."""
    if depth > 12 or cap <= 0:
        return 0
    if isinstance(node, str):
        return text_tokens(node, cap)
    n = 0
    items: Iterator[Any]
    if isinstance(node, dict):
        if node.get("type") in ("thinking", "redacted_thinking", "image"):
            return 0
        items = (v for k, v in node.items() if k not in _SKIPPED)
    elif isinstance(node, list):
        items = iter(node)
    else:
        return 0
    for v in items:
        n += _block_tokens(v, cap - n, depth + 1)
        if n >= cap:
            break
    return n


def _prompt_blocks(doc: dict):
    """The prompt's blocks in the order a cache prefix covers them: tools, system, messages."""
    for section in ("tools", "system"):
        part = doc.get(section)
        if isinstance(part, list):
            yield from part
        elif isinstance(part, str):
            yield part
    messages = doc.get("messages")
    for msg in messages if isinstance(messages, list) else ():
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):
            yield from content
        elif isinstance(content, str):
            yield content


def breakpoint_prefix_tokens(doc: dict | None, cap: int = 1 << 40) -> int:
    """A low estimate of the tokens of a request's prompt up to its last ``cache_control``
    breakpoint (a top-level ``cache_control`` marks the last block), counted up to ``cap``;
    0 without a breakpoint. Pure over the request JSON. A tiny marked first block before a
    long unmarked one is tiny: no cache could have held it."""
    if not isinstance(doc, dict):
        return 0
    top = isinstance(doc.get("cache_control"), dict)
    n = upto = 0
    for block in _prompt_blocks(doc):
        if n < cap:
            n += _block_tokens(block, cap - n)
        if isinstance(block, dict) and isinstance(block.get("cache_control"), dict):
            upto = n
            if upto >= cap:
                return cap
    return min(cap, n if top else upto)


# -- what an endpoint showed about its prompt cache ------------------------------------------

MISSES_TO_LEARN = 2  # consecutive expected reads or writes that did not happen...
SOURCES_TO_LEARN = 2  # ...in as many conversations (of one client or several): it does not cache
MAX_SOURCES = 4
LEARNED_TTL = 3600.0  # seconds: a fact not seen again for this long is forgotten, then re-checked


@dataclass(frozen=True)
class Learned:
    """An endpoint's measured prompt-cache behaviour (optimistic until shown otherwise)."""

    hits: int = 0
    misses: int = 0  # consecutive
    expected: int = 0
    sources: tuple[str, ...] = ()  # the distinct conversations those misses came from
    at: float = 0.0  # when it was last observed

    @property
    def caches(self) -> bool:
        return self.misses < MISSES_TO_LEARN or len(self.sources) < SOURCES_TO_LEARN

    def fresh(self, now: float) -> bool:
        return now - self.at < LEARNED_TTL

    def encode(self) -> str:
        """As the shared store holds it: ``hits:misses:expected:at:source,source``."""
        return f"{self.hits}:{self.misses}:{self.expected}:{self.at:.3f}:{','.join(self.sources)}"

    @classmethod
    def decode(cls, raw: str) -> "Learned":
        """From the shared store; ValueError for anything else (garbage, or an older router's
        three counts, which carry no time nor sources: they are not believed)."""
        h, m, e, at, srcs = raw.split(":")
        sources = tuple(s for s in srcs.split(",") if s)
        learned = cls(int(h), int(m), int(e), sources, float(at))
        if not (0 <= learned.hits < 1 << 62 and 0 <= learned.misses < 1 << 62
                and 0 <= learned.expected < 1 << 62 and 0 <= learned.at < 1e11
                and len(sources) <= MAX_SOURCES and len(set(sources)) == len(sources)
                and all(len(s) <= 16 and s.isalnum() for s in sources)):
            raise ValueError("learned state out of range")
        return learned


UNKNOWN = Learned()


def fresh(learned: dict[str, "Learned"], now: float) -> dict[str, "Learned"]:
    """The facts still believed: each expires ``LEARNED_TTL`` after it was last observed, so an
    endpoint once judged not to cache is tried again (and re-judged by its answers)."""
    return {name: lr for name, lr in learned.items() if lr.fresh(now)}


def expects_cache(ttl: float, prefix_tokens: int, prompt_tokens: int, minimum: int) -> bool:
    """Should an endpoint that caches show cache activity for this turn? With breakpoints whose
    prefix (up to the last one, estimated from the request) reaches the model's minimum
    cacheable size, in a prompt the endpoint itself counted at least that long, it either reads
    the prefix (warm) or writes it (cold); a relay that ignores ``cache_control`` does neither.
    Below the minimum nothing is cached anywhere, so no miss is learned."""
    return ttl > 0 and prefix_tokens >= minimum and prompt_tokens >= minimum


def observe(learned: Learned, cache_tokens: int, source: str, now: float) -> Learned:
    """An expected cache read or write happened (or did not) in conversation ``source``. A
    stale fact is started afresh; a read or write clears the misses and their sources."""
    if not learned.fresh(now):
        learned = UNKNOWN
    if cache_tokens > 0:
        return Learned(learned.hits + 1, 0, learned.expected + 1, (), now)
    sources = learned.sources
    if source not in sources:
        sources = (sources + (source,))[-MAX_SOURCES:]
    return Learned(learned.hits, learned.misses + 1, learned.expected + 1, sources, now)
