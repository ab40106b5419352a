"""Fuzz the safetensors files and shard index of a real FP8 export (FP8 weights, scales, KV scales).

Oracle: mopt's header reader accepts a file only if the safetensors library reads every tensor of
it; otherwise it and ``load_model`` raise a mopt error. Scale values that are non-finite or not
positive must be refused naming the tensor. Nothing else may escape.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mopt.engine.checkpoint import DTYPE_BYTES, read_checkpoint, read_safetensors_header
from mopt.engine.loader import load_model
from mopt.errors import MoptError
from fuzzlib import fuzz_settings, json_values, outcome


@pytest.fixture(scope="module")
def ckpt(export_factory, tmp_path_factory):
    """A private copy of the export, and its model.safetensors split into (header, data)."""
    dst = tmp_path_factory.mktemp("fuzz-safetensors") / "ckpt"
    shutil.copytree(export_factory("fp8-kv", 256).path, dst)
    raw = (dst / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return dst, json.loads(raw[8:8 + n]), raw[8 + n:]


def write(path: Path, header: dict | bytes, data: bytes, length_delta: int = 0) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", max(0, len(blob) + length_delta)) + blob + data)


ENTRY_FIELDS = ["dtype", "shape", "data_offsets"]
dtypes = st.sampled_from(sorted(DTYPE_BYTES) + ["F128", "f32", "", "F8_E8M0", "C64"]) | json_values


def shapes(shape: list[int]) -> st.SearchStrategy:
    nearby = [shape[:-1], shape + [1], [d + 1 for d in shape], [d * 2 for d in shape], list(reversed(shape)),
              [-d for d in shape], [0] + shape[1:], sum(shape), [True] * len(shape), [float(d) for d in shape]]
    return st.sampled_from(nearby) | json_values


def offsets(pair: list[int]) -> st.SearchStrategy:
    a, b = pair
    nearby = [[a, b + 1], [a + 1, b], [a - 1, b - 1], [b, a], [a, b, b], [a], [a, 2**70], [float(a), float(b)],
              [a + 4, b + 4], [0, b - a], [-1, b]]
    return st.sampled_from(nearby) | json_values


@st.composite
def header_edits(draw, header: dict, data: bytes):
    """One structured edit of the header or the file around it."""
    header, data = copy.deepcopy(header), data
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    entry = header[name]
    kind = draw(st.sampled_from(["dtype", "shape", "offsets", "drop field", "replace entry", "duplicate",
                                 "remove", "rename", "metadata", "truncate", "append", "length", "not utf-8"]))
    length_delta = 0
    if kind == "dtype":
        entry["dtype"] = draw(dtypes)
    elif kind == "shape":
        entry["shape"] = draw(shapes(entry["shape"]))
    elif kind == "offsets":
        entry["data_offsets"] = draw(offsets(entry["data_offsets"]))
    elif kind == "drop field":
        entry.pop(draw(st.sampled_from(ENTRY_FIELDS)))
    elif kind == "replace entry":
        header[name] = draw(json_values)
    elif kind == "duplicate":
        header[name + draw(st.sampled_from(["", ".copy", "_"]))] = dict(entry)
    elif kind == "remove":
        header.pop(name)
    elif kind == "rename":
        header[draw(st.sampled_from(["model.layers.9.mlp.down_proj.weight", name + ".bias", "x"]))] = header.pop(name)
    elif kind == "metadata":
        header["__metadata__"] = draw(json_values)
    elif kind == "truncate":
        data = data[: len(data) - draw(st.integers(1, 2048))]
    elif kind == "append":
        data = data + bytes(draw(st.integers(1, 9)))
    elif kind == "length":
        length_delta = draw(st.sampled_from([-1, 1, 7, -5000, 2**40]))
    else:
        return json.dumps(header).encode("utf-16"), data, 0
    return header, data, length_delta


def test_fuzz_safetensors_headers(ckpt):
    root, header, data = ckpt
    path = root / "model.safetensors"

    @fuzz_settings(max_examples=120)
    @given(edit=header_edits(header, data))
    def run(edit):
        write(path, *edit)
        read = outcome(lambda: read_safetensors_header(path))
        if not isinstance(read, MoptError):  # accepted: safetensors must read every tensor of it
            from safetensors import safe_open

            with safe_open(path, framework="pt") as reader:
                assert set(reader.keys()) == set(read)
                for key in reader.keys():
                    reader.get_tensor(key)
            model = outcome(lambda: load_model(root))
            if not isinstance(model, MoptError):
                with torch.no_grad():
                    model(torch.tensor([[1, 2, 3]]))
        else:
            assert str(path) in str(read)

    try:
        run()
    finally:
        write(path, header, data)


SCALES = ["model.layers.0.self_attn.q_proj.weight_scale", "model.layers.1.mlp.down_proj.input_scale",
          "model.layers.0.self_attn.k_proj.k_scale", "model.layers.1.self_attn.v_proj.v_scale"]
scale_values = st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -1.0, 1e-45, 1e-30, 3.0e38]) \
    | st.floats(allow_nan=True, allow_infinity=True, width=32)


def test_fuzz_scale_values(ckpt):
    root, header, data = ckpt
    path = root / "model.safetensors"

    @fuzz_settings(max_examples=25)
    @given(name=st.sampled_from(SCALES), value=scale_values)
    def run(name, value):
        begin, end = header[name]["data_offsets"]
        patched = data[:begin] + struct.pack("<f", value) + data[end:]
        write(path, header, patched)
        model = outcome(lambda: load_model(root))
        stored = struct.unpack("<f", struct.pack("<f", value))[0]
        if not (stored > 0 and stored != float("inf")):
            assert isinstance(model, MoptError) and name in str(model), f"{name}={value} was accepted"
        else:
            assert not isinstance(model, MoptError), f"{name}={value} refused: {model}"

    try:
        run()
    finally:
        write(path, header, data)


@st.composite
def index_edits(draw, weight_map: dict):
    index = {"metadata": {}, "weight_map": dict(weight_map)}
    names = sorted(weight_map)
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["move", "drop", "add", "value", "weight_map"]))
        name = draw(st.sampled_from(names))
        if kind == "move":
            other = {"model-00001-of-00002.safetensors": "model-00002-of-00002.safetensors"}
            index["weight_map"][name] = other.get(weight_map[name], "model-00001-of-00002.safetensors")
        elif kind == "drop":
            index["weight_map"].pop(name, None)
        elif kind == "add":
            index["weight_map"][draw(st.sampled_from(["extra", name + "x"]))] = weight_map[name]
        elif kind == "value":
            index["weight_map"][name] = draw(st.sampled_from(["../x.safetensors", "/abs.safetensors", "", "missing.safetensors"])
                                             | json_values)
        else:  # replaces the whole map: no further edits on it
            index["weight_map"] = draw(json_values)
            break
    return index


def test_fuzz_shard_index(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    src, _, _ = ckpt
    root = tmp_path / "sharded"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({k: tensors[k] for k in part}, root / file, metadata={"format": "pt"})
    weight_map = {k: f for f, part in halves.items() for k in part}

    @fuzz_settings(max_examples=30)
    @given(index=index_edits(weight_map))
    def run(index):
        (root / "model.safetensors.index.json").write_text(json.dumps(index))
        files = outcome(lambda: read_checkpoint(root))
        if not isinstance(files, MoptError):  # a consistent index: the model is the unsharded one
            assert outcome(lambda: load_model(root)) is not None

    run()
