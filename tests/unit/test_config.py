"""Configuration: YAML -> frozen dataclasses, with errors that name the file, the key path and the fix."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

import pytest

from vouchd.attestors import WorkloadProcess
from vouchd.attestors.catalog import WorkloadAttestorFactory
from vouchd.attestors.workload.unix import UnixAttestor
from vouchd.cli import main
from vouchd.config import Config, load_config, parse_config, parse_duration
from vouchd.entries import Entry
from vouchd.errors import ConfigError, VouchdError
from vouchd.selectors import Selector, SelectorKind, non_empty
from vouchd.spiffe import SpiffeId, TrustDomain, TrustTier

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "standalone.yaml"
EK_HASH = "ab" * 32
SHA256 = "0f" * 32
ANCHORED = "container:id, k8s:pod_uid, systemd:unit, unix:gid, unix:uid"
DURATION_HINT = "is not a duration like 250ms, 90s, 5m, 1h or 30d"
PCR_HINT = "expected BANK:INDICES such as sha256:0-7"
ID_RULE = "expected 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


class FakeAttestor:
    """A third-party attestor that declares nothing: its type may have any key and value."""

    name = "mesh"

    def __init__(self, **options: object) -> None:
        pass

    async def attest(self, process: WorkloadProcess) -> list[Selector]:
        return []


class SystemdAttestor(FakeAttestor):
    name = "systemd"
    produces = (SelectorKind("systemd", "unit", non_empty("a unit is a name")), SelectorKind("systemd", "slice"))


class ContainerAttestor(FakeAttestor):
    name = "container"
    produces = (SelectorKind("container", "id"), SelectorKind("container", "runtime"), SelectorKind("k8s", "pod_uid"))


class InterpreterAttestor(FakeAttestor):
    name = "interpreter"
    produces = (SelectorKind("script", "path"), SelectorKind("script", "sha256"))


class LineageAttestor(FakeAttestor):
    name = "lineage"
    produces = (SelectorKind("lineage", "parent_spiffe_id"), SelectorKind("lineage", "depth"))


# The attestors these tests know: not whatever plugins happen to be installed where they run.
FACTORIES: dict[str, WorkloadAttestorFactory] = {
    "unix": UnixAttestor, "systemd": SystemdAttestor, "container": ContainerAttestor,
    "interpreter": InterpreterAttestor, "lineage": LineageAttestor, "mesh": FakeAttestor,
}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return (tmp_path / "etc" / "vouchd.yaml").resolve()


def parse(text: str, source: Path, environ: Mapping[str, str] | None = None) -> Config:
    return parse_config(textwrap.dedent(text), source, {} if environ is None else environ,
                        attestor_factories=FACTORIES)


def refused(text: str, source: Path, environ: Mapping[str, str] | None = None) -> str:
    """The message of the ConfigError `text` raises, without the file prefix (asserted separately)."""
    with pytest.raises(ConfigError) as caught:
        parse(text, source, environ)
    message = str(caught.value)
    assert message.startswith(f"{source}: "), message
    return message.removeprefix(f"{source}: ")


def with_entry(body: str) -> str:
    """A config whose one entry is `body` (a YAML flow mapping)."""
    return f"trust_domain: example.org\nentries:\n  - {body}\n"


def only_entry(text: str, source: Path) -> Entry:
    config = parse(text, source)
    assert len(config.entries) == 1
    return config.entries[0]


# --- the smallest file and the defaults --------------------------------------------------------


def test_a_trust_domain_alone_is_a_complete_configuration(source: Path) -> None:
    config = parse("trust_domain: example.org\n", source)

    assert config == Config(source=source, trust_domain=TrustDomain("example.org"), agent=None,
                            authority=None, entries=(), log_level="info")


def test_the_trust_domain_may_be_written_as_its_spiffe_id(source: Path) -> None:
    assert parse("trust_domain: spiffe://example.org\n", source).trust_domain == TrustDomain("example.org")


def test_an_empty_agent_section_takes_every_default(source: Path) -> None:
    agent = parse("trust_domain: example.org\nagent:\n", source).agent

    assert agent is not None
    assert agent.state_dir == Path("/var/lib/vouchd/agent")
    assert agent.socket_path == Path("/run/vouchd/agent.sock")
    assert agent.admin_socket_path == Path("/run/vouchd/admin.sock")
    assert (agent.tpm.tcti, agent.tpm.ek) == ("device:/dev/tpmrm0", "rsa2048")
    assert agent.event_log_path is None
    assert agent.workload_attestors == {name: {} for name in ("unix", "interpreter", "systemd", "container", "lineage")}
    assert agent.attestation_deadline == timedelta(seconds=5)
    assert agent.attestation_interval == timedelta(seconds=60)


def test_an_empty_authority_section_takes_every_default(source: Path) -> None:
    authority = parse("trust_domain: example.org\nauthority: {}\n", source).authority

    assert authority is not None
    assert authority.state_dir == Path("/var/lib/vouchd/authority")
    assert (authority.ek_roots, authority.ek_intermediates) == ((), ())
    assert authority.enrolment == "allowlist"
    assert authority.enrolled_ek_hashes == frozenset()
    assert (authority.pcr_bank, authority.pcr_indices) == ("sha256", tuple(range(8)))
    assert authority.accept_missing_event_log is False
    assert authority.ca_ttl == timedelta(days=30)
    assert authority.node_svid_ttl == authority.x509_svid_ttl == timedelta(hours=1)
    assert authority.x509_svid_max_ttl == timedelta(hours=24)


def test_every_value_can_be_set(source: Path) -> None:
    config = parse(
        f"""
        trust_domain: prod.example.org
        log_level: debug
        agent:
          state_dir: /srv/agent
          socket_path: /srv/run/agent.sock
          admin_socket_path: /srv/run/admin.sock
          tpm: {{tcti: "swtpm:path=/tmp/tpm.sock", ek: ecc-p384}}
          event_log: /srv/boot.log
          workload_attestors: {{unix: {{hash_executables: true}}, systemd: null}}
          attestation_deadline: 250ms
          attestation_interval: 5m
        authority:
          state_dir: /srv/authority
          ek_trust:
            roots: [/srv/roots]
            intermediates: [/srv/int-a.pem, /srv/int-b.pem]
            enrolment: approve
            enrolled: ["{EK_HASH.upper()}"]
          pcr_selection: sha384:0,2,4
          accept_missing_event_log: true
          ca_ttl: 90d
          node_svid_ttl: 30m
          x509_svid_ttl: 10m
          x509_svid_max_ttl: 2h
        """,
        source,
    )

    assert config.trust_domain == TrustDomain("prod.example.org")
    assert config.log_level == "debug"
    agent, authority = config.agent, config.authority
    assert agent is not None and authority is not None
    assert agent.state_dir == Path("/srv/agent")
    assert agent.socket_path == Path("/srv/run/agent.sock")
    assert agent.admin_socket_path == Path("/srv/run/admin.sock")
    assert (agent.tpm.tcti, agent.tpm.ek) == ("swtpm:path=/tmp/tpm.sock", "ecc-p384")
    assert agent.event_log_path == Path("/srv/boot.log")
    assert agent.workload_attestors == {"unix": {"hash_executables": True}, "systemd": {}}
    assert agent.attestation_deadline == timedelta(milliseconds=250)
    assert agent.attestation_interval == timedelta(minutes=5)
    assert authority.state_dir == Path("/srv/authority")
    assert authority.ek_roots == (Path("/srv/roots"),)
    assert authority.ek_intermediates == (Path("/srv/int-a.pem"), Path("/srv/int-b.pem"))
    assert authority.enrolment == "approve"
    assert authority.enrolled_ek_hashes == frozenset({EK_HASH})  # stored lower-case
    assert (authority.pcr_bank, authority.pcr_indices) == ("sha384", (0, 2, 4))
    assert authority.accept_missing_event_log is True
    assert authority.ca_ttl == timedelta(days=90)
    assert authority.node_svid_ttl == timedelta(minutes=30)
    assert authority.x509_svid_ttl == timedelta(minutes=10)
    assert authority.x509_svid_max_ttl == timedelta(hours=2)


def test_parsed_values_are_frozen(source: Path) -> None:
    config = parse("trust_domain: example.org\nagent: {}\n", source)

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.log_level = "debug"  # type: ignore[misc]
    assert config.agent is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.agent.tpm.ek = "ecc-p256"  # type: ignore[misc]


# --- error messages: file, key path, what was expected ---------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("log_level: info\n", "trust_domain: is required (a string)"),
        ("trust_domain:\n", "trust_domain: is required (a string)"),
        ("trust_domain: ''\n", "trust_domain: must not be empty"),
        ("trust_domain: [example.org]\n", "trust_domain: expected a string, got a list"),
        ("trust_domain: true\n", "trust_domain: expected a string, got a boolean"),
        ("trust_domain: Example.org\n", "trust_domain: trust domain 'Example.org': characters are limited "
                                        "to lowercase letters, numbers, dots, dashes and underscores"),
        ("trust_domain: spiffe://example.org/x\n",
         "trust_domain: trust domain 'spiffe://example.org/x': must not have a path"),
        ("- trust_domain: example.org\n", "top level: expected a mapping, got a list"),
        ("trust_domain: example.org\nagent: [unix]\n", "agent: expected a mapping, got a list"),
        ("trust_domain: example.org\nauthority: just-a-string\n", "authority: expected a mapping, got a string"),
        ("trust_domain: example.org\nagent: {tpm: on}\n", "agent.tpm: expected a mapping, got a boolean"),
        ("trust_domain: example.org\nauthority: {ek_trust: []}\n",
         "authority.ek_trust: expected a mapping, got a list"),
        ("trust_domain: example.org\nlog_level: loud\n",
         "log_level: expected one of debug, info, warning, error, got 'loud'"),
        ("trust_domain: example.org\nagent: {tpm: {ek: rsa4096}}\n",
         "agent.tpm.ek: expected one of rsa2048, ecc-p256, ecc-p384, got 'rsa4096'"),
        ("trust_domain: example.org\nagent: {tpm: {tcti: ''}}\n", "agent.tpm.tcti: must not be empty"),
        ("trust_domain: example.org\nagent: {socket_path: [a, b]}\n",
         "agent.socket_path: expected a string, got a list"),
        ("trust_domain: example.org\nagent: {workload_attestors: [unix]}\n",
         "agent.workload_attestors: expected a mapping of name to options, got a list"),
        ("trust_domain: example.org\nagent: {workload_attestors: {unix: 3}}\n",
         "agent.workload_attestors.unix: expected a mapping of options, or true or false"),
        ("trust_domain: example.org\nagent: {workload_attestors: {unix: false}}\n",
         "agent.workload_attestors: switches every workload attestor off: no workload could be attested "
         "(leave the key out for the defaults)"),
        ("trust_domain: example.org\nauthority: {ek_trust: {enrolment: everyone}}\n",
         "authority.ek_trust.enrolment: expected one of allowlist, approve, any-genuine, got 'everyone'"),
        ("trust_domain: example.org\nauthority: {ek_trust: {roots: /etc/roots}}\n",
         "authority.ek_trust.roots: expected a list of strings, got a string"),
        ("trust_domain: example.org\nauthority: {ek_trust: {intermediates: [/a, {b: 1}]}}\n",
         "authority.ek_trust.intermediates[1]: expected a string, got a mapping"),
        ("trust_domain: example.org\nauthority: {ek_trust: {enrolled: [abc123]}}\n",
         "authority.ek_trust.enrolled: expected sha256 hex EK hashes, got 'abc123'"),
        ("trust_domain: example.org\nauthority: {accept_missing_event_log: 'yes'}\n",
         "authority.accept_missing_event_log: expected true or false, got a string"),
        ("trust_domain: example.org\nauthority: {x509_svid_ttl: 2d}\n",
         "authority.x509_svid_ttl: must not exceed x509_svid_max_ttl (2d > 24h)"),
        ("trust_domain: example.org\nentries: {web: {}}\n", "entries: expected a list, got a mapping"),
        ("trust_domain: example.org\nentries: [web]\n", "entries[0]: expected a mapping, got a string"),
    ],
)
def test_errors_name_the_key_path_and_what_was_expected(text: str, message: str, source: Path) -> None:
    assert refused(text, source) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("trust_domain: example.org\ntrust_domian: example.org\n", "trust_domian: unknown key"),
        ("trust_domain: example.org\nagent: {sockets_path: /x}\n", "agent.sockets_path: unknown key"),
        ("trust_domain: example.org\nagent: {tpm: {device: /dev/tpm0}}\n", "agent.tpm.device: unknown key"),
        ("trust_domain: example.org\nauthority: {ca_tll: 1d}\n", "authority.ca_tll: unknown key"),
        ("trust_domain: example.org\nauthority: {ek_trust: {root: [/x]}}\n",
         "authority.ek_trust.root: unknown key"),
        (with_entry("{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], ttl: 1h}"),
         "entries[0].ttl: unknown key"),
        ("trust_domain: example.org\nzeta: 1\nalpha: 2\n", "alpha: unknown key (also unknown: zeta)"),
    ],
)
def test_unknown_keys_are_refused_at_every_level(text: str, message: str, source: Path) -> None:
    assert refused(text, source) == message


def test_an_unknown_key_in_the_second_entry_names_its_index(source: Path) -> None:
    text = (
        "trust_domain: example.org\nentries:\n"
        "  - {spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0']}\n"
        "  - {spiffe_id: 'spiffe://example.org/b', selectors: ['unix:uid:1'], parnet: x}\n"
    )

    assert refused(text, source) == "entries[1].parnet: unknown key"


# --- environment variables ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "environ", "expected"),
    [
        ("${TCTI}", {"TCTI": "swtpm:path=/run/a"}, "swtpm:path=/run/a"),
        ("${TCTI:-device:/dev/tpm0}", {}, "device:/dev/tpm0"),
        ("${TCTI:-device:/dev/tpm0}", {"TCTI": "mssim"}, "mssim"),
        ("${TCTI:-device:/dev/tpm0}", {"TCTI": ""}, "device:/dev/tpm0"),  # empty counts as unset, as in sh
        ("${KIND}:path=${DIR:-/run}/tpm.sock", {"KIND": "swtpm"}, "swtpm:path=/run/tpm.sock"),
        ("${A}", {"A": "${B}", "B": "not this"}, "${B}"),  # an expanded value is not expanded again
        ("$TCTI", {"TCTI": "mssim"}, "$TCTI"),  # only the braced form is a reference
    ],
)
def test_environment_references_are_expanded(value: str, environ: dict[str, str], expected: str,
                                             source: Path) -> None:
    config = parse(f'trust_domain: example.org\nagent: {{tpm: {{tcti: "{value}"}}}}\n', source, environ)

    assert config.agent is not None
    assert config.agent.tpm.tcti == expected


def test_an_unset_variable_without_default_is_an_error_naming_key_and_variable(source: Path) -> None:
    text = 'trust_domain: example.org\nagent: {tpm: {tcti: "${VOUCHD_TCTI}"}}\n'

    assert refused(text, source, {"OTHER": "x"}) == (
        "agent.tpm.tcti: environment variable VOUCHD_TCTI is not set and has no default"
    )


def test_an_unset_variable_in_a_list_names_the_item(source: Path) -> None:
    text = 'trust_domain: example.org\nauthority: {ek_trust: {roots: [/a, "${ROOTS}"]}}\n'

    assert refused(text, source) == (
        "authority.ek_trust.roots[1]: environment variable ROOTS is not set and has no default"
    )


def test_an_empty_default_leaves_an_empty_value_which_is_refused(source: Path) -> None:
    text = 'trust_domain: example.org\nagent: {tpm: {tcti: "${VOUCHD_TCTI:-}"}}\n'

    assert refused(text, source) == "agent.tpm.tcti: must not be empty"


def test_the_process_environment_is_used_when_none_is_given(source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOUCHD_TEST_TRUST_DOMAIN", "from-env.example")

    config = parse_config("trust_domain: ${VOUCHD_TEST_TRUST_DOMAIN}\n", source)

    assert config.trust_domain == TrustDomain("from-env.example")


# --- paths --------------------------------------------------------------------------------------


def test_relative_paths_are_resolved_against_the_configuration_directory(source: Path) -> None:
    config = parse(
        """
        trust_domain: example.org
        agent:
          state_dir: state/agent
          socket_path: ../run/agent.sock
          admin_socket_path: /abs/admin.sock
          event_log: ${LOG_DIR:-logs}/boot.log
        authority:
          state_dir: state/authority
          ek_trust: {roots: [roots, /etc/roots], intermediates: [../int]}
        """,
        source,
    )
    here = source.parent

    assert config.source == source
    assert config.agent is not None and config.authority is not None
    assert config.agent.state_dir == here / "state" / "agent"
    assert config.agent.socket_path == here.parent / "run" / "agent.sock"
    assert config.agent.admin_socket_path == Path("/abs/admin.sock")
    assert config.agent.event_log_path == here / "logs" / "boot.log"
    assert config.authority.state_dir == here / "state" / "authority"
    assert config.authority.ek_roots == (here / "roots", Path("/etc/roots"))
    assert config.authority.ek_intermediates == (here.parent / "int",)


def test_a_home_relative_path_is_expanded(source: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    config = parse("trust_domain: example.org\nagent: {state_dir: ~/vouchd}\n", source)

    assert config.agent is not None
    assert config.agent.state_dir == tmp_path / "home" / "vouchd"


def test_load_config_resolves_relative_to_the_file_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "conf"
    config_dir.mkdir()
    (config_dir / "vouchd.yaml").write_text("trust_domain: example.org\nagent: {state_dir: state}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config(Path("../conf/vouchd.yaml"), {})

    assert config.source == config_dir.resolve() / "vouchd.yaml"
    assert config.agent is not None
    assert config.agent.state_dir == config_dir.resolve() / "state"


# --- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("250ms", timedelta(milliseconds=250)),
        ("90s", timedelta(seconds=90)),
        ("5m", timedelta(minutes=5)),
        ("1h", timedelta(hours=1)),
        ("30d", timedelta(days=30)),
        ("0s", timedelta(0)),
        (" 2h ", timedelta(hours=2)),
    ],
)
def test_parse_duration_reads_one_number_and_one_unit(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "5", "h", "1.5h", "-1s", "5 m", "1w", "1H", "1h30m", "ms", "+5s", "5sec"])
def test_parse_duration_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match=exactly(f"{text!r} {DURATION_HINT}")):
        parse_duration(text)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1.5h", f"authority.ca_ttl: '1.5h' {DURATION_HINT}"),
        ("90", f"authority.ca_ttl: '90' {DURATION_HINT}"),
        ("1w", f"authority.ca_ttl: '1w' {DURATION_HINT}"),
        ("0s", "authority.ca_ttl: must be longer than zero"),
        ("0ms", "authority.ca_ttl: must be longer than zero"),
    ],
)
def test_a_bad_duration_in_the_file_names_its_key(value: str, message: str, source: Path) -> None:
    assert refused(f"trust_domain: example.org\nauthority: {{ca_ttl: {value}}}\n", source) == message


def test_a_zero_entry_ttl_is_refused(source: Path) -> None:
    text = with_entry("{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], x509_ttl: 0s}")

    assert refused(text, source) == "entries[0].x509_ttl: must be longer than zero"


# --- pcr_selection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "bank", "indices"),
    [
        ("sha256:0-7", "sha256", (0, 1, 2, 3, 4, 5, 6, 7)),
        ("sha256:0,1,2,7", "sha256", (0, 1, 2, 7)),
        ("sha256:7,0", "sha256", (0, 7)),
        ("sha384:0-3,7", "sha384", (0, 1, 2, 3, 7)),
        ("sha512:0-7,3,4-5", "sha512", (0, 1, 2, 3, 4, 5, 6, 7)),
        ("sha256:23", "sha256", (23,)),
    ],
)
def test_pcr_selection_forms(text: str, bank: str, indices: tuple[int, ...], source: Path) -> None:
    authority = parse(f"trust_domain: example.org\nauthority: {{pcr_selection: '{text}'}}\n", source).authority

    assert authority is not None
    assert (authority.pcr_bank, authority.pcr_indices) == (bank, indices)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sha256", f"{PCR_HINT}, got 'sha256'"),
        ("sha256:", f"{PCR_HINT}, got 'sha256:'"),
        ("md5:0-7", f"{PCR_HINT}, got 'md5:0-7'"),
        ("SHA256:0-7", f"{PCR_HINT}, got 'SHA256:0-7'"),
        ("sha256:a-b", f"{PCR_HINT}, got 'sha256:a-b'"),
        ("sha256:0,,7", f"{PCR_HINT}, got 'sha256:0,,7'"),
        ("sha256:-1", f"{PCR_HINT}, got 'sha256:-1'"),
        ("sha256:0-24", "PCR indices must be between 0 and 23"),
        ("sha256:24", "PCR indices must be between 0 and 23"),
        ("sha1:7", "the sha1 PCR bank is refused: sha1 is collision-broken; use sha256 (e.g. sha256:7), got 'sha1:7'"),
    ],
)
def test_bad_pcr_selections_are_refused(text: str, message: str, source: Path) -> None:
    config = f"trust_domain: example.org\nauthority: {{pcr_selection: '{text}'}}\n"

    assert refused(config, source) == f"authority.pcr_selection: {message}"


@pytest.mark.parametrize("text", ["sha256:0-", "sha256:0-7,9-8"])
def test_open_or_reversed_pcr_ranges_are_refused(text: str, source: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("authority.pcr_selection: ")):
        parse(f"trust_domain: example.org\nauthority: {{pcr_selection: '{text}'}}\n", source)


# --- entries ------------------------------------------------------------------------------------


def test_an_entry_with_only_the_required_fields(source: Path) -> None:
    entry = only_entry(with_entry("{spiffe_id: 'spiffe://example.org/web', selectors: ['unix:uid:1000']}"), source)

    assert entry.spiffe_id == SpiffeId.parse("spiffe://example.org/web")
    assert entry.selectors == frozenset({Selector("unix", "uid", "1000")})
    assert entry.parent is None
    assert entry.node_selectors == frozenset()
    assert entry.min_tier is TrustTier.HARDWARE
    assert entry.x509_ttl is None
    assert entry.dns_names == ()
    assert entry.hint == ""
    assert re.fullmatch(r"e-[0-9a-f]{16}", entry.id)


def test_an_entry_with_every_field(source: Path) -> None:
    entry = only_entry(
        f"""
        trust_domain: example.org
        entries:
          - id: web.frontend_1
            spiffe_id: spiffe://example.org/web
            selectors: ["unix:uid:1000", "unix:path:/usr/bin/web", "systemd:unit:web.service"]
            node_selectors: ["tpm:ek_hash:{EK_HASH}", "node:label:role:web"]
            min_tier: static-secret
            x509_ttl: 10m
            jwt_ttl: 5m
            dns_names: [web.example.org, "*.web.example.org"]
            hint: frontend
            labels: {{team: web, cost/centre: 42}}
        """,
        source,
    )

    assert entry == Entry(
        id="web.frontend_1",
        spiffe_id=SpiffeId.parse("spiffe://example.org/web"),
        selectors=frozenset({Selector("unix", "uid", "1000"), Selector("unix", "path", "/usr/bin/web"),
                             Selector("systemd", "unit", "web.service")}),
        node_selectors=frozenset({Selector("tpm", "ek_hash", EK_HASH), Selector("node", "label", "role:web")}),
        min_tier=TrustTier.STATIC_SECRET,
        x509_ttl=timedelta(minutes=10),
        jwt_ttl=timedelta(minutes=5),
        dns_names=("web.example.org", "*.web.example.org"),
        hint="frontend",
        labels=(("cost/centre", "42"), ("team", "web")),
        revision=1,
    )


def test_the_default_entry_id_depends_on_id_and_selectors_not_their_order(source: Path) -> None:
    first = only_entry(with_entry("{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0', 'unix:gid:0']}"),
                       source)
    reordered = only_entry(
        with_entry("{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:gid:0', 'unix:uid:0']}"), source
    )
    other_id = only_entry(
        with_entry("{spiffe_id: 'spiffe://example.org/b', selectors: ['unix:uid:0', 'unix:gid:0']}"), source
    )
    other_selectors = only_entry(with_entry("{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0']}"),
                                 source)

    assert first.id == reordered.id
    assert len({first.id, other_id.id, other_selectors.id}) == 3


@pytest.mark.parametrize("anchor", ["unix:uid:0", "unix:gid:0", "systemd:unit:web.service",
                                    "container:id:0123abcd", "k8s:pod_uid:8f1c-22"])
def test_each_kernel_anchored_selector_anchors_an_entry(anchor: str, source: Path) -> None:
    body = f"{{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:sha256:{SHA256}', '{anchor}']}}"

    entry = only_entry(with_entry(body), source)

    assert Selector.parse(anchor) in entry.selectors


@pytest.mark.parametrize(
    "selectors",
    [["unix:path:/usr/bin/python3"], [f"unix:sha256:{SHA256}", "script:path:/opt/agent.py"], ["unix:user:root"],
     ["systemd:slice:system.slice"], ["container:runtime:docker"]],
)
def test_an_entry_without_a_kernel_anchored_selector_is_refused(selectors: list[str], source: Path) -> None:
    text = with_entry(f"{{spiffe_id: 'spiffe://example.org/a', selectors: {selectors}}}")

    assert refused(text, source) == f"entries[0].selectors: needs at least one kernel-anchored selector ({ANCHORED})"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{selectors: ['unix:uid:0']}", "entries[0].spiffe_id: is required (a string)"),
        ("{spiffe_id: 'spiffe://other.org/a', selectors: ['unix:uid:0']}",
         "entries[0].spiffe_id: must be in the trust domain example.org"),
        ("{spiffe_id: 'spiffe://example.org', selectors: ['unix:uid:0']}",
         "entries[0].spiffe_id: a workload's SPIFFE ID needs a path, e.g. spiffe://example.org/web"),
        ("{spiffe_id: 'spiffe://example.org/vouchd/node/tpm/ab', selectors: ['unix:uid:0']}",
         "entries[0].spiffe_id: paths under /vouchd/ are reserved for vouchd itself"),
        ("{spiffe_id: 'spiffe://example.org/vouchd', selectors: ['unix:uid:0']}",
         "entries[0].spiffe_id: paths under /vouchd/ are reserved for vouchd itself"),
        ("{spiffe_id: 'example.org/a', selectors: ['unix:uid:0']}",
         "entries[0].spiffe_id: spiffe id 'example.org/a': scheme must be spiffe://"),
        ("{spiffe_id: 'spiffe://example.org/a'}", "entries[0].selectors: an entry needs at least one selector"),
        ("{spiffe_id: 'spiffe://example.org/a', selectors: []}",
         "entries[0].selectors: an entry needs at least one selector"),
        ("{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0', 'uid=0']}",
         "entries[0].selectors[1]: selector 'uid=0' is not of the form type:key:value"),
        ("{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], parent: 'node-1'}",
         "entries[0].parent: spiffe id 'node-1': scheme must be spiffe://"),
        ("{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], node_selectors: ['tpm:ek_issuer_cn:Acme']}",
         "entries[0].node_selectors: must include tpm:ek_hash or a node:label selector"),
        ("{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], node_selectors: ['node:tier:hardware']}",
         "entries[0].node_selectors: must include tpm:ek_hash or a node:label selector"),
        ("{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], node_selectors: ['label']}",
         "entries[0].node_selectors[0]: selector 'label' is not of the form type:key:value"),
        ("{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], "
         "parent: 'spiffe://example.org/vouchd/node/join/t1', node_selectors: ['node:label:role:web']}",
         "entries[0].node_selectors: an entry has either a parent or node_selectors, not both"),
        ("{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], min_tier: gold}",
         "entries[0].min_tier: expected one of hardware, static-secret, got 'gold'"),
        ("{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], id: '-leading-dash'}",
         f"entries[0].id: {ID_RULE}"),
        ("{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], id: 'has space'}",
         f"entries[0].id: {ID_RULE}"),
        (f"{{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], id: {'a' * 129}}}",
         f"entries[0].id: {ID_RULE}"),
        ("{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], x509_ttl: soon}",
         f"entries[0].x509_ttl: 'soon' {DURATION_HINT}"),
        ("{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], dns_names: web.example.org}",
         "entries[0].dns_names: expected a list of strings, got a string"),
        ("{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], dns_names: [a.example, 'not a name']}",
         "entries[0].dns_names[1]: dns name 'not a name' is not a valid dns name"),
        ("{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], dns_names: ['web.*.example.org']}",
         "entries[0].dns_names[0]: dns name 'web.*.example.org' is not a valid dns name"),
    ],
)
def test_bad_entries_are_refused_naming_the_field(body: str, message: str, source: Path) -> None:
    assert refused(with_entry(body), source) == message


def test_an_entry_id_of_128_characters_is_accepted(source: Path) -> None:
    entry_id = "a" * 128
    body = f"{{id: {entry_id}, spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0']}}"

    entry = only_entry(with_entry(body), source)

    assert entry.id == entry_id


@pytest.mark.parametrize(
    "node_selectors",
    [[f"tpm:ek_hash:{EK_HASH}"], ["node:label:role:web"], ["node:label:role:web", "tpm:ek_issuer_cn:Acme"]],
)
def test_node_selectors_with_an_ek_hash_or_a_label_are_accepted(node_selectors: list[str], source: Path) -> None:
    body = f"{{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], node_selectors: {node_selectors}}}"

    entry = only_entry(with_entry(body), source)

    assert entry.node_selectors == frozenset(Selector.parse(s) for s in node_selectors)
    assert entry.parent is None


def test_an_entry_bound_to_a_parent(source: Path) -> None:
    body = "{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], parent: 'spiffe://example.org/node/1'}"

    entry = only_entry(with_entry(body), source)

    assert entry.parent == SpiffeId.parse("spiffe://example.org/node/1")
    assert entry.node_selectors == frozenset()


def test_an_entry_listed_twice_is_one_entry(source: Path) -> None:
    text = (
        "trust_domain: example.org\nentries:\n"
        "  - {spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0', 'unix:gid:0']}\n"
        "  - {spiffe_id: 'spiffe://example.org/b', selectors: ['unix:uid:0']}\n"
        "  - {spiffe_id: 'spiffe://example.org/a', selectors: ['unix:gid:0', 'unix:uid:0']}\n"
    )

    config = parse(text, source)

    assert [str(e.spiffe_id) for e in config.entries] == ["spiffe://example.org/a", "spiffe://example.org/b"]


@pytest.mark.parametrize(
    "second",
    [
        "{id: web, spiffe_id: 'spiffe://example.org/other', selectors: ['unix:uid:0']}",
        "{id: web, spiffe_id: 'spiffe://example.org/web', selectors: ['unix:uid:0'], hint: changed}",
    ],
)
def test_a_different_entry_with_a_used_id_is_refused(second: str, source: Path) -> None:
    text = (
        "trust_domain: example.org\nentries:\n"
        "  - {id: web, spiffe_id: 'spiffe://example.org/web', selectors: ['unix:uid:0']}\n"
        f"  - {second}\n"
    )

    assert refused(text, source) == "entries[1].id: entry id 'web' is already used by a different entry"


def test_same_id_and_selectors_with_other_settings_is_a_conflict_not_a_duplicate(source: Path) -> None:
    text = (
        "trust_domain: example.org\nentries:\n"
        "  - {spiffe_id: 'spiffe://example.org/web', selectors: ['unix:uid:0']}\n"
        "  - {spiffe_id: 'spiffe://example.org/web', selectors: ['unix:uid:0'], x509_ttl: 5m}\n"
    )

    message = refused(text, source)

    assert re.fullmatch(r"entries\[1\]\.id: entry id 'e-[0-9a-f]{16}' is already used by a different entry", message)


# --- entry ttls and labels ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("jwt_ttl: soon", f"entries[0].jwt_ttl: 'soon' {DURATION_HINT}"),
        ("jwt_ttl: 0s", "entries[0].jwt_ttl: must be longer than zero"),
        ("jwt_ttl: 500ms", "entries[0].jwt_ttl: must be whole seconds, at least 1s"),
        ("x509_ttl: 1500ms", "entries[0].x509_ttl: must be whole seconds, at least 1s"),
        ("labels: [team]", "entries[0].labels: expected a mapping of names to strings, got a list"),
        ("labels: {team: [a]}", "entries[0].labels.team: expected a string, got a list"),
        ("labels: {team: }", "entries[0].labels.team: expected a string, got nothing"),
        ("labels: {team: true}", "entries[0].labels.team: expected a string, got a boolean"),
        ("labels: {1: a}", "entries[0].labels: expected names (strings) as keys, got int"),
        ("labels: {-team: a}", "entries[0].labels.-team: label keys are 1 to 63 letters, digits, '.', '_', '/' "
                               "or '-', starting with a letter or digit"),
        (f"labels: {{team: {'v' * 257}}}", "entries[0].labels.team: at most 256 characters"),
        ("labels: {team: '${TEAM}'}",
         "entries[0].labels.team: environment variable TEAM is not set and has no default"),
    ],
)
def test_bad_ttls_and_labels_are_refused_naming_the_key(extra: str, message: str, source: Path) -> None:
    assert refused(with_entry(f"{{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], {extra}}}"),
                   source) == message


def test_label_values_may_be_numbers_empty_or_from_the_environment(source: Path) -> None:
    body = "{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], labels: {v: 2, e: '', t: '${T}'}}"

    (entry,) = parse(with_entry(body), source, {"T": "web"}).entries

    assert entry.label_map == {"v": "2", "e": "", "t": "web"}


@pytest.mark.parametrize(
    ("authority", "ttl", "message"),
    [
        ("{}", "2d", "entries[0].x509_ttl: must not exceed authority.x509_svid_max_ttl (2d > 24h)"),
        ("{x509_svid_ttl: 1h, x509_svid_max_ttl: 2h}", "121m",
         "entries[0].x509_ttl: must not exceed authority.x509_svid_max_ttl (121m > 2h)"),
    ],
)
def test_an_entry_ttl_above_the_authority_cap_is_refused(authority: str, ttl: str, message: str,
                                                          source: Path) -> None:
    text = (f"trust_domain: example.org\nauthority: {authority}\nentries:\n"
            f"  - {{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], x509_ttl: {ttl}}}\n")

    assert refused(text, source) == message


def test_an_entry_ttl_at_the_cap_or_without_an_authority_section_is_accepted(source: Path) -> None:
    at_cap = parse("trust_domain: example.org\nauthority: {x509_svid_ttl: 1h, x509_svid_max_ttl: 2h}\nentries:\n"
                   "  - {spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], x509_ttl: 2h}\n", source)
    no_authority = only_entry(with_entry("{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], "
                                         "x509_ttl: 30d}"), source)

    assert at_cap.entries[0].x509_ttl == timedelta(hours=2)
    assert no_authority.x509_ttl == timedelta(days=30)


# --- selectors that nothing produces ------------------------------------------------------------

INSTALLED = "a selector any installed attestor produces"
ENABLED = "a selector any enabled attestor produces"
UNIX_KEYS = "gid, group, path, sha256, supplementary_gid, supplementary_group, uid, user"
DECIMAL_ID = "a decimal number (no sign, spaces or leading zeros) below 4294967295"


@pytest.mark.parametrize(
    ("selectors", "message"),
    [
        (["unix:pth:/x", "unix:uid:0"], f"selectors[0]: unix:pth is not {INSTALLED} (unix produces: {UNIX_KEYS})"),
        (["unix:uidd:0"], f"selectors[0]: unix:uidd is not {INSTALLED} (unix produces: {UNIX_KEYS})"),
        (["unix:uid:abc"], f"selectors[0]: unix:uid:abc: a uid is {DECIMAL_ID}, e.g. unix:uid:1000"),
        (["unix:uid:-1"], f"selectors[0]: unix:uid:-1: a uid is {DECIMAL_ID}, e.g. unix:uid:1000"),
        (["unix:uid: 0"], f"selectors[0]: unix:uid: 0: a uid is {DECIMAL_ID}, e.g. unix:uid:1000"),
        (["unix:uid:4294967295"], f"selectors[0]: unix:uid:4294967295: a uid is {DECIMAL_ID}, e.g. unix:uid:1000"),
        (["unix:gid:0", "unix:sha256:XYZ"],
         "selectors[1]: unix:sha256:XYZ: a sha256 is 64 lowercase hex digits, as sha256sum prints it"),
        (["unix:uid:0", "unix:path:bin/web"], "selectors[1]: unix:path:bin/web: a path is absolute and normalised, "
                                              "as the kernel reports it, e.g. unix:path:/usr/bin/python3.12"),
        (["unix:uid:0", "systemd:unit:"], "selectors[1]: systemd:unit:: a unit is a name"),
        (["unix:uid:0", "dockr:id:x"],
         f"selectors[1]: dockr:id is not {INSTALLED} (known types: container, k8s, lineage, mesh, script, systemd, "
         "unix)"),
        # a typo in the only anchor is named as the typo, not as a missing anchor
        (["unix:path:/usr/bin/web", "unix:uidd:1000"],
         f"selectors[1]: unix:uidd is not {INSTALLED} (unix produces: {UNIX_KEYS})"),
        (["unix:uid:0", "uid=0", "unix:pth:/x"], "selectors[1]: selector 'uid=0' is not of the form type:key:value"),
    ],
)
def test_workload_selectors_no_attestor_produces_are_refused(selectors: list[str], message: str,
                                                             source: Path) -> None:
    text = with_entry(f"{{spiffe_id: 'spiffe://example.org/a', selectors: {selectors}}}")

    assert refused(text, source) == f"entries[0].{message}"


@pytest.mark.parametrize(
    ("node_selectors", "message"),
    [
        (["tpm:ek_hash:AB"], "node_selectors[0]: tpm:ek_hash:AB: an ek_hash is 64 lowercase hex digits, as at the "
                             "end of the node's SPIFFE ID"),
        ([f"tpm:ek_hash:{EK_HASH}", "tpm:ek_hsh:x"],
         "node_selectors[1]: tpm:ek_hsh is not a node selector (tpm produces: ek_hash, ek_issuer_cn, pcr_profile)"),
        (["node:label:role"], "node_selectors[0]: node:label:role: a node label is KEY:VALUE, "
                              "e.g. node:label:role:web"),
        (["node:label:role:web", "node:tier:gold"],
         "node_selectors[1]: node:tier:gold: a tier is one of hardware, static-secret, e.g. node:tier:hardware"),
        (["node:label:role:web", "unix:uid:0"], "node_selectors[1]: unix:uid is not a node selector "
                                                "(known types: node, tpm)"),
        # the node schema comes before the rule that a node be named
        (["tpm:ek_issuer_cn:"], "node_selectors[0]: tpm:ek_issuer_cn:: an ek_issuer_cn is the common name of the "
                                "EK certificate's issuer, e.g. tpm:ek_issuer_cn:Acme TPM CA"),
    ],
)
def test_node_selectors_no_node_has_are_refused(node_selectors: list[str], message: str, source: Path) -> None:
    text = with_entry(f"{{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], "
                      f"node_selectors: {node_selectors}}}")

    assert refused(text, source) == f"entries[0].{message}"


def test_a_plugin_that_declares_nothing_may_be_given_any_selector_of_its_type(source: Path) -> None:
    entry = only_entry(with_entry("{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0', 'mesh:x:y z']}"),
                       source)

    assert Selector("mesh", "x", "y z") in entry.selectors


def test_with_an_agent_section_only_its_enabled_attestors_count(source: Path) -> None:
    entry = "  - {spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0', 'systemd:unit:web.service']}\n"
    unix_only = f"trust_domain: example.org\nagent: {{workload_attestors: {{unix: true, systemd: false}}}}\n" \
                f"entries:\n{entry}"
    with_systemd = f"trust_domain: example.org\nagent: {{workload_attestors: {{unix: {{}}, systemd: {{}}}}}}\n" \
                   f"entries:\n{entry}"

    assert refused(unix_only, source) == (
        f"entries[0].selectors[1]: systemd:unit is not {ENABLED} (known types: unix)"
    )
    assert Selector("systemd", "unit", "web.service") in parse(with_systemd, source).entries[0].selectors


def test_an_unknown_enabled_attestor_is_named_when_entries_need_its_selectors(source: Path) -> None:
    agent = "trust_domain: example.org\nagent: {workload_attestors: {dockr: {}}}\n"
    entries = "entries:\n  - {spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0']}\n"

    assert refused(agent + entries, source) == (
        "agent.workload_attestors: unknown workload attestor 'dockr'; known: container, interpreter, lineage, "
        "mesh, systemd, unix"
    )
    assert parse(agent, source).entries == ()  # without entries, building the attestors reports it


@dataclasses.dataclass
class FakeEntryPoint:
    name: str
    value: str
    target: object = None
    error: Exception | None = None
    loads: int = 0

    def load(self) -> object:
        self.loads += 1
        if self.error is not None:
            raise self.error
        return self.target


def test_plugins_are_imported_only_to_check_entries_that_need_them(source: Path) -> None:
    from vouchd.attestors.catalog import workload_attestor_factories

    broken = FakeEntryPoint("broken", "gone.module:Thing", error=ImportError("no module named 'gone'"))
    factories = workload_attestor_factories(entry_points=[broken])
    entries = "entries:\n  - {spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0']}\n"

    def check(text: str) -> Config:
        return parse_config(text, source, {}, attestor_factories=factories)

    check("trust_domain: example.org\n")
    check(f"trust_domain: example.org\nagent: {{}}\n{entries}")
    assert broken.loads == 0
    with pytest.raises(ConfigError, match=exactly(f"{source}: entries: cannot load workload attestor 'broken' from "
                                                  "entry point 'gone.module:Thing': no module named 'gone'")):
        check(f"trust_domain: example.org\n{entries}")


def test_the_installed_attestors_are_the_default(source: Path) -> None:
    text = with_entry("{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0', 'unix:pth:/x']}")

    with pytest.raises(ConfigError, match=exactly(
            f"{source}: entries[0].selectors[1]: unix:pth is not {INSTALLED} (unix produces: {UNIX_KEYS})")):
        parse_config(text, source, {})


# --- duplicate keys -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("trust_domain: example.org\nlog_level: info\ntrust_domain: other.org\n",
         "trust_domain: duplicate key, at lines 1 and 3"),
        ("trust_domain: example.org\nagent:\n  tpm: {tcti: a}\n  socket_path: /x\n  tpm: {tcti: b}\n",
         "agent.tpm: duplicate key, at lines 3 and 5"),
        ("trust_domain: example.org\nagent: {tpm: {tcti: a, tcti: b}}\n",
         "agent.tpm.tcti: duplicate key, twice at line 2"),
        ("trust_domain: example.org\nagent: {workload_attestors: {unix: {}, unix: {hash_executables: false}}}\n",
         "agent.workload_attestors.unix: duplicate key, twice at line 2"),
        ("trust_domain: example.org\nentries:\n  - spiffe_id: spiffe://example.org/a\n    selectors: ['unix:uid:0']\n"
         "    hint: a\n    hint: b\n", "entries[0].hint: duplicate key, at lines 5 and 6"),
        (with_entry("{spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], labels: {t: a, t: b}}"),
         "entries[0].labels.t: duplicate key, twice at line 3"),
        # one key, two spellings
        ("trust_domain: example.org\nyes: 1\ntrue: 2\n", "True: duplicate key, at lines 2 and 3"),
    ],
)
def test_a_key_given_twice_is_refused_naming_its_path_and_both_lines(text: str, message: str, source: Path) -> None:
    assert refused(text, source) == message


def test_a_duplicate_key_inside_an_anchored_mapping_is_named_where_the_anchor_is(source: Path) -> None:
    text = ("trust_domain: example.org\nentries:\n"
            "  - &web {spiffe_id: 'spiffe://example.org/web', selectors: ['unix:uid:0'], hint: a, hint: b}\n"
            "  - *web\n")

    assert refused(text, source) == "entries[0].hint: duplicate key, twice at line 3"


def test_a_duplicate_key_message_does_not_repeat_the_values(source: Path) -> None:
    message = refused('trust_domain: example.org\nagent: {tpm: {tcti: "s3cr3t-a", tcti: "s3cr3t-b"}}\n', source)

    assert "s3cr3t" not in message


def test_keys_merged_from_an_anchor_may_be_overridden(source: Path) -> None:
    config = parse(
        """
        trust_domain: example.org
        entries:
          - &web {spiffe_id: 'spiffe://example.org/web', selectors: ['unix:uid:0'], hint: web}
          - <<: *web
            spiffe_id: spiffe://example.org/web2
        """,
        source,
    )

    assert [(str(e.spiffe_id), e.hint) for e in config.entries] == [
        ("spiffe://example.org/web", "web"), ("spiffe://example.org/web2", "web"),
    ]


# --- the shipped example ------------------------------------------------------------------------


def test_the_example_parses_with_its_defaults_when_no_variable_is_set() -> None:
    config = load_config(EXAMPLE, {})

    assert config.trust_domain == TrustDomain("example.org")
    assert config.agent is not None and config.authority is not None
    assert config.agent.state_dir == Path("/var/lib/vouchd/agent")
    assert config.agent.socket_path == Path("/run/vouchd/agent.sock")
    assert config.agent.admin_socket_path == Path("/run/vouchd/admin.sock")
    assert config.agent.tpm.tcti == "device:/dev/tpmrm0"
    assert config.agent.event_log_path == Path("/sys/kernel/security/tpm0/binary_bios_measurements")
    assert config.authority.state_dir == Path("/var/lib/vouchd/authority")
    assert config.authority.ek_roots == (Path("/etc/vouchd/ek-roots"),)
    assert config.authority.ek_intermediates == (Path("/etc/vouchd/ek-intermediates"),)
    # Run as root, the "current user" entry and the root entry are the same entry. (The README's tour
    # has users add entries of their own to this file: only the shipped ones are pinned here.)
    shipped = [(str(e.spiffe_id), sorted(map(str, e.selectors)))
               for e in config.entries if "/user/" in e.spiffe_id.path]
    assert shipped == [("spiffe://example.org/user/root", ["unix:uid:0"])]


def test_the_example_parses_with_the_variables_scripts_run_sets(tmp_path: Path) -> None:
    environ = {
        "VOUCHD_STATE_DIR": str(tmp_path / "state"),
        "VOUCHD_RUNTIME_DIR": str(tmp_path / "run"),
        "VOUCHD_TCTI": f"swtpm:path={tmp_path}/swtpm.sock",
        "VOUCHD_EVENT_LOG": str(tmp_path / "boot.log"),
        "VOUCHD_EK_ROOTS": str(tmp_path / "ek" / "roots"),
        "VOUCHD_EK_INTERMEDIATES": str(tmp_path / "ek" / "intermediates"),
        "VOUCHD_RUN_USER": "alice",
        "VOUCHD_RUN_UID": "1000",
    }

    config = load_config(EXAMPLE, environ)

    assert config.agent is not None and config.authority is not None
    assert config.agent.state_dir == tmp_path / "state" / "agent"
    assert config.agent.socket_path == tmp_path / "run" / "agent.sock"
    assert config.agent.admin_socket_path == tmp_path / "run" / "admin.sock"
    assert config.agent.tpm.tcti == f"swtpm:path={tmp_path}/swtpm.sock"
    assert config.agent.event_log_path == tmp_path / "boot.log"
    assert config.authority.state_dir == tmp_path / "state" / "authority"
    assert config.authority.ek_roots == (tmp_path / "ek" / "roots",)
    assert config.authority.ek_intermediates == (tmp_path / "ek" / "intermediates",)
    shipped = [(str(e.spiffe_id), sorted(map(str, e.selectors)))
               for e in config.entries if "/user/" in e.spiffe_id.path]
    assert shipped == [
        ("spiffe://example.org/user/alice", ["unix:uid:1000"]),
        ("spiffe://example.org/user/root", ["unix:uid:0"]),
    ]


# --- reading the file ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("trust_domain: [example.org\n", "line 2, column 1"),
        ("trust_domain: example.org\nagent: {tpm: x\n", "line 3, column 1"),
        ("trust_domain: a: b\n", "line 1, column 16"),
        ("trust_domain: example.org\n\tagent: {}\n", "line 2, column 1"),
    ],
)
def test_invalid_yaml_gives_line_and_column(text: str, where: str, source: Path) -> None:
    assert refused(text, source).startswith(f"not valid YAML at {where}: ")


def test_the_yaml_error_does_not_repeat_the_offending_text(source: Path) -> None:
    message = refused('trust_domain: example.org\nagent: {tpm: {tcti: "s3cr3t-value"\n', source)

    assert "s3cr3t" not in message


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"

    with pytest.raises(ConfigError, match=exactly(f"{missing}: cannot read configuration: No such file or directory")):
        load_config(missing, {})


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("trust_domain: caf\u00e9.org\n".encode("latin-1"))

    with pytest.raises(ConfigError, match=exactly(f"{path}: configuration is not UTF-8 text")):
        load_config(path, {})


def test_config_errors_are_vouchd_errors() -> None:
    assert issubclass(ConfigError, VouchdError)


# --- vouchd config check ------------------------------------------------------------------------


def test_config_check_accepts_a_valid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "vouchd.yaml"
    path.write_text(
        "trust_domain: example.org\nagent: {}\nauthority: {}\nentries:\n"
        "  - {spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0']}\n"
        "  - {spiffe_id: 'spiffe://example.org/b', selectors: ['unix:uid:1']}\n"
    )

    code = main(["config", "check", str(path)])

    out, err = capsys.readouterr()
    assert code == 0
    assert out == f"{path.resolve()}: ok (trust domain example.org; sections: agent, authority; 2 entries)\n"
    assert err == ""


def test_config_check_names_the_problem_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "vouchd.yaml"
    path.write_text("trust_domain: example.org\nagent: {tpm: {ek: rsa1024}}\n")

    code = main(["config", "check", str(path)])

    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert err == (
        f"vouchd: {path.resolve()}: agent.tpm.ek: expected one of rsa2048, ecc-p256, ecc-p384, got 'rsa1024'\n"
    )


def test_config_check_reports_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "missing.yaml"

    code = main(["config", "check", str(path)])

    assert code == 1
    assert capsys.readouterr().err == f"vouchd: {path}: cannot read configuration: No such file or directory\n"


def test_config_check_accepts_the_shipped_example(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("VOUCHD_STATE_DIR", "VOUCHD_RUNTIME_DIR", "VOUCHD_TCTI", "VOUCHD_EVENT_LOG", "VOUCHD_EK_ROOTS",
                 "VOUCHD_EK_INTERMEDIATES", "VOUCHD_RUN_USER", "VOUCHD_RUN_UID"):
        monkeypatch.delenv(name, raising=False)

    code = main(["config", "check", str(EXAMPLE)])

    assert code == 0
    assert re.fullmatch(rf"{re.escape(str(EXAMPLE))}: ok \(trust domain example.org; sections: agent, authority; "
                        r"(1 entry|\d+ entries)\)\n", capsys.readouterr().out)


def test_config_check_also_checks_workload_attestor_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vouchd.cli import main

    path = tmp_path / "vouchd.yaml"
    path.write_text("trust_domain: example.org\nagent:\n  workload_attestors:\n    unix: {hash_everything: true}\n")

    assert main(["config", "check", str(path)]) == 1
    assert "workload attestor 'unix': unknown option 'hash_everything'" in capsys.readouterr().err


def test_a_misspelt_entry_key_is_named_as_unknown(source: Path) -> None:
    text = "trust_domain: example.org\nentries:\n  - {spiffe_id: spiffe://example.org/web, selector: ['unix:uid:1']}\n"
    assert refused(text, source) == "entries[0].selector: unknown key"


def test_an_empty_variable_is_called_empty_not_unset(source: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config("trust_domain: ${TD}\n", source, {"TD": ""})
    assert str(raised.value).endswith("trust_domain: environment variable TD is empty and has no default")


@pytest.mark.parametrize("name", ["bad name", "a/b", "-dash", "x" * 65, ""])
def test_node_learn_refuses_a_profile_name_that_cannot_be_a_selector(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vouchd.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["node", "learn", "--config", str(tmp_path / "any.yaml"), f"--name={name}"])
    assert exited.value.code == 2
    assert "use 1 to 64 letters, digits" in capsys.readouterr().err


def test_a_key_left_empty_takes_its_default_rather_than_being_called_unknown(source: Path) -> None:
    config = parse_config(
        "trust_domain: example.org\nagent: {event_log: }\n"
        "entries:\n  - {spiffe_id: spiffe://example.org/web, selectors: ['unix:uid:1'], hint: , x509_ttl: }\n",
        source, {},
    )
    assert config.agent is not None and config.agent.event_log_path is None
    assert config.entries[0].hint == "" and config.entries[0].x509_ttl is None


def test_a_misspelt_top_level_key_is_named_before_the_key_it_stands_for_is_missed(source: Path) -> None:
    assert refused("trust_domian: example.org\n", source) == "trust_domian: unknown key"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("trust_domain: example.org\nagent: {}\nentries:\n"
         "  - {spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0', 'unix:pth:/x']}\n",
         f"entries[0].selectors[1]: unix:pth is not {ENABLED} (unix produces: {UNIX_KEYS})"),
        ("trust_domain: example.org\nentries:\n"
         "  - {spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], node_selectors: ['tpm:ek_hash:x']}\n",
         "entries[0].node_selectors[0]: tpm:ek_hash:x: an ek_hash is 64 lowercase hex digits, as at the end of the "
         "node's SPIFFE ID"),
        ("trust_domain: example.org\nauthority: {}\nentries:\n"
         "  - {spiffe_id: 'spiffe://example.org/a', selectors: ['unix:uid:0'], x509_ttl: 25h}\n",
         "entries[0].x509_ttl: must not exceed authority.x509_svid_max_ttl (25h > 24h)"),
        ("trust_domain: example.org\nagent: {}\nagent: {}\n", "agent: duplicate key, at lines 2 and 3"),
    ],
    ids=["workload-selector", "node-selector", "ttl-cap", "duplicate-key"],
)
def test_config_check_reports_entry_problems_as_the_daemon_would(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "vouchd.yaml"
    path.write_text(text)

    code = main(["config", "check", str(path)])

    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    assert err == f"vouchd: {path.resolve()}: {message}\n"
