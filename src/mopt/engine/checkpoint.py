"""The tensors a checkpoint folder holds: safetensors headers and shard indexes, validated.

:func:`read_safetensors_header` is mopt's one reader of safetensors headers. It accepts a header
only when the safetensors library would too and the header describes the file exactly: every
tensor has a known dtype, a shape of non-negative integers and ``[begin, end)`` data offsets whose
length is ``numel * itemsize``, and the tensors tile the data section with no gap, overlap or
trailing byte. :func:`read_checkpoint` adds the checks across files: each tensor in exactly one
file, and in the file the shard index names for it.
"""

from __future__ import annotations

import struct
from pathlib import Path, PurePosixPath
from typing import Any

from mopt.errors import MoptError
from mopt.jsonio import parse_json, read_json_object

# Bytes per element of the safetensors dtype names that torch can hold.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "U8": 1,
               "I8": 1, "I16": 2, "I32": 4, "I64": 8, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1}
FLOAT_DTYPES = ("BF16", "F16", "F32")
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(MoptError):
    """A checkpoint file that cannot be read; the message names the file."""


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _check_entry(path: Path, name: str, info: Any) -> tuple[int, int]:
    """Validate one header entry; returns its data offsets."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: header entry must be an object, got {type(info).__name__}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise CheckpointError(f"{where}: header entry lacks {missing}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r}; supported: {sorted(DTYPE_BYTES)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
    begin, end = offsets
    if end - begin != numel * DTYPE_BYTES[dtype]:
        raise CheckpointError(
            f"{where}: data_offsets {offsets} hold {end - begin} bytes, but shape {shape} of {dtype} "
            f"needs {numel * DTYPE_BYTES[dtype]}"
        )
    return begin, end


def _check_tiling(path: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """Tensors must cover the data section exactly once, as the safetensors library requires."""
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if end > data_size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {end} but the file holds {data_size} data bytes "
                "(truncated download?)"
            )
        if begin < position:
            raise CheckpointError(f"{path}: tensors {previous!r} and {name!r} overlap (data_offsets)")
        if begin > position:
            raise CheckpointError(f"{path}: data bytes {position}..{begin} belong to no tensor (data_offsets)")
        position, previous = end, name
    if position != data_size:
        raise CheckpointError(f"{path}: {data_size - position} bytes after the last tensor's data "
                              "(corrupt file or wrong data_offsets)")


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor name -> ``{"dtype", "shape", "data_offsets"}`` of a safetensors file, validated."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header length)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > size - 8:
                raise CheckpointError(f"{path}: corrupt safetensors header (length {n}, file size {size})")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: safetensors header of {n} bytes exceeds {MAX_HEADER_BYTES}")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read safetensors header ({e.strerror or e})") from None
    header = parse_json(raw, f"{path}: safetensors header", CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    spans = [(*_check_entry(path, name, info), name) for name, info in header.items()]
    _check_tiling(path, spans, size - 8 - n)
    return header


def _index_files(root: Path, index: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from a ``model.safetensors.index.json``."""
    weight_map = read_json_object(index, CheckpointError).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object of tensor name -> file name")
    out = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file or PurePosixPath(file).is_absolute() or ".." in PurePosixPath(file).parts:
            raise CheckpointError(f"{index}: weight_map[{name!r}] must be a file name inside the checkpoint "
                                  f"folder, got {file!r}")
        out[name] = root / file
    return out


def checkpoint_files(root: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the index's shards, or ``model.safetensors``."""
    index = root / INDEX_NAME
    if index.is_file():
        files = sorted(set(_index_files(root, index).values()))
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: names shard files that are missing: {missing}")
        return files
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{root}: no model.safetensors or {INDEX_NAME}")


def _holders(root: Path, names: list[str], skip: list[Path]) -> dict[str, Path]:
    """Which other safetensors files of the folder hold ``names`` (to explain an index error)."""
    found: dict[str, Path] = {}
    for f in sorted(root.glob("*.safetensors")):
        if f in skip:
            continue
        try:
            found.update({n: f for n in read_safetensors_header(f) if n in names})
        except CheckpointError:
            continue
    return found


def read_checkpoint(root: Path) -> tuple[list[Path], dict[str, dict]]:
    """``(files, headers)``: every tensor's header entry plus ``"file"``, checked across shards.

    A tensor may appear in one file only, and where there is an index, in the file it names; the
    index may list no tensor that its files do not hold.
    """
    root = Path(root)
    files = checkpoint_files(root)
    index = root / INDEX_NAME
    listed = _index_files(root, index) if index.is_file() else None
    headers: dict[str, dict] = {}
    for f in files:
        for name, info in read_safetensors_header(f).items():
            if name in headers:
                raise CheckpointError(f"tensor {name!r} is in two files: {headers[name]['file']} and {f}")
            headers[name] = dict(info, file=f)
    if listed is None:
        return files, headers
    for name, info in headers.items():
        if listed.get(name) != info["file"]:
            where = f"names {listed[name].name}" if name in listed else "does not list it"
            raise CheckpointError(f"{info['file']}: holds tensor {name!r} but {index.name} {where}")
    absent = sorted(set(listed) - set(headers))
    if absent:
        elsewhere = _holders(root, absent, files)
        details = [f"{n} (index: {listed[n].name}" + (f", found in {elsewhere[n].name})" if n in elsewhere else ")")
                   for n in absent[:5]]
        raise CheckpointError(f"{index}: lists tensors that are not in the file it names: {', '.join(details)}"
                              + (f" and {len(absent) - 5} more" if len(absent) > 5 else ""))
    return files, headers
