import pytest

from parallelism.local_world import LocalWorld


@pytest.fixture(scope="session")
def gloo_world():
    """Returns a function W -> LocalWorld(W); each world starts once per session.

    Every world's processes are stopped by PID when the session ends.
    """
    worlds: dict[int, LocalWorld] = {}

    def get(world_size: int) -> LocalWorld:
        if world_size not in worlds:
            worlds[world_size] = LocalWorld(world_size, timeout_s=120).__enter__()
        return worlds[world_size]

    yield get
    for w in worlds.values():
        w.close()
