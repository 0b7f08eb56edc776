"""Secrets the guest only sees as placeholders, and the per-request substitution rules.

A :class:`Secret` binds a guest environment variable to a real value and the hosts
that may receive it. The guest gets ``ENV=<placeholder>``; the proxy swaps the
placeholder for the value only on intercepted TLS whose SNI matches one of the hosts
and whose HTTP ``Host`` equals the SNI. The default placeholder is ``$MSB_<ENV>``
(the same convention as microsandbox), e.g. ``$MSB_OPENAI_API_KEY``.

Example::

    >>> from tls_proxy import Secret
    >>> s = Secret("OPENAI_API_KEY", "sk-real", ["api.openai.com"])
    >>> s.placeholder, s.guest_env()
    ('$MSB_OPENAI_API_KEY', {'OPENAI_API_KEY': '$MSB_OPENAI_API_KEY'})
    >>> "sk-real" in repr(s)
    False
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from tls_proxy._hosts import HostPattern, canonical_host
from tls_proxy.errors import ConfigError, SecretError

SCOPES = ("headers", "basic_auth", "query", "body")
"""Where a placeholder may be replaced: header values, decoded Basic auth, query, body."""
DEFAULT_SCOPES = ("headers", "basic_auth")
MAX_PLACEHOLDER = 1024
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Secret:
    """A real value the guest never sees, injected only for ``hosts``.

    ``hosts`` entries are exact names, ``*.suffix`` (apex included) or ``*``;
    ``inject`` is a subset of :data:`SCOPES` (default headers + basic_auth).
    The value never appears in ``repr``/``str`` or in error messages.

    Example::

        >>> s = Secret("TOKEN", "t0ps3cret", ["*.example.com"], inject=("headers", "query"))
        >>> s
        Secret(env='TOKEN', placeholder='$MSB_TOKEN', hosts=['*.example.com'], inject=('headers', 'query'))
    """

    __slots__ = ("_value", "env", "hosts", "inject", "placeholder")

    def __init__(
        self,
        env: str,
        value: str,
        hosts: Iterable[str] | str,
        placeholder: str | None = None,
        inject: Sequence[str] = DEFAULT_SCOPES,
    ) -> None:
        if not isinstance(env, str) or not _ENV_RE.match(env):
            raise SecretError(
                f"invalid secret env name {env!r}: must match [A-Za-z_][A-Za-z0-9_]*"
            )
        if not isinstance(value, str) or not value:
            raise SecretError(f"secret {env}: value must be a non-empty string")
        if any(c in value for c in "\r\n\x00"):
            raise SecretError(f"secret {env}: value must not contain CR, LF or NUL")
        ph = f"$MSB_{env}" if placeholder is None else placeholder
        if not isinstance(ph, str) or not ph or len(ph.encode()) > MAX_PLACEHOLDER:
            raise SecretError(
                f"secret {env}: placeholder must be 1..{MAX_PLACEHOLDER} bytes, got {ph!r}"
            )
        if any(c in ph for c in "\r\n\x00") or not ph.isprintable():
            raise SecretError(f"secret {env}: placeholder {ph!r} must be printable, no CR/LF/NUL")
        if ph in value:
            raise SecretError(f"secret {env}: placeholder {ph!r} must not occur in the value")
        host_list = [hosts] if isinstance(hosts, str) else list(hosts)
        if not host_list:
            raise SecretError(f"secret {env}: at least one allowed host is required")
        try:
            self.hosts: tuple[HostPattern, ...] = tuple(HostPattern.parse(h) for h in host_list)
        except ConfigError as e:
            raise SecretError(f"secret {env}: {e}") from None
        bad = [s for s in inject if s not in SCOPES]
        if bad or not inject:
            raise SecretError(
                f"secret {env}: invalid inject scopes {list(inject)!r}; allowed: {list(SCOPES)}"
            )
        self.env = env
        self._value = value
        self.placeholder = ph
        self.inject: tuple[str, ...] = tuple(dict.fromkeys(inject))

    @property
    def value(self) -> str:
        """The real value (host memory only)."""
        return self._value

    def guest_env(self) -> dict[str, str]:
        """What the guest environment should contain: ``{env: placeholder}``."""
        return {self.env: self.placeholder}

    def allows(self, host: str) -> bool:
        """True when ``host`` matches one of the allowed host patterns."""
        return any(p.matches(host) for p in self.hosts)

    def __repr__(self) -> str:
        return (
            f"Secret(env={self.env!r}, placeholder={self.placeholder!r}, "
            f"hosts={[str(h) for h in self.hosts]!r}, inject={self.inject!r})"
        )

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("Secret objects are not picklable (the value stays in memory)")


def parse_secret_spec(spec: str, environ: Mapping[str, str] | None = None) -> Secret:
    """Parse the CLI form ``ENV=VALUE@HOST[,HOST...]`` (the last ``@`` splits the hosts).

    ``ENV=@HOST`` (empty value) reads the value from ``environ[ENV]`` (default
    ``os.environ``), so the real value need not appear on a command line.

    Example::

        >>> parse_secret_spec("API_KEY=abc@api.example.com,*.example.org").hosts[1].name
        'example.org'
        >>> parse_secret_spec("TOK=@a.example", {"TOK": "from-env"}).value
        'from-env'
    """
    env, eq, rest = spec.partition("=")
    value, at, hosts = rest.rpartition("@")
    if not eq or not at or not env:
        raise SecretError(
            f"invalid --secret for {env or '?'}: expected ENV=VALUE@HOST[,HOST...]"
        )
    if not value:
        src = os.environ if environ is None else environ
        if env not in src:
            raise SecretError(f"secret {env}: no value given and ${env} is not set")
        value = src[env]
    return Secret(env, value, [h for h in hosts.split(",") if h])


_JSON_ESC = re.compile(rb'\\(u[0-9a-fA-F]{4}|["\\/bfnrt])')
_JSON_SIMPLE = {b'"': b'"', b"\\": b"\\", b"/": b"/", b"b": b"\b", b"f": b"\f", b"n": b"\n",
                b"r": b"\r", b"t": b"\t"}


def _json_unescape(data: bytes) -> bytes:
    def sub(m: re.Match[bytes]) -> bytes:
        g = m.group(1)
        if g[:1] == b"u":
            return chr(int(g[1:], 16)).encode("utf-8", "surrogatepass")
        return _JSON_SIMPLE[g]

    return _JSON_ESC.sub(sub, data)


def decoded_forms(data: bytes) -> list[tuple[str, bytes]]:
    """``data`` plus its percent-decoded and JSON-unescaped forms, each with its name.

    Example::

        >>> decoded_forms(b"a%24b")
        [('plain', b'a%24b'), ('percent-encoded', b'a$b')]
    """
    forms = [("plain", data)]
    if b"%" in data:
        forms.append(("percent-encoded", unquote_to_bytes(data)))
        if b"+" in data:
            forms.append(("percent-encoded", unquote_to_bytes(data.replace(b"+", b" "))))
    if b"\\" in data:
        j = _json_unescape(data)
        forms.append(("JSON-escaped", j))
        if b"%" in j:
            forms.append(("JSON-escaped", unquote_to_bytes(j)))
    return forms


def decode_basic(value: bytes) -> bytes | None:
    """The decoded ``user:pass`` of an ``Authorization: Basic ...`` value, else None.

    Example::

        >>> decode_basic(b"Basic dTpw"), decode_basic(b"Bearer x")
        (b'u:p', None)
    """
    parts = value.strip().split(None, 1)
    if len(parts) != 2 or parts[0].lower() != b"basic":
        return None
    try:
        return base64.b64decode(parts[1].strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


@dataclass(frozen=True)
class Violation:
    """A placeholder found on its way to a host that may not receive it (no value inside).

    Example::

        >>> Violation("TOKEN", "header", "percent-encoded").reason()
        'placeholder of secret TOKEN found in header (percent-encoded) for a host it is not allowed to reach'
    """

    env: str
    location: str
    form: str

    def reason(self) -> str:
        """Human-readable reason, safe to log and to send to the client."""
        return (
            f"placeholder of secret {self.env} found in {self.location} ({self.form}) "
            "for a host it is not allowed to reach"
        )


class Scanner:
    """Finds placeholders of ``secrets`` in bytes, in plain, percent, JSON or Basic form.

    Example::

        >>> sc = Scanner([Secret("K", "v", ["a.example"])])
        >>> sc.find(b'{"k": "\\\\u0024MSB_K"}', "body")
        Violation(env='K', location='body', form='JSON-escaped')
    """

    def __init__(self, secrets: Sequence[Secret]) -> None:
        self.secrets = tuple(secrets)
        self._needles = [(s.env, s.placeholder.encode()) for s in self.secrets]
        self.max_len = max((len(n) for _, n in self._needles), default=0)
        # Longest encoding of a placeholder byte is a JSON \\uXXXX escape (6 bytes).
        self.window = self.max_len * 6

    def __bool__(self) -> bool:
        return bool(self._needles)

    def find(self, data: bytes, location: str) -> Violation | None:
        """The first placeholder found in any decoded form of ``data``, else None."""
        if not self._needles or not data:
            return None
        for name, form in decoded_forms(data):
            for env, needle in self._needles:
                if needle in form:
                    return Violation(env, location, name)
        return None

    def find_basic(self, value: bytes) -> Violation | None:
        """Check a decoded ``Authorization: Basic`` value."""
        decoded = decode_basic(value)
        if decoded is None:
            return None
        v = self.find(decoded, "Authorization")
        return Violation(v.env, v.location, "base64 Basic auth") if v else None


class StreamScanner:
    """Scans a byte stream chunk by chunk, keeping a tail so split placeholders are caught.

    Example::

        >>> ss = StreamScanner(Scanner([Secret("K", "v", ["a.example"])]), "body")
        >>> ss.feed(b"xx$MS"), ss.feed(b"B_K yy")
        (None, Violation(env='K', location='body', form='plain'))
    """

    def __init__(self, scanner: Scanner, location: str) -> None:
        self.scanner = scanner
        self.location = location
        self._tail = b""

    def feed(self, chunk: bytes) -> Violation | None:
        """Scan ``chunk`` (with the previous tail); return a violation or None."""
        if not self.scanner:
            return None
        data = self._tail + chunk
        v = self.scanner.find(data, self.location)
        self._tail = data[-self.scanner.window :] if self.scanner.window else b""
        return v


class Substituter:
    """Replaces eligible placeholders in the scopes each secret allows.

    Example::

        >>> sub = Substituter([Secret("K", "real", ["a.example"], inject=("headers", "query"))])
        >>> sub.header_value(b"Bearer $MSB_K")
        b'Bearer real'
        >>> sub.target(b"/p/$MSB_K?k=$MSB_K")
        b'/p/$MSB_K?k=real'
    """

    def __init__(self, secrets: Sequence[Secret]) -> None:
        ordered = sorted(secrets, key=lambda s: -len(s.placeholder))
        # One pass over every placeholder (longest first), so a placeholder that is a
        # prefix of another never corrupts it; out-of-scope matches are kept as they are.
        self._re = (
            re.compile(b"|".join(re.escape(s.placeholder.encode()) for s in ordered))
            if ordered else None
        )
        self._by_scope: dict[str, dict[bytes, bytes]] = {
            scope: {s.placeholder.encode(): s.value.encode() for s in ordered if scope in s.inject}
            for scope in SCOPES
        }
        self.body = bool(self._by_scope["body"])

    def __bool__(self) -> bool:
        return any(self._by_scope.values())

    def _apply(self, scope: str, data: bytes) -> bytes:
        table = self._by_scope[scope]
        if not table or self._re is None:
            return data
        return self._re.sub(lambda m: table.get(m.group(0), m.group(0)), data)

    def header_value(self, value: bytes, is_authorization: bool = False) -> bytes:
        """Substitute in one header value (and inside Basic credentials when allowed)."""
        value = self._apply("headers", value)
        if is_authorization and self._by_scope["basic_auth"]:
            decoded = decode_basic(value)
            if decoded is not None:
                new = self._apply("basic_auth", decoded)
                if new != decoded:
                    value = value.strip().split(None, 1)[0] + b" " + base64.b64encode(new)
        return value

    def target(self, target: bytes) -> bytes:
        """Substitute in the query part of a request target only (never the path)."""
        if not self._by_scope["query"] or b"?" not in target:
            return target
        path, _, query = target.partition(b"?")
        return path + b"?" + self._apply("query", query)

    def body_bytes(self, body: bytes) -> bytes:
        """Substitute in a whole (buffered) body."""
        return self._apply("body", body)


class SecretPolicy:
    """All configured secrets; splits them per connection into eligible and ineligible.

    Example::

        >>> pol = SecretPolicy([Secret("K", "v", ["a.example"]), Secret("J", "w", ["*"])])
        >>> elig, inel = pol.split("b.example")
        >>> [s.env for s in elig], [s.env for s in inel]
        (['J'], ['K'])
    """

    def __init__(self, secrets: Iterable[Secret] = ()) -> None:
        self.secrets: tuple[Secret, ...] = tuple(secrets)
        envs = [s.env for s in self.secrets]
        dup = {e for e in envs if envs.count(e) > 1}
        if dup:
            raise SecretError(f"duplicate secret env names: {sorted(dup)}")
        phs = [s.placeholder for s in self.secrets]
        if len(set(phs)) != len(phs):
            raise SecretError("two secrets share one placeholder")

    def __bool__(self) -> bool:
        return bool(self.secrets)

    def split(self, sni: str | None) -> tuple[list[Secret], list[Secret]]:
        """Secrets that may be substituted for ``sni`` and those that must be blocked."""
        if sni is None:
            return [], list(self.secrets)
        host = canonical_host(sni)
        elig = [s for s in self.secrets if s.allows(host)]
        inel = [s for s in self.secrets if not s.allows(host)]
        return elig, inel

    def guest_env(self) -> dict[str, str]:
        """The environment the guest should get: every ``env -> placeholder``."""
        env: dict[str, str] = {}
        for s in self.secrets:
            env.update(s.guest_env())
        return env
