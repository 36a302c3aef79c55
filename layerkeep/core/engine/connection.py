"""What each group of the Engine's calls stands on: a docker-py client and its labels."""

from __future__ import annotations

from collections.abc import Mapping

import docker

from layerkeep.core.closing import Closing


class Connection(Closing):
    """A docker-py client, and the labels stamped on what is created through it."""

    client: docker.DockerClient
    labels: Mapping[str, str]

    @property
    def api(self) -> docker.APIClient:
        """The low-level client, for tests only: layerkeep's modules call the Engine's
        methods."""
        return self.client.api

    def close(self) -> None:
        """Release the client's connections."""
        self.client.close()
