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

# Million-AID's 51 scene classes of the multi-class task (the leaf folders of its release), sorted. Source:
# microsoft/torchgeo@02ea85b5fe164a68b0478faf0ed20022f8ee1f10:torchgeo/datasets/millionaid.py
# (`multi_class_categories`, whose "bapsketball_court" is the release's basketball_court folder).
MILLIONAID = _readable([
    "apartment", "apron", "bare_land", "baseball_field", "basketball_court", "beach", "bridge", "cemetery",
    "church", "commercial_area", "dam", "desert", "detached_house", "dry_field", "forest", "golf_course",
    "greenhouse", "ground_track_field", "helipad", "ice_land", "intersection", "island", "lake", "meadow", "mine",
    "mobile_home_park", "oil_field", "orchard", "paddy_field", "parking_lot", "pier", "quarry", "railway", "river",
    "road", "rock_land", "roundabout", "runway", "solar_power_plant", "sparse_shrub_land", "stadium",
    "storage_tank", "substation", "swimming_pool", "tennis_court", "terraced_field", "train_station", "viaduct",
    "wastewater_plant", "wind_turbine", "works",
])

# RSI-CB256's 35 classes (the release's leaf folders), sorted. Source:
# biasvariancelabs/aitlas@1e326642438f6217fff1b4389a9f3b8507642b98:aitlas/datasets/rsi_cb256.py (`LABELS`).
RSICB256 = _readable([
    "airplane", "airport_runway", "artificial_grassland", "avenue", "bare_land", "bridge", "city_building",
    "coastline", "container", "crossroads", "dam", "desert", "dry_farm", "forest", "green_farmland", "highway",
    "hirst", "lakeshore", "mangrove", "marina", "mountain", "parkinglot", "pipeline", "residents", "river",
    "river_protection_forest", "sandbeach", "sapling", "sea", "shrubwood", "snow_mountain", "sparse_forest",
    "storage_room", "stream", "town",
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
    "millionaid": MILLIONAID,
    "rsicb256": RSICB256,
}
_ALIASES = {"nwpu": "resisc45", "nwpu_resisc45": "resisc45", "whurs19": "whu_rs19", "whu-rs19": "whu_rs19",
            "uc_merced": "ucm", "ucmerced": "ucm", "fmow_rgb": "fmow", "million_aid": "millionaid",
            "million-aid": "millionaid", "rsicb": "rsicb256", "rsi_cb256": "rsicb256", "rsi-cb256": "rsicb256"}


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
