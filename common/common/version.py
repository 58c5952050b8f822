"""The platform's version, from one place: the installed ``inboxbooster-common`` distribution."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("inboxbooster-common")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
