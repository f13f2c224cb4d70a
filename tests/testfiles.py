"""Files the tests write or read: encoded images, tar shards (img2dataset layout), config files."""
import importlib.util
import io
import os
import tarfile

from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def encode_image(arr, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path, items):
    """A tar shard of (member name, bytes) in the given order."""
    with tarfile.open(path, "w") as tar:
        for name, payload in items:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def load_config(name: str, arg=None):
    """configs/<name>.py's get_config(arg), loaded the way config_flags loads a config file."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
