"""The TPM going away under a TpmService: killed in the middle of a stream of quotes, back again,
or back as another TPM. Each test has a swtpm of its own, which it kills with SIGKILL."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import swtpm as swtpm_mod
from vouchd.tpm import TpmError, TpmService, TpmUnavailableError

DEADLINE = 20.0


@pytest.fixture
def own_swtpm(tmp_path: Path) -> Iterator[swtpm_mod.Swtpm]:
    state = tmp_path / "swtpm"
    swtpm_mod.provision(state)
    instance = swtpm_mod.start(state)
    try:
        yield instance
    finally:
        instance.stop()


async def quote_until_refused(tpm: TpmService, quoted: list[int]) -> BaseException:
    while True:
        try:
            await tpm.quote("sha256", range(8), quoted[-1].to_bytes(8, "big") if quoted else b"\0")
        except BaseException as err:
            return err
        quoted.append(len(quoted) + 1)


async def test_a_tpm_killed_during_quotes_fails_them_at_once_and_is_found_again(
        own_swtpm: swtpm_mod.Swtpm, tmp_path: Path) -> None:
    async with asyncio.timeout(DEADLINE), TpmService(own_swtpm.tcti) as tpm:
        await tpm.ensure_node_keys(tmp_path / "keys")
        quoted: list[int] = []
        quoting = asyncio.create_task(quote_until_refused(tpm, quoted))
        while len(quoted) < 20:
            await asyncio.sleep(0.001)

        own_swtpm.kill()
        failure = await quoting

        assert isinstance(failure, TpmUnavailableError)
        assert str(failure).startswith(f"TPM unreachable at {own_swtpm.tcti}: ")
        assert tpm.unavailable == str(failure)
        with pytest.raises(TpmUnavailableError):  # at once, not after a timeout
            await asyncio.wait_for(tpm.quote("sha256", [0], b"x"), 1.0)
        with pytest.raises(TpmUnavailableError, match="cannot connect"):
            await tpm.reconnect()
        assert tpm.unavailable_for() > 0

        own_swtpm.restart()
        await tpm.reconnect()

        assert tpm.unavailable is None and tpm.unavailable_for() == 0
        quote = await tpm.quote("sha256", range(8), b"back")
        assert quote.attest[:4] == b"\xffTCG"


async def test_a_tpm_that_comes_back_with_another_ek_is_refused(
        own_swtpm: swtpm_mod.Swtpm, tmp_path: Path) -> None:
    async with asyncio.timeout(DEADLINE), TpmService(own_swtpm.tcti) as tpm:
        await tpm.ensure_node_keys(tmp_path / "keys")
        own_swtpm.kill()
        with pytest.raises(TpmUnavailableError):
            await tpm.probe()

        other_state = tmp_path / "other-swtpm"
        swtpm_mod.provision(other_state)  # another TPM, on the same socket path
        own_swtpm.state_dir = other_state
        own_swtpm.restart()

        with pytest.raises(TpmError, match="came back with another endorsement key") as refused:
            await tpm.reconnect()
        assert not isinstance(refused.value, TpmUnavailableError)
        assert tpm.unavailable is not None, "the service stays unusable"
