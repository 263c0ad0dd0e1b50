"""Weight files: reading ``.safetensors`` and PyTorch / TorchRL checkpoints, writing ``.safetensors``.

Reading is safe by construction: ``.safetensors`` holds only raw tensors, and
PyTorch files are read with ``torch.load(weights_only=True)``, which refuses
any Python object beyond tensors and plain containers. Writing is atomic:
a temporary file in the target's folder, renamed over the target.

>>> tensors = read_weights_file("policy.safetensors")  # doctest: +SKIP
>>> sorted(tensors)[:2]  # doctest: +SKIP
['actor.b', 'actor.w']
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import RedisBusError
from .progress import Progress
from .wire import Manifest, TensorEntry, format_key

__all__ = ["SAFETENSORS_DTYPES", "TORCH_SUFFIXES", "FileFormatError", "read_weights_file", "write_safetensors"]

#: File suffixes read with ``torch.load(weights_only=True)``.
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
#: torch dtype -> safetensors dtype name (complex128 has no safetensors spelling).
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _torch_name, _st_name in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
):
    if hasattr(torch, _torch_name):
        SAFETENSORS_DTYPES[getattr(torch, _torch_name)] = _st_name


class FileFormatError(RedisBusError, ValueError):
    """A file to import or export is unreadable, refused as unsafe, or cannot hold these tensors."""


def _flatten_tree(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if not isinstance(tree, Mapping):
        what = f"entry {prefix!r} is not a tensor" if prefix else "the file holds neither a tensor nor a mapping of tensors"
        raise FileFormatError(
            f"{what} ({type(tree).__name__}); use --select to pick the state dict inside a checkpoint"
        )
    out: dict[str, torch.Tensor] = {}
    for name, value in tree.items():
        if not isinstance(name, str):
            raise FileFormatError(f"key {name!r} under {prefix or 'the top level'} is not a string")
        out.update(_flatten_tree(value, f"{prefix}.{name}" if prefix else name))
    return out


def read_weights_file(path: str | os.PathLike[str], select: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a PyTorch / TorchRL checkpoint.

    ``.safetensors`` is the safe format: it holds only raw tensors. ``.pt``,
    ``.pth``, ``.ckpt`` and ``.bin`` are read with
    ``torch.load(weights_only=True)``, PyTorch's restricted unpickler that
    builds only tensors and plain containers and refuses every other Python
    object; files that need more are refused, never unpickled freely.

    Args:
        path: the file.
        select: dotted path of the state dict inside the file (``model``,
            ``state_dict``, ``policy.module``); default the whole file.

    Returns:
        Dotted tensor names -> CPU tensors.

    Raises:
        FileFormatError: unknown suffix, unreadable or refused file, a leaf
            that is not a tensor, or a ``select`` path that is not there.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError as exc:  # pragma: no cover - declared in the safetensors extra
                raise FileFormatError("reading .safetensors needs the safetensors package: pip install 'redisbus[safetensors]'") from exc
            tree: Any = load_file(str(path), device="cpu")
        elif suffix in TORCH_SUFFIXES:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pickle-protocol chatter; refusals still raise
                tree = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise FileFormatError(
                f"{path.name}: unknown file type {suffix or '(no suffix)'!r}; expected .safetensors "
                f"or a PyTorch state dict ({', '.join(TORCH_SUFFIXES)})"
            )
    except FileFormatError:
        raise
    except OSError as exc:
        raise FileFormatError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # safetensors' and torch's parse errors have no common base class
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            text = "it needs Python objects beyond torch.load(weights_only=True)'s allow-list; convert it to safetensors"
        raise FileFormatError(f"cannot load {path.name}: {text}") from exc
    if select:
        for part in select.split("."):
            if not isinstance(tree, Mapping) or part not in tree:
                have = sorted(str(k) for k in tree)[:10] if isinstance(tree, Mapping) else []
                raise FileFormatError(f"{path.name} has no entry {select!r} (top-level keys: {have})")
            tree = tree[part]
    flat = _flatten_tree(tree)
    if not flat:
        raise FileFormatError(f"{path.name} holds no tensors")
    return flat


def _safetensors_header(
    manifest: Manifest, metadata: Mapping[str, str]
) -> tuple[bytes, list[tuple[str, TensorEntry]]]:
    names: dict[str, TensorEntry] = {}
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for entry in manifest.tensors:
        name = format_key(entry.key)
        if name in names:
            raise FileFormatError(f"two tensors are both named {name!r} once their key parts are joined with '.'")
        st_dtype = SAFETENSORS_DTYPES.get(entry.torch_dtype)
        if st_dtype is None:
            raise FileFormatError(f"tensor {name!r} has dtype {entry.dtype}, which safetensors cannot store")
        names[name] = entry
        header[name] = {"dtype": st_dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw, list(names.items())


def write_safetensors(
    path: str | os.PathLike[str], manifest: Manifest, blob: memoryview, metadata: Mapping[str, str], progress: Progress
) -> Path:
    """Write the tensors of ``manifest`` (their bytes in ``blob``) to a ``.safetensors`` file, atomically.

    Tensor names are the key parts joined with ``.``. The file gets the
    mode ``open()`` would give it (the umask's), not a temporary file's.

    Args:
        path: the file; replaced whole, never left half written.
        manifest: describes the tensors; ``blob`` holds the version's bytes.
        metadata: the file's ``__metadata__`` (strings only, as safetensors requires).
        progress: receives the bytes written.

    Returns:
        The path written.

    Raises:
        FileFormatError: a dtype safetensors cannot store (complex128), two
            keys that collide once joined, or the file cannot be written.
    """
    header, entries = _safetensors_header(manifest, metadata)
    target = Path(path)
    progress.start(f"writing {target.name}", manifest.total_bytes)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=str(target.parent or "."))
    except OSError as exc:
        raise FileFormatError(f"cannot write {target}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            for _, entry in entries:
                out.write(blob[entry.offset : entry.offset + entry.nbytes])
                progress.advance(entry.nbytes)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # what open() would have made, not mkstemp's 0600
        os.replace(tmp, target)
    except OSError as exc:
        raise FileFormatError(f"cannot write {target}: {exc.strerror or exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
