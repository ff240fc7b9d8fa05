"""setuptools entry point. Metadata lives in pyproject.toml; this file exists so that the C++/CUDA
extension in csrc/ can be added to ``ext_modules`` when it is built ahead of time (issue #5)."""

from setuptools import setup

setup()
