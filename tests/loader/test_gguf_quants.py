"""ember's GGUF dequantization against the reference in `gguf.quants.dequantize`.

The comparisons are exact: ember does the same float32 operations as the reference in the same order
(e.g. Q4_K is (d * scale) * q - dmin * min, never a fused multiply-add), so every value must match bit
for bit. A mismatch would mean a wrong bit layout, not rounding.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from ember.errors import CorruptModelError, UnsupportedModelError
from ember.loader.gguf_quants import SUPPORTED_TYPES, dequantize

# Byte offsets of each block's fp16 scale fields: random bytes there could be NaN/inf, so they are
# overwritten with finite values; every other byte stays random to exercise all bit patterns.
_FP16_FIELDS = {T.Q8_0: (0,), T.Q5_0: (0,), T.Q4_K: (0, 2), T.Q6_K: (208,)}


def _reference(raw: np.ndarray, qtype: T, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, qtype))).reshape(shape)


def _assert_same(raw: np.ndarray, qtype: T, shape: tuple[int, ...]) -> None:
    got = dequantize(raw, qtype, shape)
    assert got.dtype == torch.float32 and got.shape == shape
    want = _reference(raw, qtype, shape)
    assert torch.isfinite(want).all()
    assert torch.equal(got, want), f"{qtype.name}: max abs diff {(got - want).abs().max().item()}"


def _random_blocks(rng: np.random.Generator, qtype: T, rows: int, blocks_per_row: int) -> np.ndarray:
    """Random valid data for (rows, blocks_per_row * block_size) values, laid out as GGUFReader gives it."""
    type_size = GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, size=(rows * blocks_per_row, type_size), dtype=np.uint8)
    for offset in _FP16_FIELDS[qtype]:
        scale = (rng.standard_normal(len(blocks)) * 0.05).astype(np.float16)
        blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, blocks_per_row * type_size)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_random_blocks_match_reference(qtype: T) -> None:
    rng = np.random.default_rng(int(qtype))
    block_size = GGML_QUANT_SIZES[qtype][0]
    # 3 rows, more blocks than one dequantization chunk, so chunk boundaries are covered too.
    blocks_per_row = (1 << 20) // block_size + 5
    _assert_same(_random_blocks(rng, qtype, 3, blocks_per_row), qtype, (3, blocks_per_row * block_size))


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q5_0, T.BF16], ids=lambda t: t.name)
def test_quantized_floats_match_reference(qtype: T) -> None:
    values = np.random.default_rng(1).standard_normal((4, 8, 256)).astype(np.float32)
    raw = gguf.quants.quantize(values, qtype)
    _assert_same(raw, qtype, values.shape)


def test_plain_floats() -> None:
    values = np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)
    assert torch.equal(dequantize(values, T.F32, (5, 64)), torch.from_numpy(values))
    half = values.astype(np.float16)
    assert torch.equal(dequantize(half, T.F16, (5, 64)), torch.from_numpy(half.astype(np.float32)))
    # Bytes as GGUFReader exposes F16/F32 data of another shape (it only matters that they are row-major).
    flat = dequantize(half.view(np.uint8), T.F16, (320,))
    assert torch.equal(flat, torch.from_numpy(half.astype(np.float32)).reshape(-1))


def test_written_file_roundtrip(tmp_path) -> None:
    """What GGUFReader hands out for each type (BF16 arrives as uint8 bytes) dequantizes correctly."""
    rng = np.random.default_rng(3)
    values = rng.standard_normal((6, 64)).astype(np.float32)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "test")
    writer.add_tensor("f32", values)
    writer.add_tensor("f16", values.astype(np.float16))
    for qtype in (T.BF16, T.Q8_0, T.Q5_0):
        writer.add_tensor(qtype.name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.add_tensor("Q4_K", _random_blocks(rng, T.Q4_K, 6, 1), raw_dtype=T.Q4_K)
    writer.add_tensor("Q6_K", _random_blocks(rng, T.Q6_K, 6, 1), raw_dtype=T.Q6_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    tensors = gguf.GGUFReader(path).tensors
    assert {t.tensor_type for t in tensors} == set(SUPPORTED_TYPES)
    for t in tensors:
        shape = tuple(reversed([int(d) for d in t.shape]))
        got = dequantize(t.data, t.tensor_type, shape)
        assert torch.equal(got, _reference(t.data, t.tensor_type, shape)), t.name
        if t.tensor_type == T.F32:
            assert torch.equal(got, torch.from_numpy(values))


@pytest.fixture(scope="module")
def default_model_tensors() -> list:
    from ember.model_zoo import default_model_path

    return gguf.GGUFReader(default_model_path()).tensors


@pytest.mark.slow
def test_default_model_matches_reference(default_model_tensors: list) -> None:
    # The smallest tensor of each type keeps the (slow) numpy reference cheap.
    smallest: dict[T, object] = {}
    for t in default_model_tensors:
        if t.tensor_type not in smallest or t.n_bytes < smallest[t.tensor_type].n_bytes:
            smallest[t.tensor_type] = t
    assert {T.F32, T.Q5_0, T.Q4_K, T.Q8_0, T.Q6_K} <= set(smallest)
    for qtype, t in smallest.items():
        shape = tuple(reversed([int(d) for d in t.shape]))
        got = dequantize(t.data, qtype, shape)
        assert torch.equal(got, _reference(t.data, qtype, shape)), t.name


@pytest.mark.slow
def test_default_model_token_embedding_rows(default_model_tensors: list) -> None:
    """The big Q8_0 embedding: a slice of rows vs the reference (the full reference would take seconds)."""
    t = next(t for t in default_model_tensors if t.name == "token_embd.weight")
    shape = tuple(reversed([int(d) for d in t.shape]))
    got = dequantize(t.data, t.tensor_type, shape)
    assert got.shape == shape
    for rows in (slice(0, 64), slice(shape[0] - 64, shape[0])):
        want = _reference(t.data[rows], t.tensor_type, (64, shape[1]))
        assert torch.equal(got[rows], want)


def test_unsupported_type_is_named() -> None:
    raw = np.zeros((1, GGML_QUANT_SIZES[T.Q3_K][1]), dtype=np.uint8)
    expected = r"Q3_K is not supported \(supported: F32, F16, BF16, Q8_0, Q5_0, Q4_K, Q6_K\)"
    with pytest.raises(UnsupportedModelError, match=expected):
        dequantize(raw, T.Q3_K, (1, 256))


@pytest.mark.parametrize(
    ("qtype", "n_bytes", "shape"),
    [
        (T.Q8_0, 33, (1, 32)),  # one byte short of a block
        (T.Q4_K, 144, (2, 256)),  # one row missing
        (T.Q6_K, 210, (1, 128)),  # row is not a whole number of blocks
        (T.F32, 12, (4,)),
    ],
    ids=lambda p: getattr(p, "name", None),
)
def test_wrong_byte_count_is_corrupt(qtype: T, n_bytes: int, shape: tuple[int, ...]) -> None:
    with pytest.raises(CorruptModelError, match=qtype.name):
        dequantize(np.zeros(n_bytes, dtype=np.uint8), qtype, shape)


def test_raw_data_is_not_modified() -> None:
    raw = _random_blocks(np.random.default_rng(4), T.Q4_K, 2, 2)
    raw.flags.writeable = False  # like the GGUF mmap: any write would raise
    before = raw.copy()
    dequantize(raw, T.Q4_K, (2, 512))
    assert np.array_equal(raw, before)
