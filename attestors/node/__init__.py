"""Node attestors: how a node proves what it is to the authority (tpm: hardware tier, join_token: static secret)."""
