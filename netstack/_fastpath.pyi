"""Type stub of the cffi extension built from netstack/_cffi_build.py."""

from typing import Any

ffi: Any
lib: Any
