"""Builds attnzoo's optional C++ ops (attnzoo/csrc -> attnzoo._C: quantised linears on GGUF blocks, paged
decode attention) against the torch in the build environment; the metadata is in pyproject.toml. `make` installs with --no-build-isolation so
the extension is built against the venv's torch.

The extension is optional: without torch at build time, without a C++ compiler, or if compiling fails, the
package installs without it (with a warning) and `attnzoo.ops.quant_kernels.HAVE_KERNEL` is False.
ATTNZOO_NO_EXT=1 skips it on purpose. On x86-64 the AVX2 and AVX-512 kernels are separate translation units
with their own -m flags (one compile per file, hence no ninja); the op picks one at run time from cpuid and
never runs code the CPU lacks. Elsewhere only the portable kernels are built.
"""

from __future__ import annotations

import os
import platform
import sys
import warnings

from setuptools import setup

CSRC = "attnzoo/csrc"
X86 = platform.machine().lower() in ("x86_64", "amd64")
AVX512 = ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
ISA_FLAGS = {"qkernel_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"], "qkernel_avx512.cpp": AVX512,
             "qkernel_avx512_vnni.cpp": [*AVX512, "-mavx512vnni"]}


def _skip(why: str) -> None:
    warnings.warn(f"attnzoo: {why}; installing without the C++ kernels (the PyTorch path runs instead)", stacklevel=2)


def extensions() -> dict:
    if os.environ.get("ATTNZOO_NO_EXT"):
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # noqa: BLE001 - no torch (or a broken one) at build time: build without the ops
        _skip(f"torch is not importable at build time ({e})")
        return {}

    class OptionalBuild(BuildExtension.with_options(use_ninja=False)):
        """BuildExtension that adds each ISA file's -m flags and turns a failed build into a warning."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - no compiler, a compile error: the ops are optional
                _skip(f"building attnzoo._C failed ({type(e).__name__}: {e})")

        def build_extension(self, ext) -> None:
            compile_one = self.compiler._compile

            def with_isa_flags(obj, src, ext_, cc_args, extra_postargs, pp_opts):
                flags = ISA_FLAGS.get(os.path.basename(src), [])
                if isinstance(extra_postargs, dict):
                    extra_postargs = {**extra_postargs, "cxx": [*extra_postargs.get("cxx", []), *flags]}
                else:
                    extra_postargs = [*extra_postargs, *flags]
                return compile_one(obj, src, ext_, cc_args, extra_postargs, pp_opts)

            self.compiler._compile = with_isa_flags
            try:
                super().build_extension(ext)
            finally:
                self.compiler._compile = compile_one

    sources = ["qlinear.cpp", "qkernel_scalar.cpp", "paged_attn.cpp"] + (list(ISA_FLAGS) if X86 else [])
    # at::parallel_for is inline OpenMP in torch's headers: without -fopenmp it runs on one thread (the library
    # then resolves to the libgomp torch has loaded)
    omp = ["-fopenmp"] if torch._C.has_openmp and sys.platform.startswith("linux") else []
    ext = CppExtension("attnzoo._C", [f"{CSRC}/{s}" for s in sources], extra_compile_args=["-O3", *omp],
                       extra_link_args=omp, define_macros=[("ATTNZOO_X86", "1")] if X86 else [])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuild}}


setup(**extensions())
