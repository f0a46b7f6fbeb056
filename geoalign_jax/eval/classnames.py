"""Class lists of RS scene-classification benchmarks, as folder names and as readable prompt names.

Each dataset maps its canonical class identifiers (the folder / label names used by the dataset's
distribution, in the conventional sorted order) to the readable phrase used inside prompts
("DenseResidential" -> "dense residential"). EuroSAT uses the descriptive names of CLIP_benchmark /
open_clip ("annual crop land", "lake or sea", ...), since its raw labels are not phrases.
"""
from __future__ import annotations

import re
from typing import Sequence

# One rule for readable names, shared with `prepare` (which writes `class_names` into manifests), so a
# class is prompted by the same words whether it comes from a manifest or from this table.
from geoalign_jax.data.prepare_formats import readable_class_name  # also this module's public name

def _readable(identifiers: Sequence[str]) -> dict[str, str]:
    return {identifier: readable_class_name(identifier) for identifier in identifiers}


UCM = _readable([
    "agricultural", "airplane", "baseball_diamond", "beach", "buildings", "chaparral",
    "dense_residential", "forest", "freeway", "golf_course", "harbor", "intersection",
    "medium_residential", "mobile_home_park", "overpass", "parking_lot", "river", "runway",
    "sparse_residential", "storage_tanks", "tennis_court",
])

AID = _readable([
    "Airport", "BareLand", "BaseballField", "Beach", "Bridge", "Center", "Church", "Commercial",
    "DenseResidential", "Desert", "Farmland", "Forest", "Industrial", "Meadow", "MediumResidential",
    "Mountain", "Park", "Parking", "Playground", "Pond", "Port", "RailwayStation", "Resort", "River",
    "School", "SparseResidential", "Square", "Stadium", "StorageTanks", "Viaduct",
])

RESISC45 = _readable([
    "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge", "chaparral",
    "church", "circular_farmland", "cloud", "commercial_area", "dense_residential", "desert", "forest",
    "freeway", "golf_course", "ground_track_field", "harbor", "industrial_area", "intersection",
    "island", "lake", "meadow", "medium_residential", "mobile_home_park", "mountain", "overpass",
    "palace", "parking_lot", "railway", "railway_station", "rectangular_farmland", "river",
    "roundabout", "runway", "sea_ice", "ship", "snowberg", "sparse_residential", "stadium",
    "storage_tank", "tennis_court", "terrace", "thermal_power_station", "wetland",
])

EUROSAT = {
    "AnnualCrop": "annual crop land",
    "Forest": "forest",
    "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road",
    "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments",
    "River": "river",
    "SeaLake": "lake or sea",
}

WHU_RS19 = _readable([
    "Airport", "Beach", "Bridge", "Commercial", "Desert", "Farmland", "footballField", "Forest",
    "Industrial", "Meadow", "Mountain", "Park", "Parking", "Pond", "Port", "railwayStation",
    "Residential", "River", "Viaduct",
])

# RSSCN7 folders carry a letter prefix (aGrass, bField, ...) that only fixes the order.
RSSCN7 = {
    "aGrass": "grass", "bField": "field", "cIndustry": "industry", "dRiverLake": "river or lake",
    "eForest": "forest", "fResident": "residential", "gParking": "parking",
}

PATTERNNET = _readable([
    "airplane", "baseball_field", "basketball_court", "beach", "bridge", "cemetery", "chaparral",
    "christmas_tree_farm", "closed_road", "coastal_mansion", "crosswalk", "dense_residential",
    "ferry_terminal", "football_field", "forest", "freeway", "golf_course", "harbor", "intersection",
    "mobile_home_park", "nursing_home", "oil_gas_field", "oil_well", "overpass", "parking_lot",
    "parking_space", "railway", "river", "runway", "runway_marking", "shipping_yard", "solar_panel",
    "sparse_residential", "storage_tank", "swimming_pool", "tennis_court", "transformer_station",
    "wastewater_treatment_plant",
])

# fMoW's 62 categories (the fMoW-rgb release's category folders, in sorted order).
FMOW = _readable([
    "airport", "airport_hangar", "airport_terminal", "amusement_park", "aquaculture", "archaeological_site", "barn",
    "border_checkpoint", "burial_site", "car_dealership", "construction_site", "crop_field", "dam",
    "debris_or_rubble", "educational_institution", "electric_substation", "factory_or_powerplant", "fire_station",
    "flooded_road", "fountain", "gas_station", "golf_course", "ground_transportation_station", "helipad",
    "hospital", "impoverished_settlement", "interchange", "lake_or_pond", "lighthouse", "military_facility",
    "multi-unit_residential", "nuclear_powerplant", "office_building", "oil_or_gas_facility", "park",
    "parking_lot_or_garage", "place_of_worship", "police_station", "port", "prison", "race_track", "railway_bridge",
    "recreational_facility", "road_bridge", "runway", "shipyard", "shopping_mall", "single-unit_residential",
    "smokestack", "solar_farm", "space_facility", "stadium", "storage_tank", "surface_mine", "swimming_pool",
    "toll_booth", "tower", "tunnel_opening", "waste_disposal", "water_treatment_facility", "wind_farm", "zoo",
])

DATASET_CLASSES: dict[str, dict[str, str]] = {
    "ucm": UCM,
    "aid": AID,
    "resisc45": RESISC45,
    "eurosat": EUROSAT,
    "whu_rs19": WHU_RS19,
    "rsscn7": RSSCN7,
    "patternnet": PATTERNNET,
    "fmow": FMOW,
}
_ALIASES = {"nwpu": "resisc45", "nwpu_resisc45": "resisc45", "whurs19": "whu_rs19", "whu-rs19": "whu_rs19",
            "uc_merced": "ucm", "ucmerced": "ucm", "fmow_rgb": "fmow"}


def canonical_dataset_name(name: str) -> str | None:
    """Known dataset key for a user-supplied name ('AID', 'WHU-RS19', 'nwpu'), or None."""
    key = name.strip().lower().replace(" ", "_")
    key = _ALIASES.get(key, key)
    return key if key in DATASET_CLASSES else None


def dataset_class_identifiers(name: str) -> list[str]:
    """Class identifiers (folder names) of a known dataset, in label order."""
    key = canonical_dataset_name(name)
    if key is None:
        raise KeyError(f"no class list for dataset {name!r}; known: {sorted(DATASET_CLASSES)}")
    return list(DATASET_CLASSES[key])


def dataset_class_names(name: str) -> list[str]:
    """Readable prompt names of a known dataset's classes, in label order."""
    key = canonical_dataset_name(name)
    if key is None:
        raise KeyError(f"no class list for dataset {name!r}; known: {sorted(DATASET_CLASSES)}")
    return list(DATASET_CLASSES[key].values())


def prompt_names_for(identifiers: Sequence[str], dataset: str | None = None) -> list[str]:
    """Readable names for the given class identifiers, using the dataset's table when it knows them.

    Identifiers are matched case- and separator-insensitively against the table ("dense_residential"
    finds "DenseResidential"); anything unknown falls back to ``readable_class_name``.
    """
    table: dict[str, str] = {}
    key = canonical_dataset_name(dataset) if dataset else None
    if key is not None:
        table = {_fold(identifier): readable for identifier, readable in DATASET_CLASSES[key].items()}
    return [table.get(_fold(identifier), readable_class_name(identifier)) for identifier in identifiers]


def _fold(identifier: str) -> str:
    return re.sub(r"[\s_\-]+", "", identifier).lower()
