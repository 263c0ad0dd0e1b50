"""Turning user weights into an ordered list of keyed tensors, and checking a target against a manifest.

Keys are tuples of strings. A TensorDict's nested keys are used as they are;
an ``nn.Module`` is read through ``TensorDict.from_module`` (parameters and
buffers, sharing storage); a ``Mapping[str, Tensor]`` such as a state dict has
its dotted names split, so a state dict published applies to a module target
and the other way round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import torch
from tensordict import TensorDict, TensorDictBase, is_non_tensor, is_tensor_collection

from .errors import SchemaMismatchError
from .wire import _MAX_KEY_DEPTH, _MAX_KEY_PART_BYTES, Manifest, TensorEntry, TensorKey, format_key

__all__ = ["Weights", "Target", "flatten_weights", "target_leaves", "match_target"]

#: What ``publish`` accepts.
Weights = Union[TensorDictBase, torch.nn.Module, Mapping[str, Any]]
#: What a subscriber applies to.
Target = Union[TensorDictBase, torch.nn.Module]


def _leaves_of_tensordict(td: TensorDictBase, prefix: TensorKey = ()) -> list[tuple[TensorKey, torch.Tensor]]:
    # A walk of our own: tensordict's nested iteration costs twice as much, and a worker walks its target per version.
    # Non-tensor data (strings, objects) counts as a leaf here, so it is refused rather than silently skipped.
    leaves = []
    for name, value in td.items():
        key = (*prefix, name)
        if isinstance(value, torch.Tensor):
            leaves.append((key, value))
        elif is_non_tensor(value):
            raise SchemaMismatchError(f"key {format_key(key)!r} holds non-tensor data, not a tensor")
        elif is_tensor_collection(value):
            leaves.extend(_leaves_of_tensordict(value, key))
        else:
            raise SchemaMismatchError(f"key {format_key(key)!r} holds a {type(value).__name__}, not a tensor")
    return leaves


def _leaves_of_mapping(mapping: Mapping[str, Any], prefix: TensorKey = ()) -> list[tuple[TensorKey, torch.Tensor]]:
    leaves: list[tuple[TensorKey, torch.Tensor]] = []
    for name, value in mapping.items():
        if not isinstance(name, str):
            raise SchemaMismatchError(f"weights key {name!r} is not a string")
        key = prefix + tuple(name.split("."))
        if isinstance(value, torch.Tensor):
            leaves.append((key, value))
        elif isinstance(value, Mapping):
            leaves.extend(_leaves_of_mapping(value, key))
        else:
            raise SchemaMismatchError(f"key {format_key(key)!r} holds a {type(value).__name__}, not a tensor")
    return leaves


def flatten_weights(weights: Weights) -> list[tuple[TensorKey, torch.Tensor]]:
    """Ordered ``(key, tensor)`` leaves of a TensorDict, module or mapping.

    Raises:
        SchemaMismatchError: a leaf that is not a dense tensor, an empty key part, or a duplicate key.
        TypeError: ``weights`` is none of the accepted kinds.

    Example:
        >>> flatten_weights({"0.weight": torch.zeros(2)})[0][0]
        ('0', 'weight')
    """
    if isinstance(weights, TensorDictBase):
        leaves = _leaves_of_tensordict(weights)
    elif isinstance(weights, torch.nn.Module):
        leaves = _leaves_of_tensordict(TensorDict.from_module(weights))
    elif isinstance(weights, Mapping):
        leaves = _leaves_of_mapping(weights)
    else:
        raise TypeError(f"weights must be a TensorDictBase, an nn.Module or a Mapping, not {type(weights).__name__}")
    seen: set[TensorKey] = set()
    for key, tensor in leaves:
        # What the manifest decoder would refuse must be refused here, before a version is published.
        if not key or len(key) > _MAX_KEY_DEPTH or not all(0 < len(part) <= _MAX_KEY_PART_BYTES for part in key):
            raise SchemaMismatchError(
                f"key {format_key(key)!r} must have 1-{_MAX_KEY_DEPTH} non-empty parts of at most "
                f"{_MAX_KEY_PART_BYTES} characters"
            )
        if tensor.layout != torch.strided:
            raise SchemaMismatchError(f"key {format_key(key)!r} holds a {tensor.layout} tensor; only dense tensors travel")
        if key in seen:
            raise SchemaMismatchError(f"weights name tensor {format_key(key)!r} twice")
        seen.add(key)
    return leaves


def target_leaves(target: Target) -> dict[TensorKey, torch.Tensor]:
    """The target's leaves, keyed; writing into them changes the target in place."""
    if isinstance(target, (TensorDictBase, torch.nn.Module)):
        return dict(flatten_weights(target))
    raise TypeError(f"target must be a TensorDictBase or an nn.Module, not {type(target).__name__}")


def match_target(manifest: Manifest, leaves: Mapping[TensorKey, torch.Tensor]) -> list[tuple[TensorEntry, torch.Tensor]]:
    """Pair every manifest entry with its target tensor, or explain the mismatch.

    Raises:
        SchemaMismatchError: missing or unexpected keys, or a shape or dtype that differs.
    """
    published = {t.key: t for t in manifest.tensors}
    missing = sorted(format_key(k) for k in leaves.keys() - published.keys())
    extra = sorted(format_key(k) for k in published.keys() - leaves.keys())
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"target keys not in the version: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if extra:
            parts.append(f"version keys not in the target: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
        raise SchemaMismatchError(f"version {manifest.version} does not match the target: " + "; ".join(parts))
    pairs = []
    for entry in manifest.tensors:
        dst = leaves[entry.key]
        if tuple(dst.shape) != entry.shape:
            raise SchemaMismatchError(
                f"version {manifest.version}: tensor {format_key(entry.key)!r} has shape {list(entry.shape)}, "
                f"the target has {list(dst.shape)}"
            )
        if dst.dtype != entry.torch_dtype:
            raise SchemaMismatchError(
                f"version {manifest.version}: tensor {format_key(entry.key)!r} has dtype {entry.dtype}, "
                f"the target has {dst.dtype}"
            )
        pairs.append((entry, dst))
    return pairs
