"""Fleet mode on one host: `vouchd server` and `vouchd agent` (no --standalone) through mosquitto.

The netns test (test_fleet_netns.py) runs the whole fleet apart; this one shows the same parts
meet on loopback, quickly, and covers what needs no other host.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.fleet import (
    Daemon,
    Host,
    fetch_x509,
    hardware_host,
    learn_profile,
    server,
    server_config,
    wait_for,
    write_bundle,
)
from tests.mosquitto import Mosquitto, start_broker

pytestmark = pytest.mark.e2e


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    (tmp_path / "mosquitto").mkdir()
    instance = start_broker(folder=tmp_path / "mosquitto")
    try:
        yield instance
    finally:
        instance.stop()


def test_an_agent_reaches_the_server_through_the_broker_and_gets_its_svid(tmp_path: Path,
                                                                           broker: Mosquitto) -> None:
    endpoint = (broker.host, broker.port)
    host: Host = hardware_host(tmp_path, "host-a", broker=endpoint, bundle=tmp_path / "bundle.pem")
    assert host.tpm is not None
    config = server_config(tmp_path, broker=endpoint, client_id="replica-1", state_dir=tmp_path / "authority",
                           ek_roots=[host.tpm.manufacturer_root], ek_intermediates=[host.tpm.manufacturer_issuer])
    authority: Daemon = server(tmp_path, config, "replica-1")
    authority.start()
    try:
        write_bundle(authority, tmp_path / "bundle.pem")
        learn_profile(tmp_path, host, tmp_path / "authority")
        host.agent.start()
        node_id = host.node_id()
        authority.admin("entry.create", {"spiffe_id": "spiffe://example.org/fleet/root", "selectors": ["unix:uid:0"],
                                         "node_selectors": [f"tpm:ek_hash:{node_id.rsplit('/', 1)[1]}"]})

        wait_for(lambda: fetch_x509(host).returncode == 0, "the new entry's SVID over the bus")
        assert "spiffe://example.org/fleet/root" in fetch_x509(host).stdout
        assert host.agent.admin("status")["mode"] == "fleet"

        # The authority away: what the agent holds is still served.
        authority.stop()
        assert fetch_x509(host).returncode == 0
        authority.start()
        wait_for(lambda: host.agent.admin("status")["node"]["authority_link"] == "ok", "the link heard again",
                 timeout=30)
    finally:
        host.stop()
        authority.stop()
