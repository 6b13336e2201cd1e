"""SPIFFE IDs and trust domains, per spiffe/spiffe standards/SPIFFE-ID.md.

Parsing is strict and never normalises: `spiffe://Example.org/a` is refused rather than lower-cased,
so that the string an operator wrote, the string in a certificate and the string a policy compares
are always the same string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vouchd.spiffe.errors import InvalidSpiffeIdError

__all__ = ["SCHEME_PREFIX", "SpiffeId", "TrustDomain"]

SCHEME_PREFIX = "spiffe://"

_MAX_ID_BYTES = 2048
# RFC 3986 caps a host at 255 characters and the trust domain is the URI's host.
_MAX_TRUST_DOMAIN_BYTES = 255
_TRUST_DOMAIN_CHARS = re.compile(r"[a-z0-9._-]+")
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._-]+")
_SHOWN_CHARS = 80


def _shown(text: str) -> str:
    """The input as quoted in an error message, cut short so a hostile input cannot flood logs."""
    if len(text) > _SHOWN_CHARS:
        return repr(text[:_SHOWN_CHARS]) + "..."
    return repr(text)


def _trust_domain_problem(name: str) -> str | None:
    """What is wrong with a trust domain name, phrased to follow the words "trust domain"."""
    if not name:
        return "is missing"
    if len(name) > _MAX_TRUST_DOMAIN_BYTES:
        return f"is longer than {_MAX_TRUST_DOMAIN_BYTES} bytes"
    if not _TRUST_DOMAIN_CHARS.fullmatch(name):
        return "characters are limited to lowercase letters, numbers, dots, dashes and underscores"
    return None


def _path_problem(path: str) -> str | None:
    if not path:
        return None
    if not path.startswith("/"):
        return "path must start with a slash"
    if path.endswith("/"):
        return "path cannot have a trailing slash"
    for segment in path[1:].split("/"):
        if not segment:
            return "path cannot contain empty segments"
        if segment in (".", ".."):
            return "path cannot contain dot segments"
        if not _SEGMENT_CHARS.fullmatch(segment):
            return "path segment characters are limited to letters, numbers, dots, dashes and underscores"
    return None


@dataclass(frozen=True, order=True, slots=True)
class TrustDomain:
    """The name of a trust domain, e.g. `example.org`: the authority part of its SPIFFE IDs."""

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise InvalidSpiffeIdError("trust domain name must be a string")
        if not self.name:
            raise InvalidSpiffeIdError("trust domain is empty")
        problem = _trust_domain_problem(self.name)
        if problem is not None:
            raise InvalidSpiffeIdError(f"trust domain {_shown(self.name)}: {problem}")

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Accepts a bare name (`example.org`) or the trust domain's own ID (`spiffe://example.org`)."""
        if "://" not in text:
            return cls(text)
        spiffe_id = SpiffeId.parse(text)
        if spiffe_id.path:
            raise InvalidSpiffeIdError(f"trust domain {_shown(text)}: must not have a path")
        return spiffe_id.trust_domain

    @property
    def id(self) -> SpiffeId:
        """The trust domain's own SPIFFE ID (no path), the identity its signing authority carries."""
        return SpiffeId(self, "")

    def spiffe_id(self, path: str) -> SpiffeId:
        """The SPIFFE ID with this trust domain and `path` (e.g. `/vouchd/node/tpm/ab12`)."""
        return SpiffeId(self, path)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"TrustDomain({self.name!r})"


@dataclass(frozen=True, order=True, slots=True)
class SpiffeId:
    """A SPIFFE ID: a trust domain and a path that is empty or starts with a slash.

    Equal only to another SpiffeId: comparing with a str is always unequal, so a set or dict
    keyed by SpiffeId never silently mixes in strings.
    """

    trust_domain: TrustDomain
    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise InvalidSpiffeIdError("spiffe id trust domain must be a TrustDomain")
        if not isinstance(self.path, str):
            raise InvalidSpiffeIdError("spiffe id path must be a string")
        problem = _path_problem(self.path)
        if problem is not None:
            raise InvalidSpiffeIdError(f"spiffe id path {_shown(self.path)}: {problem}")
        if len(SCHEME_PREFIX) + len(self.trust_domain.name) + len(self.path) > _MAX_ID_BYTES:
            raise InvalidSpiffeIdError(f"spiffe id longer than {_MAX_ID_BYTES} bytes")

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        if not text:
            raise InvalidSpiffeIdError("spiffe id is empty")
        if len(text.encode("utf-8", "surrogatepass")) > _MAX_ID_BYTES:
            raise InvalidSpiffeIdError(f"spiffe id longer than {_MAX_ID_BYTES} bytes")

        def invalid(problem: str) -> InvalidSpiffeIdError:
            return InvalidSpiffeIdError(f"spiffe id {_shown(text)}: {problem}")

        if not text.startswith(SCHEME_PREFIX):
            raise invalid("scheme must be spiffe://")
        if "?" in text or "#" in text:
            raise invalid("query and fragment are not allowed")
        if "%" in text:
            raise invalid("percent-encoding is not allowed")
        rest = text[len(SCHEME_PREFIX) :]
        slash = rest.find("/")
        authority, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        if "@" in authority:
            raise invalid("userinfo is not allowed")
        if ":" in authority:
            raise invalid("port is not allowed")
        trust_domain_problem = _trust_domain_problem(authority)
        if trust_domain_problem is not None:
            raise invalid(f"trust domain {trust_domain_problem}")
        path_problem = _path_problem(path)
        if path_problem is not None:
            raise invalid(path_problem)
        return cls(TrustDomain(authority), path)

    def is_member_of(self, td: TrustDomain) -> bool:
        return self.trust_domain == td

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain.name}{self.path}"

    def __repr__(self) -> str:
        return f"SpiffeId({str(self)!r})"
