"""Debian tools some tests need (promtool, systemd-analyze): found on PATH or, as root,
installed with apt-get once per session; a test skips, saying why, where neither works."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest


@functools.lru_cache(maxsize=None)
def _find_or_install(binary: str, package: str, apt_options: tuple[str, ...]) -> str | None:
    found = shutil.which(binary)
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", *apt_options, package],
                       env=env, capture_output=True, timeout=600)
        found = shutil.which(binary)
    return found


def require_tool(binary: str, package: str, *apt_options: str) -> str:
    found = _find_or_install(binary, package, apt_options)
    if found is None:
        pytest.skip(f"{binary} is not installed and `apt-get install {package}` was not possible here")
    return found
