"""Multi-subject fusion: several subjects' LoRAs in one image, each confined to its region."""

from pimg.fusion.composition import Composition, RegionalSubject, regional_subject
from pimg.fusion.regions import Region, default_regions, parse_region

__all__ = ["Composition", "Region", "RegionalSubject", "default_regions", "parse_region", "regional_subject"]
