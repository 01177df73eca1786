"""Sample images for trying vocabularies (scikit-image's bundled photographs)."""

from __future__ import annotations


def astronaut() -> list[tuple]:
    """Eileen Collins in 1998 (NASA, public domain): person, flag, sky, rocket."""
    from skimage import data

    return [(data.astronaut(), {"name": "astronaut", "rgb": True})]


def coffee() -> list[tuple]:
    """A cup of coffee on a saucer (Rachel Michetti, CC0): cup, saucer, spoon, table."""
    from skimage import data

    return [(data.coffee(), {"name": "coffee", "rgb": True})]
