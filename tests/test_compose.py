"""Static checks of compose.yaml, the Dockerfile and .dockerignore against each other and the CLI.

Subcommand checks skip (naming the subcommand) while the CLI lacks it, so they tighten on their
own once it lands.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

SERVICES = {"nats", "model", "scheduler", "planner", "gateway", "prefill", "decode"}
CLUSTER = ["nats-a", "nats-b", "nats-c"]  # the nats-cluster profile
DISAGG_SERVICES = sorted(SERVICES - {"nats"})
LONG_RUNNING = sorted(SERVICES - {"nats", "model"})
WORKERS = ["prefill", "decode"]
IMAGE = "disagg:latest"
MODELS_MOUNT = "/models"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    try:
        from disagg.cli.main import build_parser
    except ImportError as err:
        pytest.skip(f"CLI parser not importable: {err}")
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    pytest.fail("disagg parser has no subcommands")


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = _subparsers()
    if name not in sub:
        pytest.skip(f"`disagg {name}` is not in the CLI parser yet")
    return sub[name]


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for s in parser._option_string_actions if s.startswith("--")}


def _as_list(value) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else list(value or [])


def disagg_invocations(service: dict) -> list[list[str]]:
    """Argument lists (after `disagg`) this service runs, through the image's ENTRYPOINT or a
    `sh -c` script."""
    entrypoint = _as_list(service.get("entrypoint"))
    command = _as_list(service.get("command"))
    if not entrypoint:
        return [command]
    assert entrypoint == ["sh", "-c"], f"unexpected entrypoint {entrypoint}"
    (script,) = command
    steps = [shlex.split(step) for step in re.split(r"\|\||&&|;", script)]
    return [step[1:] for step in steps if step and step[0] == "disagg"]


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _env_flag(var: str) -> str:
    """DISAGG_KV_MEMORY_GB -> --kv-memory-gb."""
    return "--" + var.removeprefix("DISAGG_").lower().replace("_", "-")


# --- compose.yaml -------------------------------------------------------------------------------


def default_url(env_value: str) -> str:
    """`${DISAGG_NATS:-url}` -> url (what compose substitutes when the variable is unset)."""
    found = re.fullmatch(r"\$\{DISAGG_NATS:-([^}]+)\}", env_value)
    assert found, f"DISAGG_NATS must default through ${{DISAGG_NATS:-...}}: {env_value}"
    return found.group(1)


def test_service_set(services: dict) -> None:
    assert set(services) == SERVICES | set(CLUSTER)


def test_disagg_services_share_one_image_and_build(services: dict) -> None:
    for name in DISAGG_SERVICES:
        assert services[name].get("image") == IMAGE, name
        assert services[name].get("build") == ".", name
    assert services["nats"]["image"].startswith("nats:2.10")


def test_every_disagg_service_runs_disagg(services: dict) -> None:
    for name in DISAGG_SERVICES:
        calls = disagg_invocations(services[name])
        assert calls and all(calls), f"{name} runs no disagg subcommand"


@pytest.mark.parametrize("name", DISAGG_SERVICES)
def test_commands_name_real_subcommands_and_flags(services: dict, name: str) -> None:
    for argv in disagg_invocations(services[name]):
        parser = _subparser(argv[0])
        used = {arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("--")}
        assert used <= _flags(parser), f"{name}: unknown flags {used - _flags(parser)}"


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_environment_names_real_flags(services: dict, name: str) -> None:
    (argv,) = disagg_invocations(services[name])
    flags = _flags(_subparser(argv[0]))
    for var in _env(services[name]):
        assert var.startswith("DISAGG_"), f"{name}: {var} is not a DISAGG_* variable"
        assert _env_flag(var) in flags, f"{name}: {var} matches no flag of `disagg {argv[0]}`"


def test_nothing_pins_names_or_host_networking(compose: dict) -> None:
    # container_name or host networking would break `--scale`; search the extension blocks too.
    text = json.dumps(compose)
    assert "container_name" not in text
    assert '"network_mode"' not in text


def test_only_the_gateway_publishes_ports(services: dict) -> None:
    for name in SERVICES - {"gateway"}:
        assert "ports" not in services[name], name
    (argv,) = disagg_invocations(services["gateway"])
    port = argv[argv.index("--port") + 1]
    assert services["gateway"]["ports"] == [f"{port}:{port}"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"


def test_workers_bind_all_interfaces_and_advertise_their_hostname(services: dict) -> None:
    for name in WORKERS:
        (argv,) = disagg_invocations(services[name])
        assert argv[0] == name
        assert argv[argv.index("--zmq-host") + 1] == "0.0.0.0"
        assert "--advertise-host" not in argv and "--id" not in argv, name
        env = _env(services[name])
        assert "DISAGG_ADVERTISE_HOST" not in env and "DISAGG_ID" not in env, name


def test_nats_runs_jetstream_with_a_monitoring_healthcheck(services: dict) -> None:
    nats = services["nats"]
    command = _as_list(nats["command"])
    assert "-js" in command and command[command.index("-m") + 1] == "8222"
    test = " ".join(_as_list(nats["healthcheck"]["test"]))
    assert "wget" in test and "localhost:8222/healthz" in test


def test_gateway_healthcheck_hits_health_on_its_port(services: dict) -> None:
    (argv,) = disagg_invocations(services["gateway"])
    test = " ".join(_as_list(services["gateway"]["healthcheck"]["test"]))
    assert f"localhost:{argv[argv.index('--port') + 1]}/health" in test


def test_depends_on_conditions(services: dict) -> None:
    for name in LONG_RUNNING:
        deps = services[name]["depends_on"]
        assert deps["nats"] == {"condition": "service_healthy"}, name
        if "DISAGG_MODEL" in _env(services[name]):
            assert deps["model"] == {"condition": "service_completed_successfully"}, name
        else:
            assert "model" not in deps, name


def test_model_volume_is_mounted_wherever_the_model_is_read_or_written(
    compose: dict, services: dict
) -> None:
    assert "models" in compose["volumes"]
    readers = [n for n in LONG_RUNNING if "DISAGG_MODEL" in _env(services[n])]
    assert {"gateway", "prefill", "decode"} <= set(readers)
    for name in [*readers, "model"]:
        assert f"models:{MODELS_MOUNT}" in services[name]["volumes"], name


def test_model_init_writes_the_model_every_service_reads(services: dict) -> None:
    (argv,) = disagg_invocations(services["model"])
    assert argv[0] == "tiny-model"
    written = argv[1]
    assert written.startswith(MODELS_MOUNT + "/")
    script = _as_list(services["model"]["command"])[0]
    assert script.startswith(f"test -f {written}/config.json ||"), "must not overwrite a model"
    assert services["model"]["restart"] == "no"
    models = {_env(services[n]).get("DISAGG_MODEL") for n in LONG_RUNNING}
    assert models - {None} == {written}


def test_nats_url_is_consistent_and_points_at_the_nats_service(services: dict) -> None:
    urls = {default_url(_env(services[n])["DISAGG_NATS"]) for n in LONG_RUNNING}
    assert len(urls) == 1
    url = urlparse(urls.pop())
    assert (url.scheme, url.hostname, url.port) == ("nats", "nats", 4222)


def test_nats_cluster_profile_routes_three_named_jetstream_nodes(services: dict) -> None:
    routes = {f"nats://{name}:6222" for name in CLUSTER}
    for name in CLUSTER:
        node = services[name]
        assert node["profiles"] == ["nats-cluster"] and node["image"] == services["nats"]["image"]
        command = _as_list(node["command"])
        flags = dict(zip(command, command[1:], strict=False))
        assert "-js" in command and flags["--name"] == name and flags["--cluster_name"] == "disagg"
        assert urlparse(flags["--cluster"]).port == 6222
        assert set(flags["--routes"].split(",")) == routes  # its own route is ignored
        assert "localhost:8222/healthz" in " ".join(_as_list(node["healthcheck"]["test"]))
    header = COMPOSE.read_text().split("services:")[0]
    advertised = re.search(r"DISAGG_NATS=(\S+)", header).group(1)
    assert {urlparse(u).hostname for u in advertised.split(",")} == set(CLUSTER)


def test_docker_compose_config_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker not installed")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("`docker compose` not available")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# --- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    pairs = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            pairs.append((keyword.upper(), " ".join(args.split())))
    return pairs


def test_dockerfile_base_user_and_entrypoint() -> None:
    steps = dockerfile_instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    (entrypoint,) = [args for kw, args in steps if kw == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["disagg"]
    users = [args for kw, args in steps if kw == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_dockerfile_installs_torch_from_the_index_arg_before_the_project() -> None:
    runs = [args for kw, args in dockerfile_instructions() if kw == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if re.search(r"pip install \S*torch==", r))
    project_step = next(i for i, r in enumerate(runs) if re.search(r"pip install .* \.( |$)", r))
    assert torch_step < project_step
    assert "--index-url" in runs[torch_step] and "${TORCH_INDEX_URL}" in runs[torch_step]
    assert "--constraint" in runs[project_step] or " -c " in runs[project_step]
    args = dict(a.split("=", 1) for kw, a in dockerfile_instructions() if kw == "ARG" and "=" in a)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"


def test_dockerfile_copies_every_package_folder_and_dockerignore_keeps_them() -> None:
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    top_level = {d.split("/")[0] for d in package_dirs}
    copied = set()
    for kw, args in dockerfile_instructions():
        if kw == "COPY":
            copied.update(a.rstrip("/") for a in args.split()[:-1] if not a.startswith("--"))
    needed = top_level | {"pyproject.toml", pyproject["project"]["readme"]}
    assert needed <= copied, f"Dockerfile does not COPY {needed - copied}"
    ignored = {ln.strip().rstrip("/") for ln in DOCKERIGNORE.read_text().splitlines()}
    assert not needed & ignored, f".dockerignore drops {needed & ignored}"
    assert {".git", ".venv"} <= ignored
