"""The refusal codes of the protocol: one list both ends share (docs/protocol.md, "Refusals").

The authority puts one in every ErrorReply and ItemError; the agent acts on some of them (`nonce`:
ask for a new one and send again; `reattest`: attest, then send again; `not_enrolled` at the
static-secret tier: join with the token) and reports the rest. A StrEnum: on the wire it is its
text, so an agent of another version reads a code it does not know as text, never a crash.
"""

from __future__ import annotations

import enum

__all__ = ["Refusal"]


class Refusal(enum.StrEnum):
    BAD_REQUEST = "bad_request"          # malformed, or not allowed on this topic or for this node
    BAD_EVIDENCE = "bad_evidence"        # TPM evidence or a node key signature does not verify
    BAD_QUOTE = "bad_quote"              # a request's quote does not verify
    EK_UNTRUSTED = "ek_untrusted"        # the EK certificate does not chain to a configured root
    AK_CHANGED = "ak_changed"            # another AK than the one the node enrolled
    NOT_ENROLLED = "not_enrolled"        # no enrolled EK or node key (and no usable join token)
    PENDING = "pending"                  # a genuine EK waiting for `vouchd node approve`
    SESSION_EXPIRED = "session_expired"  # an attestation session or challenge nonce unknown, used or expired
    NONCE = "nonce"                      # a request nonce unknown, used or expired: ask for a new one
    REATTEST = "reattest"                # the node must attest again (unknown, or its TPM state moved)
    BANNED = "banned"                    # an operator banned the node
    FAILED = "failed"                    # the node failed attestation
    BUSY = "busy"                        # over a rate or capacity limit: try again shortly
    POLICY = "policy"                    # the request-time policy denies the item (its policy ids follow)
    NOT_AUTHORIZED = "not_authorized"    # the entry is not assigned to this node or not for its tier
    BAD_CSR = "bad_csr"
    BAD_AUDIENCE = "bad_audience"
    CANNOT_SIGN = "cannot_sign"
    STORAGE = "storage"                  # the authority cannot write its state
    INTERNAL = "internal"                # a bug: the authority logged it
    LOCAL = "local"                      # raised on the agent itself, never sent: its own evidence failed
