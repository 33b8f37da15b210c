"""Annual average carbon intensity of electricity generation per country (gCO2e/kWh).

Values for 2023 from Our World in Data's "Carbon intensity of electricity generation"
table (data: Ember and Energy Institute), read from
https://ourworldindata.org/grapher/carbon-intensity-electricity?tab=table ; the world
average and Norway from Ember's 2023 figures as published by Statista
(https://www.statista.com/statistics/943137/global-emissions-intensity-power-sector-by-country).
Only the entries we could read and cite are shipped: for any other place set
``H3D_CARBON_INTENSITY_G_PER_KWH`` or give a time series. Never chosen by IP address.
"""

from __future__ import annotations

OWID = "Our World in Data / Ember and Energy Institute, carbon intensity of electricity generation"
EMBER_STATISTA = "Ember, electricity generation emission intensity (via Statista)"
YEAR = 2023

#: ISO 3166-1 alpha-2 code (or WORLD) -> (g/kWh, country name, data set)
REGIONS: dict[str, tuple[float, str, str]] = {
    "AR": (354.0, "Argentina", OWID),
    "AT": (111.0, "Austria", OWID),
    "AU": (549.0, "Australia", OWID),
    "BA": (600.0, "Bosnia and Herzegovina", OWID),
    "BD": (691.0, "Bangladesh", OWID),
    "BE": (138.0, "Belgium", OWID),
    "BG": (335.0, "Bulgaria", OWID),
    "BO": (532.0, "Bolivia", OWID),
    "BR": (98.0, "Brazil", OWID),
    "CA": (170.0, "Canada", OWID),
    "CL": (291.0, "Chile", OWID),
    "CN": (582.0, "China", OWID),
    "CO": (260.0, "Colombia", OWID),
    "CR": (53.0, "Costa Rica", OWID),
    "CY": (534.0, "Cyprus", OWID),
    "CZ": (450.0, "Czechia", OWID),
    "DE": (381.0, "Germany", OWID),
    "DK": (152.0, "Denmark", OWID),
    "EC": (150.0, "Ecuador", OWID),
    "EE": (417.0, "Estonia", OWID),
    "EG": (570.0, "Egypt", OWID),
    "FI": (79.0, "Finland", OWID),
    "FR": (56.0, "France", OWID),
    "GE": (168.0, "Georgia", OWID),
    "GR": (337.0, "Greece", OWID),
    "HR": (205.0, "Croatia", OWID),
    "HU": (204.0, "Hungary", OWID),
    "IE": (291.0, "Ireland", OWID),
    "IN": (713.0, "India", OWID),
    "IR": (655.0, "Iran", OWID),
    "NO": (30.0, "Norway", EMBER_STATISTA),
    "SV": (271.0, "El Salvador", OWID),
    "WORLD": (481.0, "World", EMBER_STATISTA),
}
