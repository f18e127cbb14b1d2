"""Small compiled CPU kernels, built just-in-time with torch.utils.cpp_extension, each with a pure
PyTorch fallback that is used when the kernel cannot be built or does not apply."""

from ember.kernels.gemv import linear

__all__ = ["linear"]
