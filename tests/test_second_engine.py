"""Two machines for real: an image pushed from the main engine is pulled by a second one.

The second engine (``second_engine.py``) is a separate dockerd with its own data root,
exec root, containerd and socket, started empty: what a fresh CI runner looks like.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import uuid
from pathlib import Path

import docker
import docker.errors
import pytest
from registry_setup import running_registry
from second_engine import (
    SecondEngineUnavailable,
    ensure_docker26,
    firewall_rules,
    second_engine,
    transfer_images,
)

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


@pytest.mark.parametrize("containerd_store", [False, True], ids=["26-classic", "26-containerd"])
def test_a_docker_26_engine_runs_beside_the_main_one_with_working_networks(
    engine: Engine, tmp_path: Path, containerd_store: bool
) -> None:
    main_chains = {rule for rule in firewall_rules() if "DOCKER" in rule and " -N " in rule}
    had_docker0 = DOCKER0.exists()
    try:
        with second_engine(
            tmp_path / "engine26", docker26=ensure_docker26(), containerd_store=containerd_store
        ) as second:
            assert second.version.startswith("26.1.5")
            env = dict(second.environ)
            ours = [rule for rule in firewall_rules() if second.bridge in rule]
            assert len(ours) == 3, ours
            buildx = subprocess.run(
                ["docker", "buildx", "version"], env=env, capture_output=True, text=True,
                check=True,
            )
            assert "0.13.1" in buildx.stdout
            transfer_images(os.environ, env, ["python:3.11-slim"])
            client = docker.DockerClient(base_url=second.base_url, timeout=120)
            try:
                assert second.environ["DOCKER_HOST"] != describe_main()
                driver = client.info()["DriverStatus"]
                assert any("containerd.snapshotter" in str(v) for _, v in driver) == (
                    containerd_store
                )
                network = client.networks.create("lk-net")
                subnet = ipaddress.IPv4Network(network.attrs["IPAM"]["Config"][0]["Subnet"])
                assert subnet.subnet_of(ipaddress.IPv4Network(second.address_block))
                server = client.containers.run(
                    "python:3.11-slim", ["python3", "-m", "http.server", "8000"],
                    name="lk-server", network="lk-net", detach=True,
                )
                # Bridged traffic passes the host's FORWARD chain (policy DROP): the
                # harness's rules are what lets one container reach the other by name.
                fetched = client.containers.run(
                    "python:3.11-slim",
                    ["python3", "-c", FETCH, "http://lk-server:8000/"],
                    network="lk-net", remove=True,
                )
                assert fetched.strip() == b"200"
                server.remove(force=True)
                network.remove()
            finally:
                client.close()
    except SecondEngineUnavailable as error:
        pytest.skip(str(error))
    assert not second.data_root.exists()
    assert not [rule for rule in firewall_rules() if second.bridge in rule]
    after = {rule for rule in firewall_rules() if "DOCKER" in rule and " -N " in rule}
    assert after == main_chains  # the main engine's chains were never flushed or deleted
    assert DOCKER0.exists() == had_docker0


FETCH = (
    "import sys, time, urllib.request\n"
    "for _ in range(50):\n"
    "    try:\n"
    "        print(urllib.request.urlopen(sys.argv[1], timeout=5).status); break\n"
    "    except OSError:\n"
    "        time.sleep(0.2)\n"
)


def describe_main() -> str:
    return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
