"""ember's GGUF reader (`GGUFFile`) against the reference reader, `gguf.GGUFReader`.

Same metadata values for every key, same tensor names, types and shapes, and the same bytes for every
tensor; and a truncated, damaged or random file gives one clear error, never a crash or a wrong read.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFValueType as V

from ember.errors import CorruptModelError, EmberError, UnsupportedModelError
from ember.loader.gguf_file import GGUFFile
from ember.loader.gguf_quants import SUPPORTED_TYPES, dequantize
from ember.model_zoo import default_model_path

# Metadata of every value type: key -> (value, type, item type of an array).
METADATA = {
    "test.u8": (200, V.UINT8, None),
    "test.i8": (-100, V.INT8, None),
    "test.u16": (60000, V.UINT16, None),
    "test.i16": (-30000, V.INT16, None),
    "test.u32": (4_000_000_000, V.UINT32, None),
    "test.i32": (-2_000_000_000, V.INT32, None),
    "test.f32": (0.1, V.FLOAT32, None),
    "test.bool_true": (True, V.BOOL, None),
    "test.bool_false": (False, V.BOOL, None),
    "test.string": ("héllo ▁wörld 😀", V.STRING, None),
    "test.empty_string": ("", V.STRING, None),
    "test.u64": (2**63 + 5, V.UINT64, None),
    "test.i64": (-(2**62), V.INT64, None),
    "test.f64": (1 / 3, V.FLOAT64, None),
    "test.arr_u8": ([0, 1, 255], V.ARRAY, V.UINT8),
    "test.arr_i8": ([-128, 0, 127], V.ARRAY, V.INT8),
    "test.arr_u16": ([0, 65535], V.ARRAY, V.UINT16),
    "test.arr_i16": ([-32768, 32767], V.ARRAY, V.INT16),
    "test.arr_u32": ([0, 2**32 - 1], V.ARRAY, V.UINT32),
    "test.arr_i32": ([-(2**31), 2**31 - 1, 7], V.ARRAY, V.INT32),
    "test.arr_f32": ([0.5, -1.25, 3.1], V.ARRAY, V.FLOAT32),
    "test.arr_bool": ([True, False, True], V.ARRAY, V.BOOL),
    "test.arr_u64": ([0, 2**64 - 1], V.ARRAY, V.UINT64),
    "test.arr_i64": ([-(2**63), 2**63 - 1], V.ARRAY, V.INT64),
    "test.arr_f64": ([1e300, -2.5], V.ARRAY, V.FLOAT64),
    "test.arr_string": (["a", "", "▁b c", "<0x0A>", "日本語"], V.ARRAY, V.STRING),
    "test.nested_ints": ([[1, 2, 3], [4], [5, 6]], V.ARRAY, V.ARRAY),
    "test.nested_strings": ([["x", "yz"], ["w"]], V.ARRAY, V.ARRAY),
    "test.nested_deep": ([[[1.5], [2.5, 3.5]], [[4.5]]], V.ARRAY, V.ARRAY),
}
NESTED = {key for key, (_, vtype, item) in METADATA.items() if item == V.ARRAY}

# Q4_K/Q6_K cannot be quantized by gguf.quants: random blocks with finite fp16 scales stand in.
_FP16_FIELDS = {T.Q4_K: (0, 2), T.Q6_K: (208,)}


def _random_blocks(rng: np.random.Generator, qtype: T, rows: int, cols: int) -> np.ndarray:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    for offset in _FP16_FIELDS[qtype]:
        scale = (rng.standard_normal(len(blocks)) * 0.05).astype(np.float16)
        blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // block_size * type_size)


def _write_gguf(path: Path, alignment: int | None = None) -> None:
    """A small GGUF with metadata of every value type and tensors of several types and ranks."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((6, 256)).astype(np.float32)
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, (value, vtype, item) in METADATA.items():
        writer.add_key_value(key, value, vtype, sub_type=item if item != V.ARRAY else None)
    writer.add_tensor("f32_2d", values)
    writer.add_tensor("f32_3d", rng.standard_normal((2, 3, 4)).astype(np.float32))
    writer.add_tensor("f32_4d", rng.standard_normal((2, 1, 3, 4)).astype(np.float32))
    writer.add_tensor("f16_1d", rng.standard_normal(10).astype(np.float16))
    writer.add_tensor("f64", rng.standard_normal((3, 2)))
    writer.add_tensor("i8", rng.integers(-128, 128, size=(3, 5), dtype=np.int8))
    writer.add_tensor("i32", rng.integers(-(2**31), 2**31, size=(7,), dtype=np.int32))
    for qtype in (T.BF16, T.Q8_0, T.Q5_0):
        writer.add_tensor(qtype.name.lower(), gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    for qtype in (T.Q4_K, T.Q6_K):
        writer.add_tensor(qtype.name.lower(), _random_blocks(rng, qtype, 6, 512), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _flatten(value: object) -> list:
    """GGUFReader flattens nested arrays (see the FIXME in its `_get_field_parts`): compare that way."""
    if not isinstance(value, list):
        return [value]
    return [leaf for item in value for leaf in _flatten(item)]


def _assert_same_as_reader(ours: GGUFFile, reader: gguf.GGUFReader) -> None:
    reference = {key: field for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert list(ours.metadata) == list(reference)  # same keys, in file order
    for key, field in reference.items():
        value = ours.metadata[key]
        if field.types[:2] == [V.ARRAY, V.ARRAY]:
            value = _flatten(value)
        expected = field.contents()
        assert value == expected, key
        assert type(value) is type(expected), key
        if isinstance(value, list) and value:
            assert [type(v) for v in value] == [type(v) for v in expected], key
    assert ours.version == int(reader.fields["GGUF.version"].contents())
    assert ours.alignment == reader.alignment and ours.data_offset == reader.data_offset
    assert [t.name for t in ours.tensors] == [t.name for t in reader.tensors]
    for mine, ref in zip(ours.tensors, reader.tensors):
        assert mine.qtype == ref.tensor_type, mine.name
        assert isinstance(mine.qtype, T)
        assert mine.shape == tuple(reversed([int(d) for d in ref.shape])), mine.name
        assert mine.n_elements == ref.n_elements
        assert mine.offset == ref.data_offset
        assert mine.data.dtype == np.uint8 and mine.data.ndim == 1 and not mine.data.flags.writeable
        assert mine.data.nbytes == ref.n_bytes
        assert mine.data.tobytes() == ref.data.tobytes(), mine.name


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    _write_gguf(path)
    return path


def test_tiny_file_matches_gguf_reader(tiny: Path) -> None:
    ours = GGUFFile(tiny)
    _assert_same_as_reader(ours, gguf.GGUFReader(tiny))
    # Nested arrays keep their structure (GGUFReader's contents() flattens them).
    for key in NESTED:
        assert ours.metadata[key] == METADATA[key][0], key
    assert ours.get("test.string") == "héllo ▁wörld 😀"
    assert ours.get("no.such.key") is None and ours.get("no.such.key", 3) == 3
    assert {t.qtype for t in ours.tensors} >= set(SUPPORTED_TYPES) | {T.F64, T.I8, T.I32}


def test_custom_alignment_is_honored(tmp_path: Path) -> None:
    path = tmp_path / "aligned.gguf"
    _write_gguf(path, alignment=256)
    ours = GGUFFile(path)
    assert ours.alignment == 256 and ours.data_offset % 256 == 0
    assert all(t.offset % 256 == 0 for t in ours.tensors)
    _assert_same_as_reader(ours, gguf.GGUFReader(path))


def test_tensor_data_dequantizes_like_reader_data(tiny: Path) -> None:
    """dequantize takes GGUFTensor.data (flat bytes) and gives what it gives for GGUFReader's arrays."""
    reader_tensors = {t.name: t for t in gguf.GGUFReader(tiny).tensors}
    for tensor in GGUFFile(tiny).tensors:
        if tensor.qtype not in SUPPORTED_TYPES:
            continue
        ref = reader_tensors[tensor.name]
        got = dequantize(tensor.data, tensor.qtype, tensor.shape)
        want = dequantize(ref.data, ref.tensor_type, tensor.shape)
        assert got.shape == tensor.shape and torch.equal(got, want), tensor.name
        reference = np.asarray(gguf.quants.dequantize(ref.data, ref.tensor_type), dtype=np.float32)
        assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(reference)).reshape(tensor.shape))


def _tensor_info_at(raw: bytes, name: str) -> int:
    """Offset of the tensor info of `name` (its name's length field)."""
    encoded = name.encode()
    return raw.index(struct.pack("<Q", len(encoded)) + encoded)


def test_every_cut_before_the_data_is_corrupt(tiny: Path, tmp_path: Path) -> None:
    """A file cut anywhere in the header, metadata, tensor infos or before the last tensor's end."""
    raw = tiny.read_bytes()
    ours = GGUFFile(tiny)
    info_start = _tensor_info_at(raw, ours.tensors[0].name)
    last = max(ours.tensors, key=lambda t: t.offset + t.data.nbytes)
    data_end = last.offset + last.data.nbytes
    cut = tmp_path / "cut.gguf"
    cuts = [*range(0, info_start, 7), *range(info_start, ours.data_offset + 1), data_end - 1]
    for size in cuts:
        cut.write_bytes(raw[:size])
        with pytest.raises(CorruptModelError, match=r"cut\.gguf: not a readable GGUF file: ") as e:
            GGUFFile(cut)
        if size >= 24:
            assert "truncated?" in str(e.value), (size, str(e.value))


def test_cut_inside_tensor_infos_is_reported(tiny: Path, tmp_path: Path) -> None:
    raw = tiny.read_bytes()
    at = _tensor_info_at(raw, "q8_0")
    path = tmp_path / "cut.gguf"
    path.write_bytes(raw[: at + 10])  # inside the name q8_0
    with pytest.raises(CorruptModelError, match=r"cut\.gguf.*tensor info #\d+ runs past the end of the file"):
        GGUFFile(path)
    path.write_bytes(raw[: at + 8 + 4 + 4])  # inside q8_0's dims
    with pytest.raises(CorruptModelError, match=r"tensor info of q8_0 runs past the end of the file \(truncated\?\)"):
        GGUFFile(path)


def test_random_bytes_are_corrupt(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    path = tmp_path / "random.gguf"
    for size in (0, 3, 100, 4096):
        path.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        with pytest.raises(CorruptModelError, match="random.gguf"):
            GGUFFile(path)
    # A valid header followed by garbage: the counts and lengths are garbage too.
    for _ in range(50):
        body = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
        path.write_bytes(b"GGUF" + struct.pack("<I", 3) + body)
        with pytest.raises(CorruptModelError, match="random.gguf"):
            GGUFFile(path)


def test_damaged_bytes_never_crash(tiny: Path, tmp_path: Path) -> None:
    """Random byte damage in the header/metadata/tensor infos: opens, or raises an EmberError."""
    raw = tiny.read_bytes()
    end = GGUFFile(tiny).data_offset
    rng = np.random.default_rng(6)
    path = tmp_path / "damaged.gguf"
    for _ in range(300):
        damaged = bytearray(raw)
        for at in rng.integers(4, end, size=3):
            damaged[at] = int(rng.integers(0, 256))
        path.write_bytes(bytes(damaged))
        try:
            opened = GGUFFile(path)
        except EmberError as e:
            assert "damaged.gguf" in str(e)
        else:
            for tensor in opened.tensors:
                assert tensor.offset + tensor.data.nbytes <= len(damaged)


def test_unknown_tensor_type_is_named(tiny: Path, tmp_path: Path) -> None:
    raw = bytearray(tiny.read_bytes())
    at = _tensor_info_at(bytes(raw), "f32_2d") + 8 + len("f32_2d")
    (n_dims,) = struct.unpack_from("<I", raw, at)
    struct.pack_into("<I", raw, at + 4 + 8 * n_dims, 1234)
    path = tmp_path / "unknown.gguf"
    path.write_bytes(bytes(raw))
    with pytest.raises(UnsupportedModelError, match="unknown.gguf: tensor f32_2d has unknown GGML type number 1234"):
        GGUFFile(path)


def test_bad_version_and_magic(tiny: Path, tmp_path: Path) -> None:
    raw = tiny.read_bytes()
    path = tmp_path / "v.gguf"
    path.write_bytes(raw[:4] + struct.pack("<I", 1) + raw[8:])
    with pytest.raises(UnsupportedModelError, match="version 1"):
        GGUFFile(path)
    path.write_bytes(raw[:4] + struct.pack(">I", 3) + raw[8:])
    with pytest.raises(UnsupportedModelError, match="big-endian"):
        GGUFFile(path)
    path.write_bytes(b"GGUG" + raw[4:])
    with pytest.raises(CorruptModelError, match="bad magic"):
        GGUFFile(path)


# -- the default model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_model() -> tuple[str, GGUFFile, gguf.GGUFReader]:
    path = default_model_path()
    start = time.perf_counter()
    ours = GGUFFile(path)
    seconds = time.perf_counter() - start
    print(f"\nGGUFFile opened {os.path.basename(path)} in {seconds:.3f} s")
    return path, ours, gguf.GGUFReader(path)


@pytest.mark.slow
def test_default_model_matches_gguf_reader(default_model: tuple[str, GGUFFile, gguf.GGUFReader]) -> None:
    _, ours, reader = default_model
    _assert_same_as_reader(ours, reader)
    assert len(ours.get("tokenizer.ggml.tokens")) == 262144
    assert ours.get("general.architecture") == "gemma3"


@pytest.mark.slow
def test_default_model_open_time(default_model: tuple[str, GGUFFile, gguf.GGUFReader]) -> None:
    path = default_model[0]
    start = time.perf_counter()
    GGUFFile(path)
    print(f"\nGGUFFile({os.path.basename(path)}): {time.perf_counter() - start:.3f} s")


@pytest.mark.slow
def test_default_model_truncated(default_model: tuple[str, GGUFFile, gguf.GGUFReader], tmp_path: Path) -> None:
    path, ours, _ = default_model
    truncated = tmp_path / "truncated.gguf"
    with open(path, "rb") as f:
        truncated.write_bytes(f.read(50_000_000))
    # The first tensor to run past 50 MB is named.
    victim = next(t for t in ours.tensors if t.offset + t.data.nbytes > 50_000_000)
    pattern = rf"truncated\.gguf: not a readable GGUF file: tensor {victim.name} runs past the end of the file"
    with pytest.raises(CorruptModelError, match=pattern):
        GGUFFile(truncated)
    # Cut inside the tensor-info section.
    with open(path, "rb") as f:
        head = f.read(ours.data_offset)
    name = ours.tensors[len(ours.tensors) // 2].name
    truncated.write_bytes(head[: _tensor_info_at(head, name) + 8 + len(name) + 4 + 6])  # inside its dims
    with pytest.raises(CorruptModelError, match=rf"tensor info of {name} runs past the end of the file \(truncated\?\)"):
        GGUFFile(truncated)
