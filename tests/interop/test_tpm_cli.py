"""`vouchd tpm info|quote` against a running agent, checked by tpm2-tools' own `tpm2_checkquote`.

The agent owns the swtpm (which serves one client at a time), so the quote comes through its admin
socket; tpm2_checkquote verifies the files offline, as an operator would on another machine.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.interop.conftest import DEADLINE, VOUCHD, RunningAgent, running_agent
from vouchd.evidence import TpmAlg, parse_event_log
from vouchd.tpmcli import QUOTE_FILES

pytestmark = pytest.mark.interop

CHECKQUOTE = "/usr/bin/tpm2_checkquote"
NONCE = "5eed0fc0ffee" * 4


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    with running_agent(tmp_path_factory.mktemp("tpm-cli")) as agent:
        yield agent


def vouchd_tpm(agent: RunningAgent, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VOUCHD, "tpm", *args, "--admin-socket", str(agent.admin_socket)],
                          capture_output=True, text=True, timeout=DEADLINE, check=False)


def checkquote(out: Path, nonce: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CHECKQUOTE, "-u", str(out / "ak.pub.pem"), "-m", str(out / "quote.msg"),
                           "-s", str(out / "quote.sig"), "-f", str(out / "quote.pcrs"), "-g", "sha256",
                           "-q", nonce], capture_output=True, text=True, timeout=DEADLINE, check=False)


def checkquote_pcrs(stdout: str) -> dict[int, bytes]:
    """The PCR values tpm2_checkquote read from quote.pcrs, from the `pcrs:` part of its YAML."""
    pcrs = yaml.safe_load(stdout)["pcrs"]["sha256"]  # YAML 1.1 reads 0x... as an integer
    return {int(index): int(value).to_bytes(32, "big") for index, value in pcrs.items()}


def test_quote_files_pass_tpm2_checkquote_and_only_with_their_nonce(agent: RunningAgent, tmp_path: Path) -> None:
    out = tmp_path / "quote"
    result = vouchd_tpm(agent, "quote", "--nonce", NONCE, "--out", str(out))

    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(QUOTE_FILES)  # no temporaries left behind
    assert f"-q {NONCE}" in result.stdout  # the check command it prints is the one run here
    accepted = checkquote(out, NONCE)
    assert accepted.returncode == 0, accepted.stderr
    # The values tpm2_checkquote hashed are this boot's: the event log replays to them.
    replayed = parse_event_log(agent.event_log.read_bytes()).replay(TpmAlg.SHA256)
    assert checkquote_pcrs(accepted.stdout) == {i: replayed[i] for i in range(8)}

    refused = checkquote(out, NONCE[:-2] + "00")
    assert refused.returncode != 0
    assert "Error validating nonce from quote" in refused.stderr


def test_tampered_pcr_values_are_refused_by_tpm2_checkquote(agent: RunningAgent, tmp_path: Path) -> None:
    result = vouchd_tpm(agent, "quote", "--nonce", NONCE, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    pcrs = bytearray((tmp_path / "quote.pcrs").read_bytes())
    first_digest = 132 + 4 + 4 + 2  # TPML_PCR_SELECTION, list count, TPML_DIGEST.count, TPM2B size
    pcrs[first_digest] ^= 0x01
    (tmp_path / "quote.pcrs").write_bytes(bytes(pcrs))

    refused = checkquote(tmp_path, NONCE)
    assert refused.returncode != 0
    assert "Error validating PCR composite against signed message" in refused.stderr


def test_more_than_eight_pcrs_span_several_digest_lists(agent: RunningAgent, tmp_path: Path) -> None:
    selection = "sha256:" + ",".join(str(i) for i in (23, *range(18), 16 + 4))  # 20 pcrs, out of order
    result = vouchd_tpm(agent, "quote", "--nonce", "01", "--pcrs", selection, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr

    accepted = checkquote(tmp_path, "01")
    assert accepted.returncode == 0, accepted.stderr
    assert sorted(checkquote_pcrs(accepted.stdout)) == [*range(18), 20, 23]


def test_a_second_quote_replaces_the_files_whole(agent: RunningAgent, tmp_path: Path) -> None:
    assert vouchd_tpm(agent, "quote", "--nonce", "aa", "--out", str(tmp_path)).returncode == 0
    first = (tmp_path / "quote.msg").read_bytes()
    assert vouchd_tpm(agent, "quote", "--nonce", "bb", "--out", str(tmp_path)).returncode == 0

    assert (tmp_path / "quote.msg").read_bytes() != first
    assert checkquote(tmp_path, "bb").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(QUOTE_FILES)


@pytest.mark.parametrize(("args", "message"), [
    (["--nonce", "xyz"], "argument --nonce: nonce 'xyz' is not hex (digits 0-9 and a-f only, no 0x prefix)"),
    (["--nonce", "abc"], "argument --nonce: nonce 'abc' has an odd number of hex digits"),
    (["--nonce", "00" * 65], "argument --nonce: nonce has 65 bytes, at most 64 fit in a quote"),
    (["--nonce", "01", "--pcrs", "md5:0"], "argument --pcrs: unknown pcr bank 'md5': expected one of "
                                           "sha1, sha256, sha384, sha512"),
    (["--nonce", "01", "--pcrs", "sha256:0,24"],
     "argument --pcrs: pcr index 24 is out of range: a TPM has pcrs 0 to 23"),
    (["--nonce", "01", "--pcrs", "sha256:1,x"], "argument --pcrs: pcr selection 'sha256:1,x': 'x' is not a pcr index"),
])
def test_bad_arguments_are_named_and_nothing_is_written(agent: RunningAgent, tmp_path: Path, args: list[str],
                                                        message: str) -> None:
    result = vouchd_tpm(agent, "quote", *args, "--out", str(tmp_path))

    assert result.returncode == 2
    assert result.stderr.strip().endswith(f"error: {message}"), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_what_the_agent_refuses_is_named_and_nothing_is_written(agent: RunningAgent, tmp_path: Path) -> None:
    # The swtpm has only a sha256 bank: the agent, not the CLI, finds that out.
    result = vouchd_tpm(agent, "quote", "--nonce", "01", "--pcrs", "sha1:0,1", "--out", str(tmp_path / "made-for-it"))

    assert result.returncode == 1
    assert not (tmp_path / "made-for-it").exists()  # the folder it made for the files is gone again
    # tpm/device.py names the bank as tpm2-pytss spells TPM_ALG_SHA1 today ("sha"): either is clear.
    assert re.fullmatch(r"vouchd: pcrs 0, 1 are not allocated in the sha1? bank", result.stderr.strip()), \
        result.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_out_dir_is_named_before_the_agent_is_asked(agent: RunningAgent, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    result = vouchd_tpm(agent, "quote", "--nonce", "01", "--out", str(not_a_dir))
    assert result.returncode == 1
    assert result.stderr.strip() == f"vouchd: --out {not_a_dir}: not a directory"

    # Root may write almost anywhere; not in sysfs.
    result = vouchd_tpm(agent, "quote", "--nonce", "01", "--out", "/sys/kernel")
    assert result.returncode == 1
    assert result.stderr.strip() == "vouchd: --out /sys/kernel: cannot write there: Permission denied"

    (tmp_path / "out" / "quote.sig").mkdir(parents=True)
    result = vouchd_tpm(agent, "quote", "--nonce", "01", "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"vouchd: --out {tmp_path / 'out'}: quote.sig exists and is not a regular file"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["quote.sig"]


def test_info_names_the_ek_the_node_is_named_after(agent: RunningAgent) -> None:
    result = vouchd_tpm(agent, "info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    selectors = agent.status()["node"]["selectors"]  # type: ignore[index]
    assert f"tpm:ek_hash:{info['ek']['hash']}" in selectors
    assert info["ek"]["type"] == "rsa2048"
    assert info["ek"]["certificate"]["issuer"] == "CN=swtpm-localca"
    assert info["manufacturer"] == "IBM"
    assert {"bank": "sha256", "pcrs": list(range(24))} in info["pcr_banks"]
    assert "ecdsa" in {alg["name"] for alg in info["algorithms"]}

    text = vouchd_tpm(agent, "info")
    assert text.returncode == 0, text.stderr
    assert f"ek             rsa2048, ek_hash {info['ek']['hash']}" in text.stdout
    assert "  certificate  subject (empty)" in text.stdout or "  certificate  subject " in text.stdout
    assert "issuer  CN=swtpm-localca" in text.stdout
    assert "pcr bank       sha256: pcrs 0-23" in text.stdout
