"""Model families: all architecture knowledge lives in this package.

Importing it registers every family adapter (one module per family).
"""

# Registration order is the order in which families are listed (SD3 first): keep it, unsorted.
# isort: off
from obsdiff.models import sd3  # noqa: F401  (registers the SD3 family)
from obsdiff.models import flux  # noqa: F401  (registers the Flux family)
from obsdiff.models import sdxl  # noqa: F401  (registers the SDXL family)
# isort: on
from obsdiff.models.registry import (
    FAMILIES,
    Block,
    ModelFamily,
    Slice,
    StructureGroup,
    family_for_pipeline,
    get_family,
    register_family,
    supported_families,
)

__all__ = [
    "FAMILIES",
    "Block",
    "ModelFamily",
    "Slice",
    "StructureGroup",
    "family_for_pipeline",
    "get_family",
    "register_family",
    "supported_families",
]
