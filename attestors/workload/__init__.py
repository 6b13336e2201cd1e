"""Workload attestors: plugins that describe a calling process with selectors.

Each lives in its own module (unix.py, ...) and is listed in vouchd.attestors.catalog. This package
imports nothing itself so that procfs helpers can be used without loading every attestor.
"""

from __future__ import annotations

__all__: list[str] = []
