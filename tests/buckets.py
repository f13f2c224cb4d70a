"""Local bucket servers for tests: a GCS emulator (gcp-storage-emulator, in memory) and an S3
server (moto's server mode), each on a free loopback port, with the environment variables that
point gcsfs / s3fs and tensorstore (orbax's array I/O) at them. Sub-processes inherit them."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_env(monkeypatch, values: dict) -> None:
    for key, value in values.items():
        monkeypatch.setenv(key, value)


def _drop_cached_filesystems() -> None:
    # fsspec keeps one filesystem per protocol and options; a test's server is not the next one's.
    import fsspec

    for cls in (fsspec.get_filesystem_class("gs"), fsspec.get_filesystem_class("s3")):
        cls.clear_instance_cache()


def _send_generation_on_download() -> None:
    """The emulator leaves out the x-goog-generation header of a download, which real GCS sends and
    tensorstore reads to update an OCDBT manifest (orbax's checkpoints) in place; add it."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    download = objects.download
    if getattr(download, "sends_generation", False):
        return

    def with_generation(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
        except Exception:  # a missing object: the handler answers 404 itself
            pass
        return download(request, response, storage, *args, **kwargs)

    with_generation.sends_generation = True
    objects.download = with_generation  # objects.get calls it by name for alt=media
    for _, methods in server.HANDLERS:
        for method, handler in list(methods.items()):
            if handler is download:
                methods[method] = with_generation


@contextlib.contextmanager
def gcs_emulator(monkeypatch_module, buckets=("bucket",)):
    """Yields the emulator's URL with `buckets` created through its JSON API."""
    from gcp_storage_emulator.server import create_server

    _send_generation_on_download()
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    # Quiet: it logs every lookup of a missing object (how orbax and gcsfs probe) as an error, and
    # prints a traceback whenever a client drops a kept-alive connection.
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    server._api._httpd.handle_error = lambda request, client_address: None
    url = f"http://127.0.0.1:{port}"
    try:
        for name in buckets:
            request = urllib.request.Request(
                f"{url}/storage/v1/b?project=test",
                data=json.dumps({"name": name}).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            urllib.request.urlopen(request, timeout=10).read()
        # gcsfs reads STORAGE_EMULATOR_HOST; tensorstore's gcs driver (orbax) its own variable.
        _set_env(
            monkeypatch_module,
            {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_CLOUD_PROJECT": "test"},
        )
        _drop_cached_filesystems()
        yield url
    finally:
        server.stop()
        _drop_cached_filesystems()


@contextlib.contextmanager
def s3_server(monkeypatch_module, buckets=("bucket",)):
    """Yields moto's S3 server URL with `buckets` created; dummy credentials and a region."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _set_env(
            monkeypatch_module,
            {
                "AWS_ENDPOINT_URL": url,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_REGION": "us-east-1",
            },
        )
        _drop_cached_filesystems()
        import s3fs

        fs = s3fs.S3FileSystem()
        for name in buckets:
            fs.mkdir(name)
        yield url
    finally:
        server.stop()
        _drop_cached_filesystems()


def local_files(root) -> list[str]:
    """Every file under `root`, relative to it, sorted."""
    found = []
    for folder, _, files in os.walk(root):
        found += [os.path.relpath(os.path.join(folder, f), root) for f in files]
    return sorted(found)
