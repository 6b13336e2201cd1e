"""The authority: verifies TPM evidence, holds the trust domain CA, signs SVIDs for assigned entries."""
