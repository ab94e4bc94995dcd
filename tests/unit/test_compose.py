"""Static checks of compose/: no Docker engine runs here, so check what an engine would reject
or what would fail at run time: references to undeclared volumes and networks, variables
missing from .env.example, services nobody health-checks, settings tiermail does not know.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.settings import PREFIX, Settings
from services.stack import stop_grace
from services.store.learning import broker_attempt_limit
from services.store.main import CONSUMER_STOP_WAIT

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
FILES = sorted(COMPOSE.glob("*.yaml"))
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; $$ escapes a dollar.
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:[:]?[-?+][^}]*)?\}")
SETTING_NAMES = {PREFIX + f.name.upper() for f in fields(Settings)}


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name}: not a mapping"
    return data


def all_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = {}
    for path in FILES:
        for name, service in load(path).get("services", {}).items():
            assert name not in services, f"service {name} defined twice"
            services[name] = service
    return services


def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (COMPOSE / ".env.example").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f".env.example: not KEY=VALUE: {line!r}"
        values[key.strip()] = value.strip()
    return values


def named_volumes(service: dict[str, Any]) -> list[str]:
    names = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            if entry.get("type", "volume") == "volume" and entry.get("source"):
                names.append(entry["source"])
            continue
        source = str(entry).split(":", 1)[0]
        # Bind mounts are paths (or a variable holding one); anything else is a named volume.
        if ":" in str(entry) and not source.startswith((".", "/", "~", "$")):
            names.append(source)
    return names


def service_networks(service: dict[str, Any]) -> list[str]:
    networks = service.get("networks", [])
    return list(networks) if isinstance(networks, (list, dict)) else []


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    value = service.get("depends_on", {})
    if isinstance(value, list):
        return {name: {"condition": "service_started"} for name in value}
    return dict(value)


def has_healthcheck(service: dict[str, Any]) -> bool:
    check = service.get("healthcheck")
    if not check or check.get("disable"):
        return False
    test = check.get("test")
    return bool(test) and test != ["NONE"]


def test_expected_files_exist() -> None:
    names = {p.name for p in FILES}
    assert {"base.yaml", "filter.yaml", "store.yaml", "webmail.yaml"} <= names
    assert (COMPOSE / "Dockerfile").is_file()
    assert (COMPOSE / ".env.example").is_file()


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_file_parses_and_has_services(path: Path) -> None:
    data = load(path)
    assert data.get("services"), f"{path.name} defines no services"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_volumes_and_networks_are_declared_in_the_same_file(path: Path) -> None:
    # Each file declares what it uses, so a tier file also works alone on its own host.
    data = load(path)
    declared_volumes = set(data.get("volumes") or {})
    declared_networks = set(data.get("networks") or {})
    for name, service in data["services"].items():
        for volume in named_volumes(service):
            assert volume in declared_volumes, f"{path.name}: {name} uses undeclared {volume}"
        for network in service_networks(service):
            assert network in declared_networks, f"{path.name}: {name} uses undeclared {network}"
        for entry in service.get("volumes", []):
            source = str(entry).split(":", 1)[0] if isinstance(entry, str) else ""
            if source.startswith("./"):
                assert (COMPOSE / source).exists(), f"{path.name}: {name} mounts missing {source}"


def test_every_variable_is_in_env_example() -> None:
    documented = env_example()
    used: set[str] = set()
    for path in FILES:
        used |= set(VARIABLE.findall(path.read_text()))
    missing = sorted(used - set(documented))
    assert not missing, f"variables used in compose/ but missing from .env.example: {missing}"
    unused = sorted(set(documented) - used)
    assert not unused, f".env.example lists variables no compose file uses: {unused}"


def test_env_example_names_are_not_tiermail_settings() -> None:
    # tiermail refuses unknown TIERMAIL_* variables; compose-only names must not look like them.
    assert not [k for k in env_example() if k.startswith(PREFIX)]


def test_tier_environment_uses_only_known_settings() -> None:
    for name, service in all_services().items():
        environment = service.get("environment", {})
        keys = (environment if isinstance(environment, dict)
                else [e.split("=", 1)[0] for e in environment])
        unknown = [k for k in keys if k.startswith(PREFIX) and k not in SETTING_NAMES]
        assert not unknown, f"{name}: unknown tiermail settings {unknown}"


def test_every_service_is_health_checked() -> None:
    services = all_services()
    for name, service in services.items():
        if has_healthcheck(service):
            continue
        healthy_deps = [dep for dep, spec in depends_on(service).items()
                        if spec.get("condition") == "service_healthy"]
        assert healthy_deps, f"{name} has no healthcheck and depends on no healthy service"


def test_dependencies_exist_and_wait_for_health() -> None:
    services = all_services()
    for name, service in services.items():
        for dep, spec in depends_on(service).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert spec.get("condition") == "service_healthy", f"{name} -> {dep}: not healthy"
            assert has_healthcheck(services[dep]), f"{name} waits for {dep}, which has no check"


def test_services_wait_for_the_broker_and_redis_they_use() -> None:
    """The docs say the tiers wait for both; the learner waited for RabbitMQ only, though
    its start checks Redis (its learn ledger and heartbeat)."""
    for name, service in all_services().items():
        environment = service.get("environment", {})
        needs = {dep for setting, dep in (("TIERMAIL_AMQP_URL", "rabbitmq"),
                                          ("TIERMAIL_REDIS_URL", "redis"))
                 if setting in environment}
        assert needs <= set(depends_on(service)), f"{name} does not wait for {needs}"


def test_the_learner_runs_as_the_stacks_spam_settings_say() -> None:
    """LEARN=off or SPAM=off in .env did not reach the learner, which kept learning (and,
    told, would have exited, to be restarted for ever: it waits instead)."""
    services = all_services()
    learner = services["learner"]
    assert learner["command"] == ["learner", "--wait-when-off"]
    for setting in ("TIERMAIL_LEARN", "TIERMAIL_SPAM"):
        assert learner["environment"][setting] == services["store"]["environment"][setting]
    assert learner["environment"]["TIERMAIL_SPAM"] == services["filter"]["environment"][
        "TIERMAIL_SPAM"]


# What docs/operations.md has an operator put into compose/: never to be committed, nor sent
# to the Docker engine with the build context.
COMPOSE_SECRETS = ["compose/.env", "compose/tls/cert.pem", "compose/tls/key.pem",
                   "compose/rspamd/secrets/controller-password.inc"]


@pytest.mark.parametrize("secret", COMPOSE_SECRETS)
def test_secrets_put_into_compose_are_ignored_by_git(secret: str) -> None:
    ignored = subprocess.run(["git", "check-ignore", "--quiet", "--no-index", secret],
                             cwd=COMPOSE.parent, check=False)
    assert ignored.returncode == 0, f"git would add {secret}"


def test_secrets_put_into_compose_stay_out_of_the_build_context() -> None:
    patterns = [line.strip() for line in (COMPOSE.parent / ".dockerignore").read_text()
                .splitlines() if line.strip() and not line.startswith("#")]
    for secret in COMPOSE_SECRETS:
        assert any(fnmatch.fnmatch(secret, pattern) or secret.startswith(pattern + "/")
                   for pattern in patterns), f"{secret} is sent to the Docker engine"


def test_tiers_run_the_tiermail_command() -> None:
    services = all_services()
    for tier in ("filter", "store", "webmail"):
        assert services[tier]["command"] == [tier]
        assert services[tier]["build"]["dockerfile"] == "compose/Dockerfile"
    assert "replicas" in services["filter"]["deploy"]
    assert "replicas" not in services["store"].get("deploy", {}), "the store must not scale"


@pytest.mark.parametrize("tier", ["filter", "store", "learner"])
def test_a_tier_is_given_the_time_its_stop_takes(tier: str) -> None:
    """The same grace as `tiermail up` gives: a filter answers the messages it is
    publishing, a learner gives up a silent broker."""
    grace = all_services()[tier]["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) == stop_grace(tier, Settings())


def test_stop_graces_cover_the_tiers_own_limits() -> None:
    settings = Settings()
    assert stop_grace("filter", settings) > settings.publish_timeout
    assert stop_grace("learner", settings) > broker_attempt_limit()
    # The rest of the store's stop (sessions told BYE, indexes closed) needs seconds, not tens.
    assert stop_grace("store", settings) >= CONSUMER_STOP_WAIT + 10


def test_store_keeps_its_data_in_a_named_volume() -> None:
    store = all_services()["store"]
    data_dir = store["environment"]["TIERMAIL_DATA_DIR"]
    assert any(str(v).split(":")[1] == data_dir for v in store["volumes"]
               if not str(v).startswith((".", "/", "$")))


def test_dockerfile_entrypoint_is_tiermail() -> None:
    instructions: dict[str, str] = {}
    for line in (COMPOSE / "Dockerfile").read_text().splitlines():
        word, _, rest = line.strip().partition(" ")
        if word.isupper():
            instructions[word] = rest.strip()  # the last one wins, as in Docker
    assert instructions["FROM"].startswith("python:3.11")
    assert json.loads(instructions["ENTRYPOINT"]) == ["tiermail"]
    assert instructions["USER"] not in ("root", "0")


def test_rabbitmq_accepts_our_largest_message() -> None:
    conf = (COMPOSE / "rabbitmq" / "rabbitmq.conf").read_text()
    match = re.search(r"^max_message_size\s*=\s*(\d+)\s*$", conf, re.MULTILINE)
    assert match, "rabbitmq.conf must set max_message_size (4.x defaults to 16 MiB)"
    largest = Settings(hostname="test").max_message_size
    assert int(match.group(1)) >= largest + 1024 * 1024, "no room for the envelope"


def test_compose_clamd_reports_what_it_cannot_scan_whole(tmp_path: Path) -> None:
    """The official image's clamd answered OK for a message it could not scan whole (ClamAV's
    AlertExceedsMax defaults to no): a virus in 25 nested zips was delivered as clean. The
    clamd.conf mounted over the image's must be one clamd reads (clamconf, from Debian's
    clamav-daemon, parses it as clamd does) and say so."""
    clamav = all_services()["clamav"]
    assert "./clamav/clamd.conf:/etc/clamav/clamd.conf:ro" in clamav["volumes"]
    (tmp_path / "clamd.conf").write_bytes((COMPOSE / "clamav" / "clamd.conf").read_bytes())
    checked = subprocess.run(["clamconf", "-c", str(tmp_path)], capture_output=True,
                             text=True, timeout=60, check=True)
    assert "Parse error" not in checked.stdout + checked.stderr, checked.stderr
    values = dict(re.findall(r'^(\w+) = "(.*)"$', checked.stdout, re.MULTILINE))
    assert values["AlertExceedsMax"] == "yes"
    assert values["TCPSocket"] == "3310"  # the filters' TIERMAIL_CLAMD_ADDRESS, the health check
    stream_max = Settings(hostname="test").clamd_stream_max
    for limit in ("StreamMaxLength", "MaxScanSize", "MaxFileSize"):
        assert int(values[limit]) >= stream_max, limit


@pytest.mark.parametrize("options", [
    COMPOSE / "rspamd" / "local.d" / "options.inc",
    COMPOSE.parent / "deploy" / "scanners" / "rspamd" / "local.d" / "options.inc",
])
def test_rspamd_max_message_is_the_one_the_filter_is_told(options: Path) -> None:
    """rspamd drops a message over its max_message; the filter refuses a
    TIERMAIL_MAX_MESSAGE_SIZE above TIERMAIL_RSPAMD_MAX_MESSAGE, which is only true if the
    rspamd we ship says the same."""
    match = re.search(r"^max_message\s*=\s*(\d+);", options.read_text(), re.MULTILINE)
    assert match, f"{options} must set max_message"
    assert int(match.group(1)) == Settings(hostname="test").rspamd_max_message


def interpolate(text: str, values: dict[str, str]) -> str:
    """compose's ${VAR}, ${VAR:-default}, ${VAR:?error} with .env.example's values."""
    def value(match: re.Match[str]) -> str:
        name, operator, fallback = match.group(1), match.group(2) or "", match.group(3)
        current = values.get(name)
        # ":-" and ":?" treat an empty value as unset; "-" and "?" only a missing one.
        if current or (current == "" and not operator.startswith(":")):
            return current
        return fallback if operator.endswith("-") else ""
    return re.sub(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?])?([^}]*)\}", value, text)


def tier_settings(name: str) -> Settings:
    """The settings a tier's container starts with: the Dockerfile's ENV, then the service's
    environment with .env.example's values, as `tiermail` reads them."""
    environment = all_services()[name].get("environment", {})
    values = env_example()
    env = {**dockerfile_env(),
           **{key: interpolate(str(raw), values) for key, raw in environment.items()}}
    return Settings.from_env(env)


def dockerfile_env() -> dict[str, str]:
    """The Dockerfile's ENV instructions (KEY=VALUE form, continued lines joined)."""
    text = (COMPOSE / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ENV":
            env.update(item.split("=", 1) for item in rest.split())
    return env


TIER_PORTS = {"filter": ("smtp_port", "submission_port"),
              "store": ("imap_port", "imaps_port", "pop3_port", "pop3s_port"),
              "webmail": ("webmail_port",)}


@pytest.mark.parametrize("name", ["filter", "store", "learner", "webmail"])
def test_tier_environment_is_accepted_by_the_settings(name: str) -> None:
    tier_settings(name)  # raises SettingsError, naming the value, when tiermail would


@pytest.mark.parametrize("name", sorted(TIER_PORTS))
def test_published_and_health_checked_ports_are_the_ones_the_tier_listens_on(name: str) -> None:
    service = all_services()[name]
    settings = tier_settings(name)
    listening = {getattr(settings, port) for port in TIER_PORTS[name]}
    published = {int(str(mapping).rsplit(":", 1)[1]) for mapping in service["ports"]}
    assert published == listening, f"{name} publishes {published}, listens on {listening}"
    checked = re.search(r"'127\.0\.0\.1', (\d+)", " ".join(service["healthcheck"]["test"]))
    assert checked and int(checked.group(1)) in listening, f"{name}: healthcheck port"
