"""Word material for the synthetic tasks: needle keys, variable names and a large pseudo-word vocabulary.

Everything is generated from small built-in lists, so the tasks need no download and are identical on
every machine for a given seed.
"""
from __future__ import annotations

import random
import string

ADJECTIVES = (
    "ancient", "bitter", "brave", "bright", "calm", "clever", "cold", "crimson", "curious", "dark",
    "eager", "early", "empty", "fancy", "fierce", "gentle", "giant", "golden", "green", "happy",
    "hidden", "hollow", "honest", "humble", "icy", "jolly", "kind", "late", "lazy", "little",
    "lively", "lonely", "loud", "lucky", "mighty", "misty", "modern", "narrow", "noble", "odd",
    "orange", "pale", "patient", "plain", "polite", "proud", "purple", "quick", "quiet", "rapid",
    "rare", "rough", "round", "royal", "rusty", "sandy", "sharp", "shiny", "silent", "silver",
    "simple", "sleepy", "slow", "smooth", "soft", "solid", "sour", "spicy", "steady", "stormy",
    "strange", "sunny", "sweet", "swift", "tall", "tender", "tiny", "vast", "violet", "warm",
    "wild", "windy", "wise", "wooden", "young", "yellow", "zesty",
)
NOUNS = (
    "anchor", "apple", "arrow", "badger", "banjo", "barrel", "beacon", "bicycle", "blanket", "bottle",
    "bridge", "bucket", "butter", "button", "cabin", "camel", "candle", "canyon", "carpet", "castle",
    "cherry", "circle", "cloud", "compass", "copper", "cotton", "crayon", "desert", "dolphin", "dragon",
    "drum", "eagle", "engine", "falcon", "feather", "forest", "fountain", "garden", "glacier", "guitar",
    "hammer", "harbor", "helmet", "island", "jacket", "jungle", "kettle", "ladder", "lantern", "lemon",
    "lizard", "magnet", "marble", "meadow", "mirror", "monkey", "mountain", "needle", "orchard", "otter",
    "paddle", "parrot", "pebble", "pencil", "pepper", "piano", "pillow", "planet", "pocket", "puzzle",
    "rabbit", "ribbon", "river", "rocket", "saddle", "shadow", "spoon", "squirrel", "statue", "teapot",
    "thunder", "tiger", "tomato", "tower", "trumpet", "tunnel", "turtle", "umbrella", "valley", "violin",
    "wagon", "walnut", "window", "wizard", "zebra",
)
_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "ch", "cl", "dr", "fl", "gr", "pl", "sh", "st", "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "oo", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "t", "m", "nd", "st")


def needle_key(rng: random.Random) -> str:
    """An adjective-noun key such as 'quiet-lantern' (about 8,000 distinct keys)."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def magic_number(rng: random.Random, digits: int = 7) -> str:
    """A random number with exactly `digits` digits (no leading zero)."""
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def variable_name(rng: random.Random, length: int = 5) -> str:
    """A random upper-case variable name such as 'QXWRT'."""
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(length))


def pseudo_words(n: int, rng: random.Random, min_syllables: int = 2, max_syllables: int = 3) -> list[str]:
    """`n` distinct pronounceable pseudo-words (e.g. 'brealom'); raises ValueError past about 10^6."""
    if n > 1_000_000:
        raise ValueError(f"pseudo_words: at most 1,000,000 words, asked for {n}")
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(min_syllables, max_syllables)))
        w += rng.choice(_CODAS)
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out
