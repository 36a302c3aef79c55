"""Two machines for real: an image pushed from the main engine is pulled by a second one.

The second engine (``second_engine.py``) is a separate dockerd with its own data root,
exec root, containerd and socket, started empty: what a fresh CI runner looks like.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

import docker
import docker.errors
import pytest
from registry_setup import running_registry
from second_engine import SecondEngineUnavailable, second_engine

from layerkeep.core.engine import Engine, checked_stream

pytestmark = pytest.mark.docker

BASE = "debian:bookworm-slim"
# dockerd --bridge=none deletes the host's docker0; the second engine must leave it alone.
DOCKER0 = Path("/sys/class/net/docker0")


def test_image_pushed_by_the_main_engine_is_pulled_and_run_by_a_second_one(
    engine: Engine, tmp_path: Path
) -> None:
    name = f"layerkeep-test/{uuid.uuid4().hex[:10]}"
    base_id = engine.image_id(BASE)
    assert base_id is not None
    had_docker0 = DOCKER0.exists()
    tagged = ""
    try:
        with (
            running_registry(tmp_path / "registry") as registry,
            second_engine(tmp_path / "engine2") as second,
        ):
            assert DOCKER0.exists() == had_docker0
            assert Path(f"/sys/class/net/{second.bridge}").exists()
            repository = f"{registry.address}/{name}"
            assert engine.api.tag(BASE, repository, "1")
            tagged = f"{repository}:1"
            pushed = engine.api.push(repository, tag="1", stream=True, decode=True)
            for _ in checked_stream(pushed, action="push", image=f"{repository}:1"):
                pass
            digest = registry.digest_of(name, "1")
            assert digest is not None

            client = docker.DockerClient(base_url=second.base_url, timeout=120)
            try:
                assert client.images.list(all=True) == []
                assert client.containers.list(all=True) == []
                pulled = client.images.pull(repository, tag="1")
                assert pulled.id == base_id
                assert f"{repository}@{digest}" in pulled.attrs["RepoDigests"]
                # The second engine's bridge has no way out anyway: run with no network.
                output = client.containers.run(
                    f"{repository}:1", ["echo", "ok"], network_mode="none", remove=True
                )
                assert output == b"ok\n"
                assert client.containers.list(all=True) == []
            finally:
                client.close()
    except SecondEngineUnavailable as error:
        pytest.skip(str(error))
    finally:
        if tagged:
            with contextlib.suppress(docker.errors.ImageNotFound):
                engine.api.remove_image(tagged)
    assert engine.image_id(tagged) is None
    assert engine.image_id(BASE) == base_id
    assert second.stopped_in is not None
    assert not second.killed
    assert not second.data_root.exists()
    assert not second.exec_root.exists()
    assert not Path(f"/sys/class/net/{second.bridge}").exists()
    assert DOCKER0.exists() == had_docker0
    print(
        f"second engine: started in {second.started_in:.2f} s, "
        f"stopped in {second.stopped_in:.2f} s, leftovers removed: {second.leftovers}"
    )
