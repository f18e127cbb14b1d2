"""Which CPUs a kernel is built for (ember/kernels/build.py): one feature set, or alternatives."""

from __future__ import annotations

from ember.kernels import build


def test_cpu_supports_one_set_or_any_alternative(monkeypatch):
    monkeypatch.setattr(build, "_cpu_flags", lambda: {"sse2", "avx2", "fma", "f16c"})
    assert build.cpu_supports("avx2")
    assert build.cpu_supports("avx2 fma f16c")
    assert not build.cpu_supports("avx2 avx512f")
    assert build.cpu_supports(("avx512_vnni avx512bw", "avx2 fma"))
    assert not build.cpu_supports(("avx512_vnni", "avx2 sse4_2"))


def test_an_unsupported_cpu_builds_nothing(monkeypatch):
    monkeypatch.setattr(build, "_cpu_flags", lambda: {"sse2"})
    monkeypatch.setattr(build, "_build_or_load", lambda name: (_ for _ in ()).throw(AssertionError("built")))
    assert build.load_kernel.__wrapped__("quant_linear", ("avx512_vnni", "avx2 fma f16c")) is None
