"""The release version, from one place: the installed ``inboxbooster-common`` distribution.

``__version__`` is what every command's ``--version`` prints.  The version itself is written in
the ``pyproject.toml`` files (and repeated in image tags and the README); ``./mailer version``
(``devtools.version``) rewrites them all, and tests/infra/test_version.py checks that they agree.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

#: The distribution whose metadata holds the version (every service depends on it).
DISTRIBUTION = "inboxbooster-common"

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
