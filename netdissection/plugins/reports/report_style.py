"""Colours shared by the HTML report and the plots, so a category looks the same everywhere."""

from __future__ import annotations

from collections.abc import Sequence

#: The Broden categories' colours (colour-blind-safe Okabe–Ito hues); other categories cycle through SPARE.
CATEGORY_COLOURS = {
    "object": "#0072B2",
    "part": "#56B4E9",
    "scene": "#009E73",
    "material": "#E69F00",
    "texture": "#CC79A7",
    "color": "#D55E00",
}
SPARE = ("#7F7F7F", "#8C564B", "#BCBD22", "#17BECF", "#9467BD", "#F0E442")


def category_colours(categories: Sequence[str]) -> dict[str, str]:
    """A colour per category: the fixed one for Broden's six, the spare palette in order for the rest."""
    colours: dict[str, str] = {}
    spare = 0
    for c in categories:
        if c in CATEGORY_COLOURS:
            colours[c] = CATEGORY_COLOURS[c]
        else:
            colours[c] = SPARE[spare % len(SPARE)]
            spare += 1
    return colours
