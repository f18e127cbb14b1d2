"""A fast, read-only GGUF file reader: all metadata as Python values, tensors as views of the file.

`gguf.GGUFReader` builds numpy views for every metadata item, which takes seconds for a 262k-token
vocabulary. `GGUFFile` parses the header directly (v2/v3, little-endian) in well under a second:

* `metadata`: every key -> str, int, float, bool, or a list of those (nested arrays stay nested);
* `tensors`: `GGUFTensor`s, whose `data` is a read-only uint8 view of exactly the tensor's bytes in
  the memory-mapped file (nothing is read until it is used).

Every offset and length is checked against the file size, so a truncated or garbage file raises
`CorruptModelError` naming the file and the problem instead of reading out of bounds.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from ember.errors import CorruptModelError, UnsupportedModelError

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_MAX_DIMS = 4  # ggml tensors have at most 4 dimensions
_MAX_NESTING = 16  # arrays of arrays of ...: a deeper nest is garbage, not a model

_V = GGUFValueType
# Fixed-size value types: (struct for one value, numpy dtype for an array of them), little-endian.
_SCALARS: dict[int, tuple[struct.Struct, np.dtype]] = {
    int(vtype): (struct.Struct("<" + code), np.dtype("<" + code if code != "?" else "?"))
    for vtype, code in (
        (_V.UINT8, "B"), (_V.INT8, "b"), (_V.UINT16, "H"), (_V.INT16, "h"), (_V.UINT32, "I"), (_V.INT32, "i"),
        (_V.FLOAT32, "f"), (_V.BOOL, "?"), (_V.UINT64, "Q"), (_V.INT64, "q"), (_V.FLOAT64, "d"),
    )
}  # fmt: skip
_STRING, _ARRAY = int(_V.STRING), int(_V.ARRAY)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ARRAY_HEADER = struct.Struct("<IQ")  # item type, item count
_TENSOR_TAIL = struct.Struct("<IQ")  # ggml type, data offset


@dataclass(eq=False)
class GGUFTensor:
    """One tensor of a GGUF file.

    `shape` is the row-major (torch) shape, i.e. the GGUF dims reversed. `data` is a read-only uint8
    view of the tensor's bytes in the mapped file (quantized blocks, or the raw F32/F16/... values).
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray
    offset: int  # absolute byte offset of the data in the file

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class GGUFFile:
    """An open GGUF file: `metadata` (all key/values), `tensors` (list of `GGUFTensor`), `get(key)`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                self._fail("the file is empty")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = len(self._map)
        self.metadata: dict[str, Any] = {}
        self.tensors: list[GGUFTensor] = []
        try:
            self._parse()
        except (struct.error, ValueError, OverflowError, IndexError, RecursionError) as e:
            # Every read is bounds-checked first; this is a safety net for anything we missed.
            self._fail(f"{type(e).__name__}: {e}")

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}: v{self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"

    # -- parsing ----------------------------------------------------------------------------------

    def _fail(self, problem: str) -> NoReturn:
        raise CorruptModelError(f"{self.path}: not a readable GGUF file: {problem}")

    def _need(self, pos: int, n: int, what: str) -> int:
        """The end of `n` bytes at `pos`, after checking they are inside the file."""
        end = pos + n
        if end > self.size:
            self._fail(f"{what} runs past the end of the file (truncated?)")
        return end

    def _parse(self) -> None:
        buf = self._map
        if self.size < 4 or buf[:4] != _MAGIC:
            self._fail("bad magic bytes (not a GGUF file)")
        self._need(0, 24, "the header")
        (version,) = _U32.unpack_from(buf, 4)
        if version not in _VERSIONS:
            if struct.unpack_from(">I", buf, 4)[0] in _VERSIONS:
                raise UnsupportedModelError(f"{self.path}: big-endian GGUF files are not supported")
            raise UnsupportedModelError(
                f"{self.path}: GGUF version {version} is not supported (ember reads versions 2 and 3)"
            )
        self.version = version
        tensor_count, kv_count = struct.unpack_from("<QQ", buf, 8)
        pos = 24

        for i in range(kv_count):
            key, pos = self._string(pos, f"metadata key #{i}")
            pos = self._need(pos, 4, f"metadata {key!r}")
            (vtype,) = _U32.unpack_from(buf, pos - 4)
            if key in self.metadata:
                self._fail(f"metadata key {key!r} appears twice")
            self.metadata[key], pos = self._value(vtype, pos, f"metadata {key!r}", 0)

        alignment = self.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            self._fail(f"general.alignment must be a positive power of two, not {alignment!r}")
        self.alignment = alignment

        infos = []
        for i in range(tensor_count):
            what = f"tensor info #{i}"
            name, pos = self._string(pos, what)
            what = f"tensor info of {name}"
            pos = self._need(pos, 4, what)
            (n_dims,) = _U32.unpack_from(buf, pos - 4)
            if n_dims > _MAX_DIMS:
                self._fail(f"tensor {name} has {n_dims} dimensions (at most {_MAX_DIMS})")
            end = self._need(pos, 8 * n_dims + _TENSOR_TAIL.size, what)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos) if n_dims else ()
            pos = end
            raw_type, offset = _TENSOR_TAIL.unpack_from(buf, pos - _TENSOR_TAIL.size)
            infos.append((name, dims, raw_type, offset))
        self.data_offset = -(-pos // alignment) * alignment

        names: set[str] = set()
        for name, dims, raw_type, offset in infos:
            if name in names:
                self._fail(f"tensor {name} appears twice")
            names.add(name)
            self.tensors.append(self._tensor(name, dims, raw_type, offset))

    def _tensor(self, name: str, dims: tuple[int, ...], raw_type: int, offset: int) -> GGUFTensor:
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise UnsupportedModelError(f"{self.path}: tensor {name} has unknown GGML type number {raw_type}") from None
        sizes = GGML_QUANT_SIZES.get(qtype)
        if sizes is None:
            raise UnsupportedModelError(f"{self.path}: tensor {name} has GGML type {qtype.name} of unknown size")
        block_size, type_size = sizes
        if dims and dims[0] % block_size:
            self._fail(
                f"tensor {name}: row length {dims[0]} is not a multiple of the {qtype.name} block size {block_size}"
            )
        if offset % self.alignment:
            self._fail(f"tensor {name}: data offset {offset} is not a multiple of the alignment {self.alignment}")
        n_bytes = math.prod(dims) // block_size * type_size
        start = self.data_offset + offset
        end = self._need(start, n_bytes, f"tensor {name}")
        if n_bytes:
            data = np.frombuffer(self._map, dtype=np.uint8, count=n_bytes, offset=start)
        else:
            data = np.empty(0, dtype=np.uint8)
        data.flags.writeable = False
        return GGUFTensor(name=name, qtype=qtype, shape=tuple(reversed(dims)), data=data, offset=start)

    def _string(self, pos: int, what: str) -> tuple[str, int]:
        end = self._need(pos, 8, what)
        (n,) = _U64.unpack_from(self._map, pos)
        end = self._need(end, n, what)
        try:
            return self._map[pos + 8 : end].decode("utf-8"), end
        except UnicodeDecodeError as e:
            self._fail(f"{what} is not valid UTF-8 ({e})")

    def _value(self, vtype: int, pos: int, what: str, depth: int) -> tuple[Any, int]:
        buf = self._map
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            end = self._need(pos, scalar[0].size, what)
            return scalar[0].unpack_from(buf, pos)[0], end
        if vtype == _STRING:
            return self._string(pos, what)
        if vtype != _ARRAY:
            self._fail(f"{what} has unknown value type {vtype}")
        if depth >= _MAX_NESTING:
            self._fail(f"{what}: arrays nested more than {_MAX_NESTING} deep")
        pos = self._need(pos, _ARRAY_HEADER.size, what)
        item_type, n = _ARRAY_HEADER.unpack_from(buf, pos - _ARRAY_HEADER.size)
        scalar = _SCALARS.get(item_type)
        if scalar is not None:
            dtype = scalar[1]
            end = self._need(pos, n * dtype.itemsize, what)
            return (np.frombuffer(buf, dtype=dtype, count=n, offset=pos).tolist() if n else []), end
        if item_type == _STRING:
            return self._string_array(pos, n, what)
        if item_type == _ARRAY:
            self._need(pos, n * _ARRAY_HEADER.size, what)  # each item has at least an array header
            items = []
            for i in range(n):
                item, pos = self._value(_ARRAY, pos, f"{what}[{i}]", depth + 1)
                items.append(item)
            return items, pos
        self._fail(f"{what} is an array of unknown value type {item_type}")

    def _string_array(self, pos: int, n: int, what: str) -> tuple[list[str], int]:
        """n strings from pos: the hot loop of a large vocabulary, so bounds are checked inline."""
        buf, size, unpack = self._map, self.size, _U64.unpack_from
        if pos + 8 * n > size:
            self._fail(f"{what} runs past the end of the file (truncated?)")
        items = []
        append = items.append
        try:
            for _ in range(n):
                start = pos + 8
                if start > size:
                    break
                pos = start + unpack(buf, pos)[0]
                if pos > size:
                    break
                append(buf[start:pos].decode("utf-8"))
        except UnicodeDecodeError as e:
            self._fail(f"{what}[{len(items)}] is not valid UTF-8 ({e})")
        if len(items) < n:
            self._fail(f"{what} runs past the end of the file (truncated?)")
        return items, pos
