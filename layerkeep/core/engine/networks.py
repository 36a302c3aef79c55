"""The engine's user-defined networks, labelled like every container on them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from layerkeep.core.engine.connection import Connection
from layerkeep.core.engine.translation import translated
from layerkeep.core.errors import ResourceConflict, ResourceNotFound


class NetworkCalls(Connection):
    """The Engine's calls on networks."""

    def ensure_network(self, name: str, *, labels: Mapping[str, str] | None = None) -> str:
        """The id of a user-defined bridge network ``name``, created (labelled) if missing."""
        found = self.find_network(name)
        if found is not None:
            return str(found["Id"])
        try:
            with translated(f"create network {name}", resource=name):
                created = self.api.create_network(
                    name, driver="bridge", labels={**self.labels, **(labels or {})},
                    check_duplicate=True,
                )
        except ResourceConflict:
            # Created by someone else since we looked.
            found = self.find_network(name)
            if found is None:
                raise
            return str(found["Id"])
        return str(created["Id"])

    def find_network(self, name: str) -> dict[str, Any] | None:
        """The network named exactly ``name`` (the engine's filter also matches parts)."""
        with translated(f"list networks named {name}", resource=name):
            networks = self.api.networks(names=[name])
        return next((dict(n) for n in networks if n["Name"] == name), None)

    def inspect_network(self, network: str) -> dict[str, Any] | None:
        """A network's inspect record, or None when it does not exist."""
        try:
            with translated(f"inspect network {network}", resource=network):
                return dict(self.api.inspect_network(network))
        except ResourceNotFound:
            return None

    def list_networks(self, labels: Sequence[str]) -> list[dict[str, Any]]:
        """Networks carrying every label in ``labels`` (``key`` or ``key=value``)."""
        with translated("list networks"):
            return [dict(n) for n in self.api.networks(filters={"label": list(labels)})]

    def remove_network(self, network: str) -> bool:
        """Remove a network; False when it was already gone."""
        try:
            with translated(
                f"remove network {network}", resource=network,
                hint=f"disconnect what still uses it (docker network inspect {network})",
            ):
                self.api.remove_network(network)
        except ResourceNotFound:
            return False
        return True
