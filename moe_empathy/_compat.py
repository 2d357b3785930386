"""The stack this package is tested with: an import-time check of the installed versions.

The supported ranges are the ones declared in ``pyproject.toml`` (read back from the
installed package's metadata, so they are written in one place); a version outside
them fails at import with one message, not with a wrong answer later.
"""

from __future__ import annotations

from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version

CHECKED = ("torch", "transformers", "peft", "accelerate")


def check_dependency_versions(names: tuple[str, ...] = CHECKED) -> None:
    """Raises ImportError when an installed core dependency is outside the declared range.

    Args:
        names: the distributions to check (those whose API the model builds on).
    """
    try:
        declared = metadata.requires("moe_empathy") or []
    except metadata.PackageNotFoundError:  # a source tree that was never installed declares nothing
        return
    for line in declared:
        requirement = Requirement(line)
        if requirement.name not in names or requirement.marker is not None:
            continue
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            raise ImportError(
                f"moe_empathy needs {requirement.name}{requirement.specifier}, which is not installed; "
                f"install it with: pip install '{requirement}'"
            ) from None
        if not requirement.specifier.contains(Version(installed), prereleases=True):
            raise ImportError(
                f"moe_empathy is tested with {requirement.name}{requirement.specifier}, but {requirement.name} "
                f"{installed} is installed; install a supported version with: pip install '{requirement}'"
            )
