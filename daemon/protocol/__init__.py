"""Agent <-> authority protocol: versioned messages, canonical JSON, signed replies, transports."""
