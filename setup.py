"""Build hooks that pyproject.toml cannot express.

* cffi extensions: every ``<package>/_cffi_build*.py`` that defines ``ffibuilder``
  is compiled by ``pip install .`` (and in place by ``pip install -e .``).
* native helpers: every ``<package>/_native_build.py`` that defines
  ``build(build_lib: str, inplace: bool) -> None`` is called from ``build_ext``
  (the static guest agent is built this way).
"""

from __future__ import annotations

import glob
import importlib.util
import os

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ("netstack", "microvm", "rootfs", "tls_proxy")


def _cffi_modules() -> list[str]:
    found = []
    for pkg in PACKAGES:
        for path in sorted(glob.glob(os.path.join(pkg, "_cffi_build*.py"))):
            found.append(f"{path}:ffibuilder")
    return found


class BuildExtWithNative(build_ext):
    """build_ext that also runs each package's ``_native_build.build``."""

    def run(self) -> None:
        super().run()
        for pkg in PACKAGES:
            path = os.path.join(HERE, pkg, "_native_build.py")
            if not os.path.exists(path):
                continue
            spec = importlib.util.spec_from_file_location(f"{pkg}._native_build", path)
            assert spec and spec.loader
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            mod.build(self.build_lib, bool(self.inplace or getattr(self, "editable_mode", False)))


setup(cffi_modules=_cffi_modules(), cmdclass={"build_ext": BuildExtWithNative})
