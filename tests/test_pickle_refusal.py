"""Weight files that would run code when unpickled are refused by both converters without
--trust_pickle, before anything is unpickled and without needing torch: one `error:` line, exit 2,
and the code never runs (the marker file it would create does not appear). Where torch is
installed, its weights_only loader is the second gate and is exercised too."""

import builtins
import importlib.util
import io
import os
import pickle
import shlex
import struct
import sys
import zipfile
from collections import OrderedDict

import pytest

from clip_jax import convert as clip_convert
from core_jax.errors import ConversionError
from core_jax.pickle_check import code_imports
from dalle_jax import convert_dvae

HAVE_TORCH = importlib.util.find_spec("torch") is not None


class _CreatesMarker:
    """Unpickling this calls os.system or builtins.open, and either creates `marker`."""

    def __init__(self, marker: str, how: str):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch {shlex.quote(self.marker)}",)
        return builtins.open, (self.marker, "w")


def _memo_trick(marker: str) -> bytes:
    """Protocol 4 by hand: 'posix' and 'system' reach STACK_GLOBAL from the memo (BINGET), after
    the stack was emptied, so a scanner that reads only the preceding strings would miss them."""

    def text(s):
        b = s.encode()
        return b"\x8c" + bytes([len(b)]) + b  # SHORT_BINUNICODE

    return (
        b"\x80\x04"
        + text("posix")
        + b"\x94"  # MEMOIZE -> 0
        + text("system")
        + b"\x94"  # MEMOIZE -> 1
        + b"00"  # POP, POP
        + b"h\x00h\x01"  # BINGET 0, BINGET 1
        + b"\x93"  # STACK_GLOBAL
        + text(f"touch {shlex.quote(marker)}")
        + b"\x85R."  # TUPLE1, REDUCE, STOP
    )


def _legacy_torch(payload) -> bytes:
    """torch.save's pre-zip layout: magic number, protocol, sys info, the object, storage keys."""
    parts = [0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, payload, []]
    return b"".join(pickle.dumps(p, protocol=2) for p in parts) + struct.pack("<q", 0) * 4


def _zip_torch(payload) -> bytes:
    """torch.save's zip layout: ARCHIVE/data.pkl next to ARCHIVE/version and the tensor data."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
        z.writestr("archive/version", "3\n")
        z.writestr("archive/data/0", b"\x00" * 16)
    return buf.getvalue()


def malicious_files(root, marker: str) -> dict[str, str]:
    """name -> path of a file that creates `marker` when unpickled, in each layout a converter
    might be given."""
    evil = {how: _CreatesMarker(marker, how) for how in ("system", "open")}
    contents = {
        "protocol2_system.pkl": pickle.dumps(evil["system"], protocol=2),
        "protocol5_open.pkl": pickle.dumps(evil["open"], protocol=5),
        "in_a_state_dict.pt": pickle.dumps(OrderedDict(w=[1.0], extra=evil["open"]), protocol=2),
        "memo_trick.pkl": _memo_trick(marker),
        "zip_archive.pt": _zip_torch({"state_dict": {"w": evil["system"]}}),
        "legacy_stream.pt": _legacy_torch(evil["open"]),
    }
    paths = {}
    for name, data in contents.items():
        paths[name] = str(root / name)
        with open(paths[name], "wb") as f:
            f.write(data)
    return paths


def test_the_files_really_run_code_when_unpickled(tmp_path):
    """The control: plain pickle runs them (so the refusals below are not vacuous)."""
    files = malicious_files(tmp_path, str(tmp_path / "control"))
    for name in ("protocol2_system.pkl", "protocol5_open.pkl", "memo_trick.pkl"):
        with open(files[name], "rb") as f:
            data = f.read()
        pickle.loads(data)
        assert os.path.exists(tmp_path / "control"), name
        os.remove(tmp_path / "control")


def _run(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("converter", ["convert_dvae", "clip_convert"])
def test_both_converters_refuse_code_without_trust_pickle_and_without_torch(
    tmp_path, converter, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails: refusal must not need it
    marker = tmp_path / "marker"
    files = malicious_files(tmp_path, str(marker))
    workdir = tmp_path / "workdir"
    for name, path in files.items():
        if converter == "convert_dvae":
            argv = ["--encoder", path, "--decoder", path, "--workdir", str(workdir)]
            code, err = _run(convert_dvae.main, argv, capsys)
        else:
            argv = ["--source", "open_clip", "--checkpoint", path, "--model", "ViT-B-32"]
            code, err = _run(clip_convert.main, argv + ["--workdir", str(workdir)], capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert "--trust_pickle" in lines[0] and path in lines[0] and "Traceback" not in err, (name, err)
        assert not marker.exists(), f"{name}: the pickle ran"
        assert not workdir.exists(), f"{name}: wrote the workdir"


def test_plain_state_dicts_name_no_code(tmp_path):
    """What torch.save writes for a state_dict names only OrderedDict, torch's tensor rebuilder and
    its storage classes: written here opcode by opcode (protocol 2, as torch.save), so it runs
    without torch, in the zip and the legacy layout."""
    state_dict = (
        b"\x80\x02ccollections\nOrderedDict\n)R"  # OrderedDict()
        b"X\x01\x00\x00\x00w"  # key "w"
        b"ctorch._utils\n_rebuild_tensor_v2\n(ctorch\nFloatStorage\nK\x00tR"  # its tensor
        b"s."  # SETITEM, STOP
    )
    path = tmp_path / "sd.pt"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", state_dict)
    path.write_bytes(buf.getvalue())
    assert code_imports(str(path)) == []
    path.write_bytes(_legacy_torch(OrderedDict(a=1)))
    assert code_imports(str(path)) == []
    path.write_bytes(state_dict.replace(b"torch._utils\n", b"torch._utils\nos.", 1))  # a dotted name
    assert code_imports(str(path)) == ["torch._utils.os._rebuild_tensor_v2"]


def test_a_file_that_is_no_weight_file_is_one_clear_error(tmp_path):
    path = tmp_path / "notes.bin"
    path.write_bytes(b"\xffhello, not a pickle")
    with pytest.raises(ConversionError, match="neither a zip archive nor a pickle"):
        code_imports(str(path))


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed (optional extra)")
def test_torch_weights_only_is_the_second_gate(tmp_path, capsys):
    """A pickle that names only torch callables passes the opcode check; torch's weights_only
    loader must then refuse the one that is not a tensor rebuilder (torch.save, which would
    write the marker), and a real state_dict loads without --trust_pickle."""
    import torch

    marker = tmp_path / "marker"

    class SavesMarker:
        def __reduce__(self):
            return torch.save, ({}, str(marker))

    path = tmp_path / "torch_call.pt"
    torch.save({"w": torch.zeros(2), "x": SavesMarker()}, path)
    assert code_imports(str(path)) == []
    for main, argv in (
        (convert_dvae.main, ["--encoder", str(path), "--decoder", str(path)]),
        (clip_convert.main, ["--source", "open_clip", "--checkpoint", str(path), "--model", "ViT-B-32"]),
    ):
        code, err = _run(main, argv + ["--workdir", str(tmp_path / "w")], capsys)
        assert code == 2 and err.strip().startswith("error: ") and "--trust_pickle" in err, err
        assert not marker.exists()
    torch.save({"w": torch.ones(3)}, tmp_path / "sd.pt")
    assert convert_dvae.load_weights(str(tmp_path / "sd.pt"))["w"].tolist() == [1.0, 1.0, 1.0]
