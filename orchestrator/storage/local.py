"""A local (or shared, mounted) folder: one-machine runs, or a file system every node mounts."""

from __future__ import annotations

import os

from ..errors import InputError


class LocalBackend:
    name = "local"

    def handles(self, uri: str) -> bool:
        return uri.startswith("/")

    def check_uri(self, uri: str) -> str | None:
        return None

    def filesystem(self, uri: str, *, endpoint_url: str | None = None, retries: int = 10):
        from fsspec.implementations.local import LocalFileSystem

        # As on an object store, writing a file makes its folders: a new run's first
        # write (its lease) goes to <uri>/<name>/, which nothing has made yet.
        return LocalFileSystem(auto_mkdir=True), os.path.abspath(uri)

    def worker_env(self, storage) -> dict[str, str]:
        return {}

    def for_ray(self, uri: str, storage):
        return uri, None

    def check_reachable(self, uri: str, storage) -> None:
        parent = uri
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK):
            raise InputError(f"storage.uri: {uri} cannot be written ({parent} is not writable)")
