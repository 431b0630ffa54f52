"""Conversations: which requests belong together, and what the router knows of each.

Claude Code re-sends the whole conversation every turn, and most of its input is read from the
prompt cache of the endpoint that served the last turn. Each endpoint is its own cache, so
where a conversation goes next is a question of money (see `cost`). This module identifies a
conversation and keeps what it showed on its last turn. Pure: no I/O, times passed in.
"""

import hashlib
import json
import re
from dataclasses import dataclass, replace

DEFAULT_TTL = 300.0  # "cache_control": {"type": "ephemeral"}
LONG_TTL = 3600.0  # "ttl": "1h"
_USER_SESSION = re.compile(r"_session_([0-9A-Za-z-]{8,64})$")


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
    return "p:" + hashlib.sha256(basis.encode("utf-8", "surrogatepass")).hexdigest()[:32]


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


# -- what an endpoint showed about its prompt cache ------------------------------------------

# Tokens: a shorter prompt is not expected to have been cached (1,024 is the API's minimum for
# most models, 4,096 for some), so no read is expected and no miss is learned below it.
MIN_CACHEABLE = 4096
MISSES_TO_LEARN = 2  # consecutive expected reads that did not happen: it does not cache


@dataclass(frozen=True)
class Learned:
    """An endpoint's measured prompt-cache behaviour (optimistic until shown otherwise)."""

    hits: int = 0
    misses: int = 0  # consecutive
    expected: int = 0

    @property
    def caches(self) -> bool:
        return self.misses < MISSES_TO_LEARN


UNKNOWN = Learned()


def expects_cache(ttl: float, prompt_tokens: int) -> bool:
    """Should an endpoint that caches show cache activity for this turn? With breakpoints on a
    prompt of a cacheable size, it either reads the prefix (warm) or writes it (cold); a relay
    that ignores ``cache_control`` does neither."""
    return ttl > 0 and prompt_tokens >= MIN_CACHEABLE


def observe(learned: Learned, cache_tokens: int) -> Learned:
    """An expected cache read or write happened (or did not)."""
    if cache_tokens > 0:
        return Learned(learned.hits + 1, 0, learned.expected + 1)
    return Learned(learned.hits, learned.misses + 1, learned.expected + 1)
