"""Build step beyond pyproject.toml: the optional CPU runtime's C code, the few-row matrix kernel
(duo_common/_packed_gemm.c) and the operations between a decoder layer's products (duo_common/_decoder_ops.c).

Both are optional: where they cannot be built (no C compiler, not x86-64) duo installs and runs on torch's
own kernels (duo.common.packed_linear reports which is in use)."""

import platform

from setuptools import Extension, setup

extensions = []
if platform.machine().lower() in ("x86_64", "amd64") and platform.system() == "Linux":
    # -ffp-contract=off: every multiply and add rounds as written (the numerics the sources describe)
    extensions += [Extension(f"duo.common.{name}", [f"duo_common/{name}.c"], depends=["duo_common/_packed_gemm_api.h"],
                             extra_compile_args=["-O3", "-ffp-contract=off"], optional=True)
                   for name in ("_packed_gemm", "_decoder_ops")]

setup(ext_modules=extensions)
