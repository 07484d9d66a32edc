"""Build step beyond pyproject.toml: the optional CPU matrix kernel (duo_common/_packed_gemm.c).

It is optional: where it cannot be built (no C compiler, not x86-64) duo installs and runs on torch's own
kernels (duo_common.packed_linear reports which is in use)."""

import platform

from setuptools import Extension, setup

extensions = []
if platform.machine().lower() in ("x86_64", "amd64") and platform.system() == "Linux":
    extensions.append(Extension("duo_common._packed_gemm", ["duo_common/_packed_gemm.c"],
                                extra_compile_args=["-O3", "-ffp-contract=off"], optional=True))

setup(ext_modules=extensions)
