"""Safetensors headers, shard indexes and tensor values that must be refused by name (issue 15).

Headers are written byte by byte so that every malformation reaches mopt's reader; the same files
must also fail ``load_model`` with a mopt error, never a safetensors or Python exception.
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from mopt.engine.checkpoint import CheckpointError, read_checkpoint, read_safetensors_header
from mopt.engine.loader import load_model
from mopt.errors import MoptError
from mopt.layers.parameter import WeightLoadError


def write_safetensors(path, header: dict | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def two_tensors() -> tuple[dict, bytes]:
    """A valid header of two F32 tensors, ``a [2]`` and ``b [1, 3]``, and its data."""
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [1, 3], "data_offsets": [8, 20]}}
    return header, torch.arange(5, dtype=torch.float32).numpy().tobytes()


def test_valid_header_is_read_like_safetensors(tmp_path):
    header, data = two_tensors()
    header["empty"] = {"dtype": "BF16", "shape": [0, 4], "data_offsets": [20, 20]}
    write_safetensors(tmp_path / "x.safetensors", header, data)
    got = read_safetensors_header(tmp_path / "x.safetensors")
    assert set(got) == {"a", "b", "empty"}
    tensors = load_file(tmp_path / "x.safetensors")  # safetensors accepts what mopt accepts
    assert tensors["b"].tolist() == [[2.0, 3.0, 4.0]]


def _mutate(**entry_changes):
    def mutate(header, data):
        for name, change in entry_changes.items():
            header[name] = change(header[name]) if callable(change) else change
        return header, data
    return mutate


def _drop(key):
    return lambda e: {k: v for k, v in e.items() if k != key}


HEADERS = [
    # (name, mutation of (header, data), message)
    ("missing shape", _mutate(a=_drop("shape")), r"tensor 'a': header entry lacks \['shape'\]"),
    ("null entry", _mutate(a=None), r"tensor 'a': header entry must be an object, got NoneType"),
    ("shape as an int", _mutate(a=lambda e: {**e, "shape": 2}), r"tensor 'a': shape must be a list of non-negative"),
    ("negative dimension", _mutate(a=lambda e: {**e, "shape": [-2]}), r"shape must be a list of non-negative"),
    ("bool dimension", _mutate(a=lambda e: {**e, "shape": [True, 2]}), r"shape must be a list of non-negative"),
    ("unknown dtype", _mutate(a=lambda e: {**e, "dtype": "F128"}), r"tensor 'a': unknown dtype 'F128'"),
    ("dtype not a string", _mutate(a=lambda e: {**e, "dtype": 4}), r"unknown dtype 4"),
    ("offsets disagree with shape", _mutate(b=lambda e: {**e, "shape": [1, 2]}),
     r"tensor 'b': data_offsets \[8, 20\] hold 12 bytes, but shape \[1, 2\] of F32 needs 8"),
    ("offsets reversed", _mutate(a=lambda e: {**e, "data_offsets": [8, 0]}), r"0 <= begin <= end"),
    ("float offsets", _mutate(a=lambda e: {**e, "data_offsets": [0.0, 8.0]}), r"data_offsets must be \[begin, end\]"),
    ("three offsets", _mutate(a=lambda e: {**e, "data_offsets": [0, 4, 8]}), r"data_offsets must be \[begin, end\]"),
    ("overlapping tensors", _mutate(b=lambda e: {**e, "data_offsets": [4, 16]}), r"tensors 'a' and 'b' overlap"),
    ("gap between tensors", _mutate(a=lambda e: {**e, "shape": [1], "data_offsets": [0, 4]}),
     r"data bytes 4..8 belong to no tensor"),
    ("tensor past the end", lambda h, d: (h, d[:-4]), r"tensor 'b' ends at byte 20 but the file holds 16 data bytes"),
    ("one trailing byte", lambda h, d: (h, d + b"\0"), r"1 bytes after the last tensor's data"),
    ("header not an object", lambda h, d: ([1, 2], d), r"safetensors header must be a JSON object, got list"),
    ("metadata not strings", _mutate(__metadata__={"format": 1}), r"__metadata__ must map strings to strings"),
    ("header not UTF-8", lambda h, d: (json.dumps(h).encode("utf-16"), d), r"safetensors header: not UTF-8 text"),
    ("duplicate tensor name", lambda h, d: (json.dumps(h).encode()[:-1] + b', "a": ' + json.dumps(h["a"]).encode() + b"}", d),
     r"duplicate key 'a'"),
]


@pytest.mark.parametrize("mutate,message", [pytest.param(*row[1:], id=row[0]) for row in HEADERS])
def test_bad_headers_are_refused_by_name(tmp_path, mutate, message):
    header, data = mutate(*two_tensors())
    path = tmp_path / "model.safetensors"
    write_safetensors(path, header, data)
    with pytest.raises(CheckpointError, match=message) as info:
        read_safetensors_header(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("raw,message", [
    (b"", r"truncated safetensors file"),
    (b"\x05\0\0\0", r"truncated safetensors file"),
    (struct.pack("<Q", 0), r"corrupt safetensors header \(length 0"),
    (struct.pack("<Q", 1000) + b"{}", r"corrupt safetensors header \(length 1000, file size 10\)"),
], ids=["empty file", "short length", "zero length", "length past the end"])
def test_bad_header_lengths(tmp_path, raw, message):
    (tmp_path / "model.safetensors").write_bytes(raw)
    with pytest.raises(CheckpointError, match=message):
        read_safetensors_header(tmp_path / "model.safetensors")


# -- whole checkpoints: the loader refuses the same files, and checks across shards -----------

@pytest.fixture(scope="module")
def fp8_kv(export_factory):
    return export_factory("fp8-kv", 256)


def _copy(export, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(export.path, dst)
    return dst


def test_loader_refuses_a_bad_header(fp8_kv, tmp_path):
    ckpt = _copy(fp8_kv, tmp_path)
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match=r"model.safetensors: 1 bytes after the last tensor's data"):
        load_model(ckpt)


def _shard(ckpt, move_to_second: list[str], duplicate: dict | None = None, index_edit=None) -> None:
    """Split ``model.safetensors`` into two shards plus an index."""
    sd = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    second = {k: sd.pop(k) for k in move_to_second}
    first = dict(sd)
    if duplicate:
        first.update(duplicate)
    save_file(first, ckpt / FIRST, metadata={"format": "pt"})
    save_file(second, ckpt / SECOND, metadata={"format": "pt"})
    weight_map = {k: FIRST for k in sd} | {k: SECOND for k in second}
    index = {"metadata": {}, "weight_map": weight_map}
    if index_edit:
        index_edit(index)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


DOWN, UP = "model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.up_proj.weight"
FIRST, SECOND = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def _set(key, value):
    return lambda index: index["weight_map"].__setitem__(key, value)


SHARDS = [
    # (name, tensors to move to shard 2, duplicate in shard 1, index edit, message)
    ("same tensor in two files", [DOWN], {DOWN: torch.zeros(256, 512, dtype=torch.float8_e4m3fn)}, None,
     rf"tensor '{DOWN}' is in two files: .*{FIRST} and .*{SECOND}"),
    ("index names another file", [DOWN, UP], None, _set(DOWN, FIRST),
     rf"{SECOND}: holds tensor '{DOWN}' but model.safetensors.index.json names {FIRST}"),
    ("index names another file, the holder unlisted", [DOWN], None, _set(DOWN, FIRST),
     rf"lists tensors that are not in the file it names: {DOWN} \(index: {FIRST}, found in {SECOND}\)"),
    ("tensor missing from the index", [DOWN, UP], None, lambda index: index["weight_map"].pop(DOWN),
     rf"holds tensor '{DOWN}' but model.safetensors.index.json does not list it"),
    ("index lists a tensor no shard holds", [DOWN], None, _set("model.layers.9.extra", FIRST),
     rf"lists tensors that are not in the file it names: model.layers.9.extra \(index: {FIRST}\)"),
    ("index file outside the folder", [DOWN], None, _set(DOWN, "../elsewhere.safetensors"),
     rf"weight_map\['{DOWN}'\] must be a file name inside the checkpoint folder"),
    ("index file name not a string", [DOWN], None, _set(DOWN, 2), r"must be a file name inside the checkpoint folder, got 2"),
    ("weight_map missing", [DOWN], None, lambda index: index.pop("weight_map"), r"'weight_map' must be a non-empty object"),
    ("index not UTF-8", [DOWN], None, None, r"model.safetensors.index.json: not UTF-8 text"),
]


@pytest.mark.parametrize("move,dup,edit,message", [pytest.param(*row[1:], id=row[0]) for row in SHARDS])
def test_shard_index_mismatches(fp8_kv, tmp_path, move, dup, edit, message):
    ckpt = _copy(fp8_kv, tmp_path)
    _shard(ckpt, move, dup, edit)
    if "UTF-8" in message:
        index = ckpt / "model.safetensors.index.json"
        index.write_bytes(index.read_text().encode("utf-16"))
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=message):
        load_model(ckpt)


def test_consistent_shards_load_like_one_file(fp8_kv, tmp_path):
    ckpt = _copy(fp8_kv, tmp_path)
    _shard(ckpt, [DOWN, "lm_head.weight"])
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(load_model(ckpt)(ids), load_model(fp8_kv.path)(ids))


# -- tensor values and presence ---------------------------------------------------------------

def _edit_tensors(ckpt, edit) -> None:
    sd = load_file(ckpt / "model.safetensors")
    edit(sd)
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})


def _put(name, value):
    return lambda sd: sd.__setitem__(name, value)


def _remove(name):
    return lambda sd: sd.pop(name)


ATTN, MLP = "model.layers.0.self_attn", "model.layers.0.mlp"
F32 = torch.float32
TENSORS = [
    # (name, export format, edit of the tensors, error class, message)
    ("inf weight scale", "fp8-kv", _put(f"{ATTN}.o_proj.weight_scale", torch.tensor(float("inf"))), WeightLoadError,
     rf"{ATTN}.o_proj.weight_scale: scale has non-finite values \(\[inf\]\)"),
    ("NaN input scale", "fp8-kv", _put(f"{ATTN}.q_proj.input_scale", torch.tensor(float("nan"))), WeightLoadError,
     rf"{ATTN}.q_proj.input_scale: scale has non-finite values"),
    ("zero weight scale", "fp8-kv", _put(f"{MLP}.down_proj.weight_scale", torch.tensor(0.0)), WeightLoadError,
     rf"{MLP}.down_proj.weight_scale: scale must be positive, got 0.0"),
    ("negative input scale", "fp8-kv", _put(f"{MLP}.up_proj.input_scale", torch.tensor(-0.5)), WeightLoadError,
     rf"{MLP}.up_proj.input_scale: scale must be positive, got -0.5"),
    ("NaN NVFP4 global scale", "nvfp4", _put(f"{ATTN}.k_proj.weight_scale_2", torch.tensor(float("nan"))),
     WeightLoadError, rf"{ATTN}.k_proj.weight_scale_2: scale has non-finite values"),
    ("NaN NVFP4 block scale", "nvfp4",
     _put(f"{ATTN}.v_proj.weight_scale", torch.full((128, 16), float("nan")).to(torch.float8_e4m3fn)),
     WeightLoadError, rf"{ATTN}.v_proj.weight_scale: scale has non-finite values"),
    ("negative per-channel scale", "fp8-pcpt", _put(f"{MLP}.gate_proj.weight_scale", -torch.ones(512)),
     WeightLoadError, rf"{MLP}.gate_proj.weight_scale: scale has negative values"),
    ("zero KV scale", "fp8-kv", _put(f"{ATTN}.k_proj.k_scale", torch.tensor(0.0)), WeightLoadError,
     rf"{ATTN}.k_proj.k_scale: scale must be positive"),
    ("missing q shard", "fp8-kv", _remove(f"{ATTN}.q_proj.weight"), WeightLoadError,
     rf"checkpoint has no tensor for: {ATTN}.q_proj.weight$"),
    ("missing k shard", "nvfp4", _remove(f"{ATTN}.k_proj.weight"), WeightLoadError,
     rf"checkpoint has no tensor for: {ATTN}.k_proj.weight$"),
    ("missing gate shard", "fp8-pcpt", _remove(f"{MLP}.gate_proj.weight"), WeightLoadError,
     rf"checkpoint has no tensor for: {MLP}.gate_proj.weight$"),
    ("missing NVFP4 q block scale", "nvfp4", _remove(f"{ATTN}.q_proj.weight_scale"), WeightLoadError,
     rf"checkpoint has no tensor for: {ATTN}.q_proj.weight_scale$"),
    ("missing NVFP4 v global scale", "nvfp4", _remove(f"{ATTN}.v_proj.weight_scale_2"), WeightLoadError,
     rf"checkpoint has no tensor for: {ATTN}.v_proj.weight_scale_2$"),
    ("missing k_scale of an FP8 KV cache", "fp8-kv", _remove("model.layers.1.self_attn.k_proj.k_scale"), WeightLoadError,
     r"checkpoint has no tensor for: model.layers.1.self_attn.k_proj.k_scale$"),
    ("tensor of a layer the config lacks", "fp8-kv", _put("model.layers.7.mlp.down_proj.weight", torch.zeros(2, 2)),
     WeightLoadError, r"model.safetensors: tensor model.layers.7.mlp.down_proj.weight has no place in LlamaForCausalLM"),
    ("bias the config does not declare", "fp8-kv", _put(f"{MLP}.up_proj.bias", torch.zeros(512)), WeightLoadError,
     rf"tensor {MLP}.up_proj.bias has no place in LlamaForCausalLM"),
    ("wrong dtype names file and tensor", "fp8-kv", _put(f"{MLP}.up_proj.weight", torch.zeros(512, 256, dtype=F32)),
     WeightLoadError, rf"^model.safetensors: {MLP}.up_proj.weight: .*dtype torch.float32, expected torch.float8_e4m3fn"),
]


@pytest.mark.parametrize("fmt,edit,error,message", [pytest.param(*row[1:], id=row[0]) for row in TENSORS])
def test_bad_tensors_are_refused_by_name(export_factory, tmp_path, fmt, edit, error, message):
    ckpt = _copy(export_factory(fmt, 256), tmp_path)
    _edit_tensors(ckpt, edit)
    with pytest.raises(error, match=message) as info:
        load_model(ckpt)
    assert isinstance(info.value, MoptError)


def test_zero_block_scales_are_allowed(export_factory, tmp_path):
    """An all-zero block of NVFP4 weights has block scale 0: that loads (and computes zeros)."""
    ckpt = _copy(export_factory("nvfp4", 256), tmp_path)
    name = f"{MLP}.down_proj.weight_scale"
    _edit_tensors(ckpt, lambda sd: sd[name].view(torch.uint8)[0].zero_())
    assert load_model(ckpt)(torch.tensor([[1, 2, 3]])).isfinite().all()
