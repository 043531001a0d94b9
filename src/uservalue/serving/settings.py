"""The service's settings: params.yaml section `serve`, each field overridden by its USERVALUE_* variable."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from uservalue.config import ServeParams, load_params
from uservalue.errors import ConfigError
from uservalue.serving.store import OnlineStore, open_store, store_url

ENV_PREFIX = "USERVALUE_"


def project_dir() -> Path:
    """USERVALUE_PROJECT_DIR, else the working directory."""
    return Path(os.environ.get(f"{ENV_PREFIX}PROJECT_DIR", ".")).resolve()


def params_file() -> Path:
    """USERVALUE_PARAMS, else the project's params.yaml."""
    return Path(os.environ.get(f"{ENV_PREFIX}PARAMS", project_dir() / "params.yaml"))


class ParamsSection(PydanticBaseSettingsSource):
    """The `serve` section of the params file (validated as a whole by load_params), if there is one."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self()[field_name], field_name, False

    def __call__(self) -> dict[str, Any]:
        path = params_file()
        return load_params(path).serve.model_dump() if path.is_file() else {}


class ServeSettings(BaseSettings, ServeParams):
    """The params file's ServeParams, each field overridden by USERVALUE_<FIELD>."""

    # extra="ignore": log_dir has two names, and pydantic counts the unused one as an extra input (the
    # params file's typos are caught by load_params, and the environment only yields known fields).
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_prefix_target="all", env_ignore_empty=True,
                                      extra="ignore")

    # USERVALUE_PREDICTION_LOG_DIR: the name deployments already use (USERVALUE_LOG_DIR works too).
    log_dir: Path = Field(Path(ServeParams.model_fields["log_dir"].default),
                          validation_alias=AliasChoices("prediction_log_dir", "log_dir"),
                          description=ServeParams.model_fields["log_dir"].description)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, **_: Any) -> tuple[Any, ...]:
        return init_settings, env_settings, ParamsSection(settings_cls)


def serve_settings() -> ServeSettings:
    """The service's settings, with relative log folders resolved against the project."""
    try:
        settings = ServeSettings()
    except ValidationError as error:
        variables = sorted({f"{ENV_PREFIX}{str(e['loc'][0]).upper()}" for e in error.errors()})
        raise ConfigError(f"serve settings ({params_file()} section serve, env {', '.join(variables)}): {error}") from None
    return settings.model_copy(update={"log_dir": project_dir() / settings.log_dir,
                                       "event_log_dir": str(project_dir() / settings.event_log_dir)})


def open_configured_store(settings: ServeSettings) -> OnlineStore:
    """The online store: USERVALUE_STORE_URL, else serve.store.url (a relative SQLite path is the project's)."""
    return open_store(store_url(settings.store.url), root=project_dir(), namespace=settings.store.namespace)


PARENT_POLL_SECONDS = 1.0
STOP_GRACE_SECONDS = 30.0


def exit_with_parent(poll_seconds: float = PARENT_POLL_SECONDS) -> threading.Thread:
    """Stop this process (SIGTERM to itself: a graceful stop that flushes the logs) once its parent is
    gone. BentoML starts its worker in a process group of its own, so `kill -9` of the server's group
    (or of `make serve`) would leave the worker alive, adopted by PID 1 and holding the port. A thread
    watches the parent's pid (PR_SET_PDEATHSIG is not used: it fires when the parent *thread* that
    spawned the worker ends, which BentoML's arbiter does not promise to keep). If the graceful stop
    hangs, the process exits after STOP_GRACE_SECONDS."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        logging.getLogger(__name__).warning("parent process %d is gone: stopping this worker (pid %d)",
                                            parent, os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(STOP_GRACE_SECONDS)
        os._exit(1)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread
