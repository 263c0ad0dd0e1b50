"""Turning weights into keyed tensors, and matching a target against a manifest."""

from __future__ import annotations

import pytest
import torch
from tensordict import NonTensorData, TensorDict
from torch import nn

from redisbus.errors import SchemaMismatchError
from redisbus.tensors import flatten_weights, match_target, target_leaves
from redisbus.wire import Manifest, chunk_spans, decode_manifest, encode_manifest, plan_layout


def manifest_of(weights: object, version: int = 3) -> Manifest:
    """The manifest a publisher would write for ``weights`` (through the wire and back)."""
    leaves = flatten_weights(weights)  # type: ignore[arg-type]
    entries, total = plan_layout((key, t.dtype, t.shape) for key, t in leaves)
    spans = chunk_spans(total, 64)
    return decode_manifest(encode_manifest(Manifest(version, total, 64, (0,) * len(spans), tuple(entries))))


def small_module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Sequential(nn.Linear(4, 2, bias=False)))


# ---------------------------------------------------------------- flatten_weights


def test_tensordict_nested_keys_in_order_sharing_storage() -> None:
    a, b, c = torch.zeros(2, 3), torch.ones(4, dtype=torch.int64), torch.tensor(1.5)
    td = TensorDict({"policy": {"encoder": {"w": a}, "head": b}, "scalar": c}, batch_size=[])
    leaves = flatten_weights(td)
    assert [k for k, _ in leaves] == [("policy", "encoder", "w"), ("policy", "head"), ("scalar",)]
    tensors = dict(leaves)
    assert tensors[("policy", "encoder", "w")].data_ptr() == a.data_ptr()
    assert tensors[("scalar",)].shape == ()


def test_module_gives_parameters_and_buffers() -> None:
    module = small_module()
    leaves = dict(flatten_weights(module))
    expected = {tuple(name.split(".")) for name in module.state_dict()}
    assert set(leaves) == expected
    assert ("1", "running_mean") in leaves and ("1", "num_batches_tracked") in leaves  # buffers
    assert ("2", "0", "weight") in leaves and ("2", "0", "bias") not in leaves
    # the leaves are the module's own storage: writing them writes the module
    assert leaves[("0", "weight")].data_ptr() == module[0].weight.data_ptr()
    assert leaves[("1", "running_var")].data_ptr() == module[1].running_var.data_ptr()


def test_state_dict_dotted_names_match_the_module_keys() -> None:
    module = small_module()
    from_state = flatten_weights(module.state_dict())
    assert [k for k, _ in from_state] == [tuple(n.split(".")) for n in module.state_dict()]
    assert {k for k, _ in from_state} == {k for k, _ in flatten_weights(module)}
    # a version published from a state dict applies to the module, and the other way round
    assert len(match_target(manifest_of(module.state_dict()), target_leaves(module))) == len(from_state)
    twin = small_module()
    pairs = match_target(manifest_of(module), target_leaves(twin))
    assert {e.key for e, _ in pairs} == {k for k, _ in from_state}


def test_nested_mapping_with_dotted_names() -> None:
    t = torch.zeros(2)
    leaves = flatten_weights({"actor": {"net.0.weight": t, "log_std": {"v": t}}, "critic.w": t})
    assert [k for k, _ in leaves] == [("actor", "net", "0", "weight"), ("actor", "log_std", "v"), ("critic", "w")]


def test_parameters_in_a_mapping_are_tensors() -> None:
    p = nn.Parameter(torch.ones(3))
    assert flatten_weights({"p": p})[0][1] is p


@pytest.mark.parametrize(
    ("weights", "name"),
    [
        ({"a": torch.zeros(1), "b": 1.0}, "'b' holds a float"),
        ({"a": {"b": "text"}}, "'a.b' holds a str"),
        ({"a": {"b": [torch.zeros(1)]}}, "'a.b' holds a list"),
        ({"a": None}, "'a' holds a NoneType"),
    ],
)
def test_non_tensor_leaf_in_a_mapping(weights: dict, name: str) -> None:
    with pytest.raises(SchemaMismatchError, match=name):
        flatten_weights(weights)


def test_non_tensor_leaf_in_a_tensordict() -> None:
    td = TensorDict({"a": torch.zeros(1), "note": "hello"}, batch_size=[])
    with pytest.raises(SchemaMismatchError, match="'note' holds non-tensor data"):
        flatten_weights(td)
    nested = TensorDict({"a": torch.zeros(1), "n": {"x": torch.ones(2), "o": NonTensorData(object())}}, batch_size=[])
    with pytest.raises(SchemaMismatchError, match="'n.o' holds non-tensor data"):
        flatten_weights(nested)
    with pytest.raises(SchemaMismatchError, match="non-tensor"):
        target_leaves(td)


def test_non_string_key_duplicate_key_and_empty_key_part() -> None:
    t = torch.zeros(1)
    with pytest.raises(SchemaMismatchError, match="not a string"):
        flatten_weights({1: t})  # type: ignore[dict-item]
    with pytest.raises(SchemaMismatchError, match="'a.b' twice"):
        flatten_weights({"a.b": t, "a": {"b": t}})
    for name in ("", "a..b", ".a", "a."):
        with pytest.raises(SchemaMismatchError, match="non-empty parts"):
            flatten_weights({name: t})
    with pytest.raises(SchemaMismatchError, match="non-empty parts"):
        flatten_weights({".".join(["x"] * 65): t})


def test_sparse_tensor_is_refused() -> None:
    with pytest.raises(SchemaMismatchError, match="'s' holds a torch.sparse_coo tensor"):
        flatten_weights({"s": torch.zeros(3).to_sparse()})


def test_wrong_kinds_are_type_errors() -> None:
    with pytest.raises(TypeError, match="list"):
        flatten_weights([torch.zeros(1)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dict"):
        target_leaves({"a": torch.zeros(1)})  # type: ignore[arg-type]


def test_every_flattened_key_survives_the_wire() -> None:
    weights = {"a.b.c": torch.zeros(2), "x" * 1024: torch.ones(1), "ünï.cödé": torch.zeros(1, dtype=torch.bfloat16)}
    manifest = manifest_of(weights)
    assert [t.key for t in manifest.tensors] == [k for k, _ in flatten_weights(weights)]


# ---------------------------------------------------------------- match_target


def test_match_target_pairs_every_entry_with_the_target_tensor() -> None:
    target = TensorDict({"w": torch.zeros(2, 3), "n": {"b": torch.zeros(3, dtype=torch.float16)}}, batch_size=[])
    manifest = manifest_of({"w": torch.ones(2, 3), "n.b": torch.ones(3, dtype=torch.float16)})
    pairs = match_target(manifest, target_leaves(target))
    assert [e.key for e, _ in pairs] == [("w",), ("n", "b")]
    for entry, dst in pairs:
        dst.fill_(7)
    assert bool((target["w"] == 7).all()) and bool((target["n", "b"] == 7).all())


def test_match_target_names_key_and_both_shapes() -> None:
    manifest = manifest_of({"enc.w": torch.zeros(4, 3)})
    target = TensorDict({"enc": {"w": torch.zeros(3, 4)}}, batch_size=[])
    with pytest.raises(SchemaMismatchError) as info:
        match_target(manifest, target_leaves(target))
    message = str(info.value)
    assert "'enc.w'" in message and "[4, 3]" in message and "[3, 4]" in message and "version 3" in message


def test_match_target_names_key_and_both_dtypes() -> None:
    manifest = manifest_of({"w": torch.zeros(2, dtype=torch.bfloat16)})
    target = TensorDict({"w": torch.zeros(2, dtype=torch.float32)}, batch_size=[])
    with pytest.raises(SchemaMismatchError) as info:
        match_target(manifest, target_leaves(target))
    message = str(info.value)
    assert "'w'" in message and "bfloat16" in message and "torch.float32" in message


def test_match_target_lists_missing_and_extra_keys() -> None:
    manifest = manifest_of({"a": torch.zeros(1), "shared": torch.zeros(1), "pub.only": torch.zeros(1)})
    target = TensorDict({"shared": torch.zeros(1), "tgt": {"only": torch.zeros(1)}, "z": torch.zeros(1)}, batch_size=[])
    with pytest.raises(SchemaMismatchError) as info:
        match_target(manifest, target_leaves(target))
    message = str(info.value)
    assert "target keys not in the version: ['tgt.only', 'z']" in message
    assert "version keys not in the target: ['a', 'pub.only']" in message


def test_match_target_truncates_long_key_lists() -> None:
    manifest = manifest_of({f"k{i:02d}": torch.zeros(1) for i in range(20)})
    with pytest.raises(SchemaMismatchError) as info:
        match_target(manifest, {})
    message = str(info.value)
    assert "'k00'" in message and "'k07'" in message and "'k08'" not in message and "..." in message
    assert "target keys not in the version" not in message


def test_match_target_zero_d_and_zero_size() -> None:
    weights = {"s": torch.tensor(2.0), "e": torch.zeros(0, 5)}
    pairs = match_target(manifest_of(weights), dict(flatten_weights({"s": torch.tensor(0.0), "e": torch.zeros(0, 5)})))
    assert [e.shape for e, _ in pairs] == [(), (0, 5)]
    with pytest.raises(SchemaMismatchError, match=r"\[0, 5\].*\[0, 4\]"):
        match_target(manifest_of(weights), dict(flatten_weights({"s": torch.tensor(0.0), "e": torch.zeros(0, 4)})))
