"""The Cedar schema every policy file is validated against, and every request is checked against.

It is the contract between vouchd and operators' policies: a policy naming an attribute that is not
here is refused when it is loaded, not silently false at request time. It mirrors vouchd.policy.model
one to one; engine.py turns a PolicyRequest into entities and a context of exactly this shape.

Choices that shape how policies read:
- Entry labels are the workload's *tags* (`principal.hasTag("k") && principal.getTag("k") == "v"`):
  a Cedar record cannot hold keys chosen by operators, tags can.
- What only some requests have is optional (`?`): `quote_age_seconds` and `pcr_profile` (a node of
  the static-secret tier has no quote), `parent`, `parent_audiences`, `parent_ttl_seconds` (only a
  workload started by a holder of another identity has them), and `uid`: the agent sees the
  process and always knows it; the authority, which evaluates the policy again before it signs, sees
  only the entry and knows a uid only where the entry pins one (docs/design.md §7). Cedar's validator then insists on a
  `has` test before each use, so no policy can error on a request that lacks them (an erroring
  forbid would otherwise simply not apply).
- Audience and TrustDomain carry their own name as an attribute: Cedar cannot read an entity's id.
- One context type for the three actions: a policy over all of them may read any field.
  `ttl_seconds` is 0 and `new_credential` false for ValidateJWTSVID, which issues nothing.
"""

from __future__ import annotations

__all__ = ["SCHEMA_TEXT"]

SCHEMA_TEXT = """\
// The request details, the same for every action.
type RequestContext = {
  // the node's state as the evaluator knows it: "trusted", "stale", "unconfirmed", "banned", ...
  "node_state": String,
  // seconds since the node's last verified TPM quote, rounded UP to a multiple of 30
  "quote_age_seconds"?: Long,
  // the name of the node's PCR profile (tpm:pcr_profile)
  "pcr_profile"?: String,
  // seconds since the epoch, rounded DOWN to a whole minute
  "now": Long,
  // the lifetime, in seconds, of the SVID asked for or about to be handed out (0 when validating)
  "ttl_seconds": Long,
  // every audience of the request: a JWT request for several is judged once per audience
  "audiences": Set<String>,
  // true when the answer needs a credential the agent does not hold yet (a signature of the authority)
  "new_credential": Bool,
};

// Workload::"<spiffe id>": a process that a registration entry matched, as that entry names it.
// Its tags are the entry's labels.
entity Workload = {
  "spiffe_id": String,
  "tier": String,               // "hardware" or "static-secret": how its node proved itself
  "selectors": Set<String>,     // what attestation derived from the process, e.g. "unix:uid:1000"
  "uid"?: Long,                 // the process's uid (absent where the evaluator cannot see the process)
  "entry_id": String,
  "lineage_depth": Long,        // how many holders of an identity are above it among its ancestors
  "parent"?: String,            // the SPIFFE ID its nearest such ancestor holds
  "parent_audiences"?: Set<String>,  // the JWT audiences that parent holds
  "parent_ttl_seconds"?: Long,  // how long the parent's credentials remain valid
} tags String;

// Audience::"<aud>": the resource of the JWT actions.
entity Audience = {
  "name": String,
  "risk": String,               // "low", "high" or "unknown" (not in the configuration)
};

// TrustDomain::"<td>": the resource of FetchX509SVID.
entity TrustDomain = {
  "name": String,
};

action FetchX509SVID appliesTo { principal: [Workload], resource: [TrustDomain], context: RequestContext };
action FetchJWTSVID appliesTo { principal: [Workload], resource: [Audience], context: RequestContext };
action ValidateJWTSVID appliesTo { principal: [Workload], resource: [Audience], context: RequestContext };
"""
