"""Generated SPIFFE Workload API messages and grpclib stubs (see workload.proto)."""
