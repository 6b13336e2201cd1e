"""The node agent: node identity, SVID cache and rotation, the Workload API, status and admin."""
