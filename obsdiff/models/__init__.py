"""Model families: all architecture knowledge lives in this package.

Importing it registers every family adapter (one module per family).
"""

from obsdiff.models import sd3  # noqa: F401  (registers the SD3 family)
from obsdiff.models.registry import (
    FAMILIES,
    Block,
    ModelFamily,
    family_for_pipeline,
    get_family,
    register_family,
    supported_families,
)

__all__ = [
    "FAMILIES",
    "Block",
    "ModelFamily",
    "family_for_pipeline",
    "get_family",
    "register_family",
    "supported_families",
]
