"""A checkpoint tensor read only as far as a rank needs it.

Under tensor parallelism each rank keeps a slice of most tensors. The loader hands parameters a
:class:`LazyTensor` instead of the tensor: its ``shape``, ``dtype``, ``dim()`` and ``numel()`` come
from the safetensors header, ``narrow`` only narrows the box to read, and the bytes are read (through
safetensors' ``get_slice``, so only the box) when the parameter copies it or does anything else with
it. The parameter classes' ``take_slice``/``narrow`` calls therefore read just their rank's rows or
columns; a parameter that does something else gets the whole tensor, which is always correct.

Read whole on purpose (small, or needed whole on every rank): scales (``check_scale`` looks at all of
them, and per-tensor ones are replicated), 128x128 block scales (expanded per row before the split),
norms, routers, biases of row-parallel layers and KV-cache scales.
"""

from __future__ import annotations

import torch

from mopt.engine.checkpoint import CheckpointError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U8": torch.uint8, "I8": torch.int8,
           "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


class LazyTensor:
    """``reader``'s tensor ``name`` (header entry ``info``), narrowed to ``box`` (one ``(start, stop)`` per
    dim), read onto ``device`` when used."""

    def __init__(self, reader, name: str, info: dict, device: torch.device | str,
                 box: tuple[tuple[int, int], ...] | None = None) -> None:
        self.reader, self.name, self.info, self.device = reader, name, info, device
        self.box = box if box is not None else tuple((0, d) for d in info["shape"])
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{name}: dtype {info['dtype']} cannot be loaded into torch")

    @property
    def shape(self) -> torch.Size:
        return torch.Size(stop - start for start, stop in self.box)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.info["dtype"]]

    def dim(self) -> int:
        return len(self.box)

    def numel(self) -> int:
        return self.shape.numel()

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def narrow(self, dim: int, start: int, length: int) -> "LazyTensor":
        dim = dim % self.dim()
        lo, hi = self.box[dim]
        if not (0 <= start and start + length <= hi - lo):
            raise IndexError(f"{self.name}: narrow({dim}, {start}, {length}) outside shape {tuple(self.shape)}")
        box = self.box[:dim] + ((lo + start, lo + start + length),) + self.box[dim + 1:]
        return LazyTensor(self.reader, self.name, self.info, self.device, box)

    @property
    def is_whole(self) -> bool:
        return all(start == 0 and stop == d for (start, stop), d in zip(self.box, self.info["shape"]))

    def materialize(self) -> torch.Tensor:
        """The box's values on the device (only they are read from the file)."""
        try:
            if self.is_whole:
                t = self.reader.get_tensor(self.name)
            else:
                t = self.reader.get_slice(self.name)[tuple(slice(a, b) for a, b in self.box)]
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read tensor {self.name} ({e})") from None
        return t.to(self.device)

    def __getattr__(self, attr: str):
        if attr.startswith("__") or attr in ("reader", "name", "info", "device", "box"):
            raise AttributeError(attr)
        return getattr(self.materialize(), attr)

    def __getitem__(self, index):
        return self.materialize()[index]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def real(value):
            if isinstance(value, LazyTensor):
                return value.materialize()
            if isinstance(value, (list, tuple)):
                return type(value)(real(v) for v in value)
            return value

        return func(*real(args), **{k: real(v) for k, v in (kwargs or {}).items()})

    def __repr__(self) -> str:
        return f"LazyTensor({self.name}, box={self.box}, dtype={self.dtype})"


def materialize(value) -> torch.Tensor:
    """``value`` as a tensor (a :class:`LazyTensor` is read)."""
    return value.materialize() if isinstance(value, LazyTensor) else value
