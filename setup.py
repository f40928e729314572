# The cffi extension modules are compiled against the system's kernel headers at install
# time (API mode); everything else about the package lives in pyproject.toml.
from setuptools import setup

setup(
    cffi_modules=[
        "pymvm/kvm/_build.py:ffibuilder",
        "pymvm/vhost/_build.py:ffibuilder",
        "pymvm/boot/_build.py:ffibuilder",
        "pymvm/syscalls/_build.py:ffibuilder",
    ],
)
