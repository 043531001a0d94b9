"""`make airflow`: Airflow standalone for this project with safe local defaults, each yielding to an
`AIRFLOW__SECTION__KEY` already set; see docs/orchestration.md."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from uservalue.errors import ConfigError
from uservalue.io import write_text
from uservalue.orchestration.airflow_tasks import DVC_POOL

ADMIN_USER = "admin"
DVC_POOL_DESCRIPTION = "DVC stages of the uservalue workspace: one at a time (DVC's repository lock)"


def airflow_home(project_dir: Path, environ: Mapping[str, str]) -> Path:
    return Path(environ.get("AIRFLOW_HOME") or project_dir / ".airflow").resolve()


def passwords_file(home: Path, environ: Mapping[str, str]) -> Path:
    return Path(environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE") or home / "passwords.json")


def standalone_env(project_dir: Path, port: int, host: str = "127.0.0.1",
                   environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment `airflow standalone` runs with: the project's defaults under the caller's settings."""
    environ = dict(os.environ if environ is None else environ)
    project_dir = project_dir.resolve()
    home = airflow_home(project_dir, environ)
    defaults = {
        "AIRFLOW__CORE__DAGS_FOLDER": str(project_dir / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file(home, environ)),
        "USERVALUE_PROJECT_DIR": str(project_dir),
        "DVC_NO_ANALYTICS": "1",
        "GX_ANALYTICS_ENABLED": "False",
    }
    env = {**defaults, **environ}
    # Where the API listens, and the URL tasks use to reach its execution API: the port asked for.
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__API__HOST": host,
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}",
    })
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # standalone spawns `airflow`
    return env


def ensure_admin_password(path: Path, user: str = ADMIN_USER) -> tuple[str, bool]:
    """The admin password from `path`, generating one (mode 600) if none is stored; (password, created)."""
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON ({error}); expected {{\"{user}\": \"<password>\"}}") from None
        if isinstance(stored, dict) and isinstance(stored.get(user), str) and stored[user]:
            return stored[user], False
        raise ConfigError(f"{path}: no password for user {user!r}; expected {{\"{user}\": \"<password>\"}}")
    password = secrets.token_urlsafe(18)
    write_text(path, json.dumps({user: password}), mode=0o600)
    return password, True


def _airflow(env: Mapping[str, str], *args: str) -> None:
    done = subprocess.run(["airflow", *args], check=False, env=dict(env), capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"`airflow {' '.join(args)}` failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def prepare(env: Mapping[str, str]) -> None:
    """Metadata database up to date and the DVC pool in place (idempotent)."""
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    _airflow(env, "db", "migrate")
    _airflow(env, "pools", "set", DVC_POOL, "1", DVC_POOL_DESCRIPTION)
