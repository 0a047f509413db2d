"""One rule set for secrets in anything memwarden shows: URLs, command lines, headers, bodies.

Whatever goes to a log, the journal, ``status``, ``check``, a repr or an error message goes
through here first. Values are replaced by ``***``; names stay, so a reader still sees which
option or variable was given:

- URLs: the password of ``scheme://user:pw@host`` and the value of a secret-named query
  parameter (``?password=``, ``?token=``, ``?api_key=`` …).
- Command lines: the value of a secret-named option (``--token=X``, ``--password X``,
  ``--auth=X``, ``--private-key=X`` …), of the short options that carry one in common tools
  (``-p X``/``-pX``, ``-a X``, ``-t X``), of a secret-named ``NAME=X`` (``env API_TOKEN=X
  cmd``), and the same inside a shell string (``sh -c '… --token=X'``).
- Free text (response bodies, exception messages): all of the above, ``Authorization:``
  style headers, ``Bearer``/``Basic``/``Token`` credentials and secret-named JSON or
  ``key=value`` pairs; and any exact value passed in ``known`` (a token we sent).
"""

from __future__ import annotations

import re
import shlex
import urllib.parse
from collections.abc import Iterable, Sequence

HIDDEN = "***"

#: Name parts that make an option, variable, parameter or field secret.
_SECRET_PARTS = frozenset(
    {
        "auth",
        "authorization",
        "credential",
        "credentials",
        "pass",
        "passphrase",
        "passwd",
        "password",
        "pw",
        "pwd",
        "secret",
        "token",
        "apikey",
        "privatekey",
        "cookie",
        "sig",
        "signature",
    }
)
#: ``key`` is secret after one of these (``api-key``, ``private_key``, ``access-key``).
_KEY_QUALIFIERS = frozenset({"api", "private", "access", "secret", "signing", "encryption"})
#: Short options that carry a password or token in common tools (mysql ``-p``, redis-cli
#: ``-a``, many ``-t``): their value is hidden, whatever the tool.
SHORT_SECRET_OPTIONS = frozenset({"-p", "-a", "-t"})

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_URL_USERINFO = re.compile(r"(://[^:/@\s]*:)[^@/\s]*@")
_AUTH_SCHEME = re.compile(
    r"\b(Bearer|Basic|Token|Digest)(\s+)[A-Za-z0-9._~+/=:-]{8,}", re.IGNORECASE
)
_HEADER = re.compile(
    r"\b((?:proxy-)?authorization|x-api-key|x-auth-token|cookie|set-cookie)(\s*[:=]\s*)"
    r"[^\r\n,;]+",
    re.IGNORECASE,
)
_JSON_PAIR = re.compile(r"(\"([A-Za-z0-9_.-]+)\"\s*:\s*)\"(?:[^\"\\]|\\.)*\"")
_OPTION_PAIR = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)(=|\s+)(\"[^\"]*\"|'[^']*'|[^\s'\"]+)")
_ASSIGNMENT = re.compile(r"(?<![\w-])([A-Za-z_][A-Za-z0-9_.-]*)(=)(\"[^\"]*\"|'[^']*'|[^\s&'\"]+)")
_SHORT_ATTACHED = re.compile(r"^(-p)(.+)$")  # mysql -pSECRET


def secret_name(name: str) -> bool:
    """True for names that hold a secret: ``--token``, ``API_TOKEN``, ``private-key``,
    ``password``, ``auth`` (but not ``author``, ``--passes``, ``monkey``)."""
    words = [w for w in re.split(r"[^a-z0-9]+", _split_camel(name).lower()) if w]
    for i, word in enumerate(words):
        if word in _SECRET_PARTS:
            return True
        if word == "key" and (len(words) == 1 or (i > 0 and words[i - 1] in _KEY_QUALIFIERS)):
            return True
        if word in ("apikey", "accesskey", "privatekey", "secretkey"):
            return True
    return False


def _split_camel(name: str) -> str:
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)


def url(value: str) -> str:
    """``value`` (a URL) without its password and secret query parameters; the rest is left
    exactly as written."""
    value = _URL_USERINFO.sub(r"\1" + HIDDEN + "@", value, count=1)
    head, mark, rest = value.partition("?")
    if not mark:
        return value
    query, hash_, fragment = rest.partition("#")
    if "=" in fragment:
        fragment = _query(fragment)
    return head + mark + _query(query) + hash_ + fragment


def _query(query: str) -> str:
    if not query:
        return query
    out = []
    for pair in query.split("&"):
        name, eq, _val = pair.partition("=")
        out.append(f"{name}={HIDDEN}" if eq and secret_name(urllib.parse.unquote(name)) else pair)
    return "&".join(out)


def text(value: str, known: Iterable[str] = ()) -> str:
    """Free text (a response body, an exception message, a log line) with secrets hidden."""
    for secret in sorted({k for k in known if k and len(k) >= 4}, key=len, reverse=True):
        value = value.replace(secret, HIDDEN)
    value = _URL.sub(lambda m: url(m.group(0)), value)
    value = _HEADER.sub(lambda m: m.group(1) + m.group(2) + HIDDEN, value)
    value = _AUTH_SCHEME.sub(lambda m: m.group(1) + m.group(2) + HIDDEN, value)
    value = _JSON_PAIR.sub(
        lambda m: m.group(1) + f'"{HIDDEN}"' if secret_name(m.group(2)) else m.group(0), value
    )
    value = _OPTION_PAIR.sub(_option_pair, value)
    return _ASSIGNMENT.sub(
        lambda m: (
            m.group(1) + m.group(2) + HIDDEN
            if secret_name(m.group(1)) and m.group(3) != HIDDEN
            else m.group(0)
        ),
        value,
    )


def _option_pair(m: re.Match[str]) -> str:
    name, sep, val = m.group(1), m.group(2), m.group(3)
    if val == HIDDEN or val.startswith("-"):
        return m.group(0)
    if (name.startswith("--") and secret_name(name)) or name in SHORT_SECRET_OPTIONS:
        return name + sep + HIDDEN
    return m.group(0)


def argv(args: Sequence[str]) -> list[str]:
    """A command line fit for a log or the journal: every rule of this module applied to
    each argument, the value after a secret-named option hidden, shell strings redacted
    inside (``sh -c '…'``)."""
    out: list[str] = []
    hide_next = False
    for arg in args:
        if hide_next:
            hide_next = False
            if not arg.startswith("--"):
                out.append(HIDDEN)
                continue
        shown, hide_next = _one_arg(arg)
        out.append(shown)
    return out


def _one_arg(arg: str) -> tuple[str, bool]:
    """(``arg`` redacted, whether the next argument is this option's secret value)."""
    if any(c.isspace() for c in arg):
        return _shell_string(arg), False
    if arg.startswith("--"):
        name, eq, value = arg.partition("=")
        if secret_name(name):
            return (f"{name}={HIDDEN}", False) if eq else (arg, True)
        return (f"{name}={_value(value)}" if eq else arg), False
    if arg in SHORT_SECRET_OPTIONS:
        return arg, True
    attached = _SHORT_ATTACHED.match(arg)
    if attached:
        return attached.group(1) + HIDDEN, False
    name, eq, value = arg.partition("=")
    if eq and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name) and secret_name(name):
        return f"{name}={HIDDEN}", False
    return _value(arg), False


def _value(value: str) -> str:
    return text(value) if ("://" in value or "=" in value or ":" in value) else value


def _shell_string(arg: str) -> str:
    """A shell command held in one argument (``sh -c '…'``), or a header (``-H 'Authorization:
    …'``): redacted as a command line where it splits, then as text."""
    try:
        words = shlex.split(arg)
    except ValueError:
        return text(arg)
    shown = argv(words)
    if shown != words:
        arg = " ".join(_quote(w) for w in shown)
    return text(arg)


def _quote(word: str) -> str:
    """``shlex.quote``, but ``***`` alone needs no quotes to be read."""
    bare = word.replace(HIDDEN, "")
    plain = word == HIDDEN or (bare != "" and shlex.quote(bare) == bare)
    return word if plain else shlex.quote(word)


def value(setting_value: object) -> object:
    """A setting's value for an error message: strings redacted as text."""
    return text(setting_value) if isinstance(setting_value, str) else setting_value
