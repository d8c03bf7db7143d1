"""docker/: what can be checked without a container engine (none runs on the development
machines or in CI). Nothing here builds an image or starts a container.

- docker-compose.yml parses and has the services postgres, node and worker; the worker
  is scalable (no container_name, no fixed host port);
- every command line of a service that runs the router image (entrypoint + command, the
  image's defaults where the service gives none, and each `dicom-router ...` line of a
  shell script) is a real CLI command with real options and well-typed values, checked
  by click's own parser without running it (existence of key files aside);
- every DICOM_ROUTER_* variable the compose file or the Dockerfile sets is one the
  settings read, and each service's environment loads as settings;
- the Dockerfile runs as a non-root USER, declares the data directory as a VOLUME, has a
  HEALTHCHECK that does a C-ECHO, EXPOSEs the DICOM port and copies paths that exist;
- the pieces fit: key files the node and worker are given are the ones the keys service
  writes, on the volume they mount; the worker connects to the node's --worker-bind port;
  the database URL names the postgres service, its user and database.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

from router.cli import main
from router.settings import ListenerSettings, Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"
SHELLS = ("sh", "/bin/sh", "bash", "/bin/bash")


# -- the files, parsed ---------------------------------------------------------------------
@dataclasses.dataclass
class Dockerfile:
    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments) of the final stage
    all_instructions: list[tuple[str, str]]

    def last(self, name: str) -> str | None:
        values = [args for instr, args in self.instructions if instr == name]
        return values[-1] if values else None

    def env(self, all_stages: bool = False) -> dict[str, str]:
        found: dict[str, str] = {}
        for instr, args in self.all_instructions if all_stages else self.instructions:
            if instr == "ENV":
                found.update(_env_pairs(args))
        return found

    def exec_form(self, name: str) -> list[str]:
        value = self.last(name)
        assert value is not None, f"the Dockerfile has no {name}"
        return _exec_or_shell(value)


def parse_dockerfile(text: str) -> Dockerfile:
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    everything = []
    for line in logical:
        instr, _, args = line.partition(" ")
        everything.append((instr.upper(), args.strip()))
    starts = [i for i, (instr, _) in enumerate(everything) if instr == "FROM"]
    assert starts, "the Dockerfile has no FROM"
    return Dockerfile(everything[starts[-1] :], everything)


def _env_pairs(args: str) -> dict[str, str]:
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0]:  # the legacy form: ENV NAME value
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(token.split("=", 1) for token in tokens)


def _exec_or_shell(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        form = yaml.safe_load(value)  # the JSON exec form (JSON is YAML)
        assert isinstance(form, list) and all(isinstance(v, str) for v in form), value
        return form
    return ["/bin/sh", "-c", value]


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def router_services(services: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services that run our image (built from docker/Dockerfile)."""
    found = {}
    for name, service in services.items():
        build = service.get("build")
        if isinstance(build, dict):
            built = (COMPOSE_FILE.parent / build.get("context", ".")).resolve()
            if (built / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE:
                found[name] = service
    return found


# -- command lines -------------------------------------------------------------------------
def service_argv(service: Mapping[str, Any], image: Dockerfile) -> list[str]:
    """What the container runs: Compose's entrypoint replaces the image's ENTRYPOINT and
    drops its CMD; a command replaces CMD."""
    entrypoint = service.get("entrypoint")
    command = service.get("command")
    if entrypoint is None:
        argv = image.exec_form("ENTRYPOINT")
        default = image.exec_form("CMD") if image.last("CMD") is not None else []
    else:
        argv, default = _words(entrypoint), []
    return argv + (_words(command) if command is not None else default)


def _words(value: str | list[str]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def router_invocations(argv: list[str]) -> list[list[str]]:
    """The dicom-router argument lists in a container's argv: after `dicom-router` (behind
    tini or not), or in each simple command of a `sh -c` script."""
    if len(argv) >= 3 and argv[0] in SHELLS and argv[1] == "-c":
        return list(_script_invocations(argv[2]))
    assert "dicom-router" in argv, f"{argv} does not run dicom-router"
    return [argv[argv.index("dicom-router") + 1 :]]


def _script_invocations(script: str) -> Iterator[list[str]]:
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        for token in [*lexer, ";"]:
            if set(token) <= set(";&|"):  # the end of a simple command
                if words and PurePosixPath(words[0]).name == "dicom-router":
                    yield words[1:]
                words = []
            else:
                words.append(token)


def parse_cli(args: list[str]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Parse a dicom-router command line with click, as the real run would, without
    running it: (the command's path, e.g. ("keys", "generate"), its parameters). Only
    the existence of files and directories is not checked (they are in volumes)."""
    command: click.Command = main
    ctx: click.Context | None = None
    name, rest = "dicom-router", list(args)
    path: tuple[str, ...] = ()
    while True:
        ctx = _without_existence_checks(command).make_context(name, rest, parent=ctx)
        if not isinstance(command, click.Group):
            return path, dict(ctx.params)
        # A group's context keeps its subcommand and what follows as its last arguments.
        remaining = rest[len(rest) - len(ctx.args) - 1 :] if rest else []
        assert remaining, f"{args}: no command after {' '.join(path) or 'dicom-router'}"
        sub_name, sub, rest = command.resolve_command(ctx, remaining)
        assert sub is not None and sub_name is not None
        command, name, path = sub, sub_name, (*path, sub_name)


def _without_existence_checks(command: click.Command) -> click.Command:
    clone = copy.copy(command)
    clone.params = []
    for param in command.params:
        if isinstance(param.type, click.Path) and param.type.exists:
            lenient = copy.copy(param.type)
            lenient.exists = False
            param = copy.copy(param)
            param.type = lenient
        clone.params.append(param)
    return clone


def test_parse_cli_refuses_what_the_cli_refuses() -> None:
    assert parse_cli(["-v", "serve", "--workers", "0"])[0] == ("serve",)
    assert parse_cli(["keys", "generate", "node", "--dir", "/k"]) == (
        ("keys", "generate"),
        {"name": "node", "directory": "/k", "as_json": False},
    )
    for bad in (
        ["serve", "--no-such-option"],
        ["serve", "--workers", "many"],
        ["serve", "stray"],
        ["worker"],  # --connect is required
        ["no-such-command"],
        ["keys"],
    ):
        with pytest.raises((click.UsageError, AssertionError)):
            parse_cli(bad)


def test_script_invocations_split_shell_lists() -> None:
    script = "set -eu\ntest -e /k/a.key || dicom-router keys generate a --dir /k\nmkdir -p /k/x"
    assert list(_script_invocations(script)) == [["keys", "generate", "a", "--dir", "/k"]]


# -- environment variables -----------------------------------------------------------------
def known_environment_variables() -> dict[str, tuple[str | None, str]]:
    """DICOM_ROUTER_<SECTION>_<KEY> for every field of every section of Settings and
    DICOM_ROUTER_<FIELD> for the top-level ones, each with (section or None, field); and
    DICOM_ROUTER_CONFIG (the settings file: load_settings reads it too)."""
    names: dict[str, tuple[str | None, str]] = {"DICOM_ROUTER_CONFIG": (None, "")}
    for top in dataclasses.fields(Settings):
        section = top.default_factory() if callable(top.default_factory) else None
        if dataclasses.is_dataclass(section):
            for f in dataclasses.fields(section):
                names[f"DICOM_ROUTER_{top.name.upper()}_{f.name.upper()}"] = (top.name, f.name)
        else:
            names[f"DICOM_ROUTER_{top.name.upper()}"] = (None, top.name)
    return names


# Settings that must be given together, or be one of some words, to load at all.
_TOGETHER: dict[tuple[str | None, str], tuple[str, str]] = {
    ("workers", "key"): ("workers", "allowed_keys"),
    ("workers", "allowed_keys"): ("workers", "key"),
    ("listener", "tls_cert"): ("listener", "tls_key"),
    ("listener", "tls_key"): ("listener", "tls_cert"),
}
_WORDS: dict[tuple[str | None, str], str] = {
    ("listener", "accept"): "known",
    ("listener", "unrouted_policy"): "reject",
    ("listener", "ae_title"): "ROUTER2",
    ("workers", "bind"): "tcp://127.0.0.1:7999",
}


def test_the_known_variables_are_the_ones_the_settings_read(tmp_path: Path) -> None:
    """Each derived name reaches the setting it names: set to a value other than the
    default, it changes that setting, or the settings refuse it naming that setting
    (a variable nobody reads would do neither)."""
    known = known_environment_variables()
    assert {"DICOM_ROUTER_DATA_DIR", "DICOM_ROUTER_DB", "DICOM_ROUTER_METRICS_BIND"} <= set(known)
    defaults = Settings()
    for name, (section, field_name) in sorted(known.items()):
        if name == "DICOM_ROUTER_CONFIG":
            continue
        default = _setting(defaults, section, field_name)
        env = {name: _other_value(default, section, field_name, tmp_path)}
        if (section, field_name) in _TOGETHER:
            partner = _TOGETHER[(section, field_name)]
            env[f"DICOM_ROUTER_{partner[0]}_{partner[1]}".upper()] = "x"
        try:
            loaded = load_settings(environ=env)
        except SettingsError as exc:
            dotted = field_name if section is None else f"{section}.{field_name}"
            assert dotted in str(exc), (name, str(exc))
            continue
        assert _setting(loaded, section, field_name) != default, name
    config = tmp_path / "other.toml"
    config.write_text("[listener]\nport = 11999\n")
    assert load_settings(environ={"DICOM_ROUTER_CONFIG": str(config)}).listener.port == 11999


def _setting(settings: Settings, section: str | None, name: str) -> Any:
    return getattr(settings if section is None else getattr(settings, section), name)


def _other_value(default: Any, section: str | None, name: str, tmp_path: Path) -> str:
    if (section, name) in _WORDS:
        return _WORDS[(section, name)]
    if isinstance(default, bool):
        return "false" if default else "true"
    if isinstance(default, int | float):
        return str(default + 1)
    if isinstance(default, Path):
        return str(tmp_path / "elsewhere")
    return "x"


def service_environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} and ${VAR:?error}, with defaults and placeholders."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2) or "", match.group(3) or ""
        return arg if op in (":-", "-") else f"{name.lower()}-placeholder"

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}", one, value)


def test_every_dicom_router_variable_set_is_read_by_the_settings(
    services: dict[str, dict[str, Any]], dockerfile: Dockerfile
) -> None:
    known = known_environment_variables()
    set_by = {name: "the Dockerfile" for name in dockerfile.env(all_stages=True)}
    for service_name, service in services.items():
        for name in service_environment(service):
            set_by[name] = f"service {service_name}"
        for name in service.get("build", {}).get("args", {}) or {}:
            set_by[name] = f"build args of {service_name}"
    ours = {name: where for name, where in set_by.items() if name.startswith("DICOM_ROUTER_")}
    assert ours, "nothing sets a DICOM_ROUTER_ variable"
    unknown = {name: where for name, where in ours.items() if name not in known}
    assert not unknown, f"variables no setting reads: {unknown}"


def test_each_router_service_environment_loads_as_settings(
    services: dict[str, dict[str, Any]], dockerfile: Dockerfile
) -> None:
    for name, service in router_services(services).items():
        env = dockerfile.env() | {
            k: interpolate(v) for k, v in service_environment(service).items()
        }
        env = {k: v for k, v in env.items() if k.startswith("DICOM_ROUTER_")}
        try:
            settings = load_settings(environ=env)
        except SettingsError as exc:
            pytest.fail(f"service {name}: {exc}")
        assert str(settings.data_dir) == dockerfile.env()["DICOM_ROUTER_DATA_DIR"]
        if settings.metrics.enabled:  # scraped from outside the container
            assert settings.metrics.bind == "0.0.0.0", name


# -- the compose file ----------------------------------------------------------------------
def test_compose_has_postgres_node_and_a_scalable_worker(
    services: dict[str, dict[str, Any]],
) -> None:
    assert {"postgres", "node", "worker"} <= set(services)
    assert {"node", "worker"} <= set(router_services(services))
    worker = services["worker"]
    assert "container_name" not in worker
    for port in worker.get("ports", []) or []:
        assert not _published_host_port(port), f"worker publishes a fixed host port: {port}"
    node_ports = [_published_host_port(p) for p in services["node"].get("ports", [])]
    assert any(p and p[1] == str(ListenerSettings().port) for p in node_ports), node_ports


def _published_host_port(port: Any) -> tuple[str, str] | None:
    """(host port, container port) of a ports entry, or None for a container port only."""
    if isinstance(port, dict):
        published = port.get("published")
        return (interpolate(str(published)), str(port.get("target"))) if published else None
    text = interpolate(str(port)).split("/")[0]
    parts = text.rsplit(":", 2)
    if len(parts) == 1:
        return None  # "7000": an ephemeral host port, fine for replicas
    host, container = parts[-2], parts[-1]
    return (host, container) if host else None


def test_every_router_command_line_is_a_real_cli_command(
    services: dict[str, dict[str, Any]], dockerfile: Dockerfile
) -> None:
    seen: set[tuple[str, ...]] = set()
    for name, service in router_services(services).items():
        invocations = router_invocations(service_argv(service, dockerfile))
        assert invocations, f"service {name} runs no dicom-router command"
        for args in invocations:
            try:
                path, _ = parse_cli(args)
            except click.UsageError as exc:
                pytest.fail(f"service {name}: dicom-router {shlex.join(args)}: {exc}")
            seen.add(path)
    assert {("serve",), ("worker",), ("init",), ("keys", "generate")} <= seen, seen
    default = router_invocations(dockerfile.exec_form("ENTRYPOINT") + dockerfile.exec_form("CMD"))
    assert [parse_cli(args)[0] for args in default] == [("serve",)]


def test_the_node_is_healthchecked_by_the_image_and_the_others_opt_out(
    services: dict[str, dict[str, Any]],
) -> None:
    node = services["node"].get("healthcheck")
    assert node is None or (not node.get("disable") and "test" not in node), node
    for name, service in router_services(services).items():
        if name == "node":
            continue
        check = service.get("healthcheck") or {}
        # The image's check C-ECHOes a listener that only the node runs.
        assert check.get("disable") is True or "test" in check, name
    for name, service in services.items():
        for dependency, condition in _dependencies(service).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if condition == "service_healthy":
                assert services[dependency].get("healthcheck") or dependency == "node"


def _dependencies(service: Mapping[str, Any]) -> dict[str, str]:
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        return {name: "service_started" for name in depends}
    return {name: spec.get("condition", "service_started") for name, spec in depends.items()}


def test_volumes_are_declared_and_the_node_keeps_its_data(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], dockerfile: Dockerfile
) -> None:
    declared = set(compose.get("volumes") or {})
    data_dir = dockerfile.env()["DICOM_ROUTER_DATA_DIR"]
    for name, service in services.items():
        for source, _target, _ro in _mounts(service):
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"service {name} mounts undeclared volume {source}"
    node_mounts = {target: source for source, target, _ in _mounts(services["node"])}
    assert node_mounts.get(data_dir) in declared, "the node's data directory is not a volume"


def _mounts(service: Mapping[str, Any]) -> Iterator[tuple[str, str, bool]]:
    for volume in service.get("volumes", []) or []:
        if isinstance(volume, dict):
            yield str(volume.get("source", "")), volume["target"], bool(volume.get("read_only"))
        else:
            source, target, *mode = str(volume).split(":")
            yield source, target, bool(mode and "ro" in mode[0].split(","))


def test_keys_the_node_and_workers_use_are_the_ones_generated_on_their_volume(
    services: dict[str, dict[str, Any]], dockerfile: Dockerfile
) -> None:
    routers = router_services(services)
    written: dict[str, set[str]] = {}  # volume -> files written there (as volume paths)
    for name, service in routers.items():
        argv = service_argv(service, dockerfile)
        mounts = {target: source for source, target, ro in _mounts(service) if not ro}
        files = _files_written(argv, routers, name, dockerfile)
        for path in files:
            volume, inside = _on_volume(path, mounts)
            assert volume, f"service {name} writes {path} outside its volumes"
            written.setdefault(volume, set()).add(inside)
    node_args = parse_cli(router_invocations(service_argv(services["node"], dockerfile))[0])[1]
    worker_args = parse_cli(router_invocations(service_argv(services["worker"], dockerfile))[0])[1]

    def available(service: str, path: str) -> bool:
        mounts = {target: source for source, target, _ in _mounts(services[service])}
        volume, inside = _on_volume(path, mounts)
        return volume is not None and inside in written.get(volume, set())

    assert available("node", node_args["worker_key"]), node_args
    assert available("worker", worker_args["key"]), worker_args
    assert available("worker", worker_args["server_key"]), worker_args
    allowed = node_args["allowed_workers"].rstrip("/")
    pubs = [p for p in _written_under("node", allowed, services, written) if p.endswith(".pub")]
    assert pubs, f"nothing puts a worker's .pub into {allowed}"
    # The worker's key pair is the one whose public key is allowed.
    assert PurePosixPath(worker_args["key"]).stem in {PurePosixPath(p).stem for p in pubs}
    assert (
        PurePosixPath(worker_args["server_key"]).stem == PurePosixPath(node_args["worker_key"]).stem
    )


def _files_written(
    argv: list[str], routers: Mapping[str, Any], name: str, image: Dockerfile
) -> set[str]:
    """keys generate NAME --dir DIR writes DIR/NAME.key and DIR/NAME.pub; `cp A B` in a
    script writes B."""
    files: set[str] = set()
    for args in router_invocations(argv):
        path, params = parse_cli(args)
        if path == ("keys", "generate"):
            directory = params["directory"] or image.env()["DICOM_ROUTER_DATA_DIR"] + "/keys"
            files |= {f"{directory}/{params['name']}.key", f"{directory}/{params['name']}.pub"}
    if len(argv) >= 3 and argv[0] in SHELLS and argv[1] == "-c":
        for line in argv[2].splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["cp"] and len(words) == 3:
                files.add(words[2])
    return files


def _on_volume(path: str, mounts: Mapping[str, str]) -> tuple[str | None, str]:
    for target, source in sorted(mounts.items(), key=lambda m: -len(m[0])):
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return source, path[len(target.rstrip("/")) :]
    return None, path


def _written_under(
    service: str, directory: str, services: Mapping[str, Any], written: Mapping[str, set[str]]
) -> list[str]:
    mounts = {target: source for source, target, _ in _mounts(services[service])}
    volume, inside = _on_volume(directory, mounts)
    return [p for p in written.get(volume or "", set()) if p.startswith(inside + "/")]


def test_the_worker_reaches_the_node_and_the_database_is_postgres(
    services: dict[str, dict[str, Any]], dockerfile: Dockerfile
) -> None:
    node_args = parse_cli(router_invocations(service_argv(services["node"], dockerfile))[0])[1]
    worker_args = parse_cli(router_invocations(service_argv(services["worker"], dockerfile))[0])[1]
    bind, connect = urlsplit(node_args["worker_bind"]), urlsplit(worker_args["connect"])
    assert bind.scheme == connect.scheme == "tcp"
    assert connect.hostname == "node" and connect.port == bind.port, (bind, connect)
    postgres_env = {k: interpolate(v) for k, v in service_environment(services["postgres"]).items()}
    for name, service in router_services(services).items():
        url = urlsplit(interpolate(service_environment(service).get("DICOM_ROUTER_DB", "")))
        if name == "keys" and not url.scheme:
            continue
        assert url.scheme == "postgresql+psycopg", (name, url)
        assert url.hostname == "postgres", (name, url)
        assert url.username == postgres_env["POSTGRES_USER"], name
        assert url.password == postgres_env["POSTGRES_PASSWORD"], name
        assert url.path == "/" + postgres_env["POSTGRES_DB"], name


# -- the Dockerfile ------------------------------------------------------------------------
def test_dockerfile_runs_as_non_root_with_the_data_directory_as_a_volume(
    dockerfile: Dockerfile,
) -> None:
    user = dockerfile.last("USER")
    assert user, "no USER: the image would run as root"
    assert user.split(":")[0] not in ("root", "0"), user
    data_dir = dockerfile.env().get("DICOM_ROUTER_DATA_DIR")
    assert data_dir, "the image does not set DICOM_ROUTER_DATA_DIR"
    volumes: list[str] = []
    for instr, args in dockerfile.instructions:
        if instr == "VOLUME":
            volumes += _exec_or_shell(args) if args.startswith("[") else args.split()
    assert data_dir in volumes, (data_dir, volumes)
    exposed = {
        port.split("/")[0]
        for instr, args in dockerfile.instructions
        if instr == "EXPOSE"
        for port in args.split()
    }
    assert str(ListenerSettings().port) in exposed, exposed
    # The [postgres] extra: psycopg for the postgresql+psycopg:// URL.
    assert any(
        "[postgres]" in args for instr, args in dockerfile.all_instructions if instr == "RUN"
    )


def test_dockerfile_healthcheck_does_a_c_echo(dockerfile: Dockerfile) -> None:
    check = dockerfile.last("HEALTHCHECK")
    assert check and not check.upper().startswith("NONE"), check
    command = check[check.upper().index("CMD") + 3 :].strip()
    argv = _exec_or_shell(command)
    if "dicom-router" in argv:
        path, params = parse_cli(argv[argv.index("dicom-router") + 1 :])
        assert path == ("status",) and params["echo"], (path, params)  # status C-ECHOes
    else:
        joined = " ".join(argv)
        assert "protocol echoscu" in joined, joined


def test_dockerfile_copies_paths_that_exist(dockerfile: Dockerfile) -> None:
    copied = 0
    for instr, args in dockerfile.all_instructions:
        if instr not in ("COPY", "ADD") or "--from=" in args:
            continue
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"{instr} {source}: not in the build context"
            copied += 1
    assert copied
    ignore = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")
    if ignore.exists():
        allowed = {
            line[1:].strip("/") for line in ignore.read_text().splitlines() if line.startswith("!")
        }
        for instr, args in dockerfile.all_instructions:
            if instr == "COPY" and "--from=" not in args:
                for source in [w for w in shlex.split(args) if not w.startswith("--")][:-1]:
                    assert source.strip("./") in allowed, f"{source} is ignored by {ignore.name}"
