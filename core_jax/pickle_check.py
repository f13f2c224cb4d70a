"""What a PyTorch weight file's pickles would import, read without unpickling anything.

Unpickling runs whatever callables a pickle names, so a weight file from elsewhere is checked
before torch (or pickle) ever loads it: `pickletools.genops` lists the opcodes as data, and every
GLOBAL / STACK_GLOBAL / INST names a callable the unpickler would import. A plain state_dict names
only torch's tensor rebuilders and storages and a few containers; anything else (a pickled module,
`os.system`, `builtins.open`) is code, and the converters refuse it unless --trust_pickle. Torch's
own `weights_only=True` loader stays the second gate where torch is installed; this one needs no
torch, so the refusal never depends on it.
"""

from __future__ import annotations

import pickletools
import zipfile

from core_jax.errors import ConversionError

# Outside torch's namespace, the callables plain state_dicts and training checkpoints name (torch's
# weights_only loader allows these too).
_PLAIN = frozenset(
    {
        "collections.OrderedDict",
        "collections.Counter",
        "_codecs.encode",
        "builtins.set",
        "builtins.frozenset",
        "builtins.bytearray",
        "builtins.complex",
    }
)
# torch.save's legacy (pre-zip) format is five pickles in a row, then raw storage bytes.
_LEGACY_PICKLES = 5
_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
)
_NO_STACK_EFFECT = frozenset({"PROTO", "FRAME"})


def _read_imports(f, found: list) -> None:
    """Appends (module, name) for every callable one pickle stream imports ((None, None) where
    STACK_GLOBAL's operands are not plain strings pushed just before it) as it reads, so a stream
    that breaks off still reports what came before. Tracks only the strings on top of the stack and
    in the memo: any other opcode pushes an unknown, so a name is only read off operands that
    really are the top two stack entries."""
    pushed, memo = [], {}
    for op, arg, _ in pickletools.genops(f):
        name = op.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            found.append((module, attr))
            pushed.append(None)
        elif name == "STACK_GLOBAL":
            module, attr = pushed[-2:] if len(pushed) >= 2 else (None, None)
            plain = isinstance(module, str) and isinstance(attr, str)
            found.append((module, attr) if plain else (None, None))
            pushed.append(None)
        elif name in _STRING_OPS:
            pushed.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif name not in _NO_STACK_EFFECT:
            pushed.append(None)


def pickle_imports(path: str) -> list[tuple]:
    """(module, name) of every callable the pickles of a torch weight file (a zip archive, the
    legacy stream or a plain pickle) import, in order; (None, None) for one that cannot be told
    without running the pickle. A ConversionError when the file is neither a zip nor a pickle."""
    found = []
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for member in z.namelist():
                if member.endswith(".pkl"):
                    with z.open(member) as f:
                        try:
                            _read_imports(f, found)
                        except Exception as e:  # noqa: BLE001  (any parse failure: not a pickle)
                            raise ConversionError(
                                f"{path}: {member} is not a readable pickle ({e})"
                            ) from None
        return found
    with open(path, "rb") as f:
        for k in range(_LEGACY_PICKLES):
            start, before = f.tell(), len(found)
            try:
                _read_imports(f, found)
            except Exception:  # noqa: BLE001  (past the pickles: raw storage bytes, or the end)
                if k == 0 and len(found) == before and f.tell() - start <= 1:
                    raise ConversionError(
                        f"{path} is not a weight file this converter reads: neither a zip archive "
                        "nor a pickle (nor .npz / .safetensors by its name)"
                    ) from None
                break
    return found


def code_imports(path: str) -> list[str]:
    """The callables a weight file's pickles import beyond a plain state_dict's, as sorted
    'module.name' strings ('?' for one that cannot be told): empty for tensors in plain
    containers; anything else would run code when loaded."""
    unsafe = set()
    for module, attr in pickle_imports(path):
        if module is None:
            unsafe.add("?")
            continue
        in_torch = (module == "torch" or module.startswith("torch.")) and "." not in attr
        if f"{module}.{attr}" not in _PLAIN and not in_torch:
            unsafe.add(f"{module}.{attr}")
    return sorted(unsafe)


def refuse_code(path: str, trust_pickle: bool, hint: str = "") -> None:
    """A ConversionError, before anything is unpickled, when `path` pickles code and the user did
    not pass --trust_pickle; `hint` ends the message (where trusted files of this kind come from)."""
    names = code_imports(path)
    if names and not trust_pickle:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise ConversionError(
            f"{path} is not a plain state_dict: its pickle imports {shown}, so loading it would run "
            f"code from the file. Pass --trust_pickle only if you trust where it came from{hint}"
        )
