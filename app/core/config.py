"""Settings, read once from the environment (prefix QAAS_). Defaults are the embedded single-machine ones."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_DEFAULT_DATA_DIR = Path("var")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QAAS_", extra="ignore")

    data_dir: Path = Field(_DEFAULT_DATA_DIR, description="Uploads, artifacts and the embedded SQLite files.")
    database_url: str = Field("", description="SQLAlchemy URL; empty means SQLite in DATA_DIR/qaas.sqlite.")
    broker_url: str = Field(
        "", description="Celery broker; empty means kombu's SQLite transport in DATA_DIR."
    )
    storage_url: str = Field(
        "",
        description="Where uploads and artifacts live: empty means files under DATA_DIR; s3://bucket/prefix "
        "an S3-compatible bucket.",
    )
    s3_endpoint_url: str = Field("", description="S3 endpoint for MinIO and the like; empty means AWS.")
    s3_region: str = Field("", description="S3 region; empty means boto3's default (AWS_REGION etc.).")
    s3_access_key_id: str = Field(
        "", repr=False, description="S3 credentials; empty means boto3's chain (AWS_* variables, roles)."
    )
    s3_secret_access_key: str = Field("", repr=False)
    auth: Literal["disabled", "required"] = Field(
        "disabled",
        description="required: every /v1 request needs an API key (qaas keys create); disabled: every request "
        "acts as the tenant 'default' (refused on a non-loopback address without ALLOW_PUBLIC_NO_AUTH).",
    )
    allow_public_no_auth: bool = Field(
        False, description="Let `qaas serve` / `qaas api` listen on a public address with QAAS_AUTH=disabled."
    )
    rate_limit_rps: int = Field(
        50,
        ge=0,
        description="Requests per second per API key (429 above; 0: no limit). Redis-backed when "
        "Redis is the broker, so it holds across API processes; in-process otherwise.",
    )
    auth_failures_per_minute: int = Field(
        20,
        ge=0,
        description="Wrong API keys one client address may send per minute; after that many, its requests "
        "with a key get 429 too_many_failed_attempts until the minute ends (0: no limit). Counted like "
        "RATE_LIMIT_RPS; the address is the TCP peer's (behind a proxy, the proxy's unless uvicorn's "
        "FORWARDED_ALLOW_IPS names the proxy).",
    )
    quota_active_jobs: int = Field(
        20, ge=0, description="Queued + running jobs per tenant (429 job_quota_exceeded above; 0: no limit)."
    )
    quota_storage_bytes: int = Field(
        100 * 1024**3,
        ge=0,
        description="Uploads + artifacts stored per tenant (429 storage_quota_exceeded above; 0: no limit).",
    )
    quota_inspecting: int = Field(
        8,
        ge=0,
        description="Uploads per tenant waiting for or in inspection (429 inspection_quota_exceeded above; "
        "0: no limit).",
    )
    retention_days: float = Field(
        0, ge=0, description="Delete uploads and artifacts older than this many days (0: keep them)."
    )
    max_json_bytes: int = Field(1024**2, ge=1024, description="Largest body of a non-upload request (413).")

    max_upload_bytes: int = Field(2 * 1024**3, ge=1024, description="Largest accepted upload (413 above).")
    upload_chunk_bytes: int = Field(1024 * 1024, ge=4096)

    job_timeout_s: int = Field(3600, ge=10, le=24 * 3600, description="Default and upper bound per job.")
    inspect_timeout_s: int = Field(300, ge=10, description="Wall-clock limit for inspecting one upload.")
    broker_visibility_timeout_s: int = Field(
        6 * 3600, ge=60, description="Redis visibility timeout; task time limits stay below it."
    )
    broker_polling_interval_s: float = Field(0.1, gt=0, le=5, description="Embedded SQLite broker polling.")
    worker_concurrency: int = Field(1, ge=1, le=64)
    heartbeat_s: float = Field(
        2.0, gt=0, le=300, description="How often a running job renews its lease and looks for a cancel."
    )
    max_attempts: int = Field(
        3, ge=1, le=20, description="Claims of one job before it fails with worker_lost."
    )
    reaper_interval_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="How often each worker re-queues lost jobs and publishes its heartbeat.",
    )
    requeue_after_s: float = Field(
        120.0,
        gt=0,
        description="A job queued (or an upload inspecting) this long gets its message sent again.",
    )
    stale_temp_after_s: float = Field(
        3600.0,
        ge=600,
        description="The reaper deletes *.part files in DATA_DIR/tmp untouched this long (an API killed "
        "mid-upload leaves them; an upload in progress rewrites its own continuously).",
    )
    shutdown_grace_s: float = Field(
        60.0, ge=0, le=3600, description="On SIGTERM a worker lets its job run this long, then hands it back."
    )
    readiness_timeout_s: float = Field(2.0, gt=0, le=30)
    read_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="How long the API waits for a client: for a request's line and headers (the connection is "
        "closed), and for each chunk of a body being read (408 request_timeout).",
    )

    # The runner: the sandboxed child process that loads an uploaded model (0 switches a limit off).
    runner_memory_mb: int = Field(8192, ge=0, description="Address space; import torch alone needs ~640 MB.")
    runner_cpu_seconds: int = Field(14400, ge=0, description="CPU time, all threads together.")
    runner_max_processes: int = Field(1024, ge=0, description="Processes and threads of the runner's user.")
    runner_file_size_mb: int = Field(8192, ge=0, description="Largest file the runner may write.")
    runner_user: str = Field(
        "nobody", description="Unprivileged user for the runner when the worker is root."
    )
    runner_network: bool = Field(False, description="Let the runner reach the network (off: new namespace).")
    runner_landlock: bool = Field(True, description="Confine the runner's writes (and reads) with Landlock.")
    runner_confine_reads: bool = Field(True, description="Landlock also limits what the runner may read.")
    runner_pid_namespace: bool = Field(
        True,
        description="Each runner in a PID namespace of its own, with its own /proc: all of it dies with it.",
    )

    @field_validator("runner_memory_mb")
    @classmethod
    def _memory_floor(cls, value: int) -> int:
        if 0 < value < 1024:
            raise ValueError(
                "QAAS_RUNNER_MEMORY_MB below 1024 cannot run torch: use 1024 or more (0: no limit)"
            )
        return value

    @field_validator("storage_url")
    @classmethod
    def _s3_url(cls, value: str) -> str:
        if value and (not value.startswith("s3://") or not value[5:].split("/")[0]):
            raise ValueError(
                f"QAAS_STORAGE_URL {value!r} is not s3://bucket[/prefix]: name a bucket, or leave it empty "
                "for files under QAAS_DATA_DIR"
            )
        return value

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'qaas.sqlite'}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.data_dir / 'broker.sqlite'}"

    @property
    def work_dir(self) -> Path:
        return self.data_dir / "work"


@lru_cache
def get_settings() -> Settings:
    return Settings()
