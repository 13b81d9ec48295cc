"""What a configuration reload changes: live sections applied at once, the rest kept until a restart.

`backends`, `auth`, `routing`, `adapters`, `rate_limits`, `media` and `cors` are applied to a running gateway without
dropping a connection (`Gateway.reload`): an unchanged backend keeps its connections, health, load and
circuits; a new or changed one is health-checked before it takes traffic; a removed or replaced one
finishes what it has in flight and then closes. The other sections (`server`, `timeouts`, `limits`,
`health`, `breaker`, `logging`, `database`, `redis`, `discovery`, …) and `auth.key_secret` shape sockets, timers,
connections and stored hashes, so a change to them is reported as needing a restart and the running
values stay.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sluice.config import SluiceConfig
from sluice.config_loader import ConfigError, load_config
from sluice.errors import InvalidRequest

RESTART_ONLY = (
    "server", "timeouts", "limits", "health", "breaker", "logging", "database", "redis", "cache", "repair", "tracing",
    "discovery", "console",
)  # fmt: skip


class InvalidConfig(InvalidRequest):
    code = "invalid_config"


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    config: SluiceConfig  # the new live sections with the running restart-only ones
    kept: tuple[str, ...]  # backend names
    added: tuple[str, ...]
    changed: tuple[str, ...]
    removed: tuple[str, ...]
    restart_required: tuple[str, ...]  # sections whose change waits for a restart

    def summary(self) -> dict[str, object]:
        return {
            "status": "reloaded",
            "backends": {
                "kept": list(self.kept), "added": list(self.added),
                "changed": list(self.changed), "removed": list(self.removed),
            },
            "api_keys": len(self.config.auth.api_keys),
            "adapters": len(self.config.adapters.registry),
            "restart_required": list(self.restart_required),
        }  # fmt: skip


def plan_reload(running: SluiceConfig, new: SluiceConfig) -> ReloadPlan:
    restart = tuple(name for name in RESTART_ONLY if getattr(running, name) != getattr(new, name))
    kept = {name: getattr(running, name) for name in RESTART_ONLY}
    if new.auth.key_secret != running.auth.key_secret:  # every stored key hash depends on it
        restart += ("auth.key_secret",)
        kept["auth"] = new.auth.model_copy(update={"key_secret": running.auth.key_secret})
    effective = new.model_copy(update=kept)
    before = {b.name: b for b in running.backends}
    after = {b.name: b for b in new.backends}
    return ReloadPlan(
        config=effective,
        kept=tuple(name for name, b in after.items() if before.get(name) == b),
        added=tuple(name for name in after if name not in before),
        changed=tuple(name for name, b in after.items() if name in before and before[name] != b),
        removed=tuple(name for name in before if name not in after),
        restart_required=restart,
    )


def read_config(path: Path | None) -> SluiceConfig:
    """The configuration file again, or a 4xx error saying why it cannot be used."""
    if path is None:
        raise InvalidConfig("This gateway was not started from a configuration file, so there is nothing to reload.")
    try:
        return load_config(path)
    except ConfigError as exc:
        raise InvalidConfig(f"The configuration was not reloaded; the running one stays. {exc}") from None
    except OSError as exc:
        raise InvalidConfig(f"Cannot read {path}: {exc.strerror or exc}; the running configuration stays.") from None
