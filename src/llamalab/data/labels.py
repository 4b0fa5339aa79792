"""What the labels of a batch mean: the masked-token label and the preference rating names.

The data modules write these into batches and the losses in :mod:`llamalab.rlhf.losses` read
them, so they live here, on the data side: ``rlhf`` imports ``data``, never the other way. Plain
Python (no torch), so importing it costs nothing.
"""

from __future__ import annotations

# Label of a token that is not learned (prompts in SFT, padding, packing boundaries); torch's
# cross entropy skips it (its default `ignore_index`).
IGNORE_INDEX = -100

# Preference ratings, strongest first (PAPER.md §3.2.2, Table 27). The index into this tuple is
# what a preference batch carries in `rating`; -1 means "no rating given".
RATINGS: tuple[str, ...] = (
    "significantly_better",
    "better",
    "slightly_better",
    "negligibly_better",
)


def parse_rating(text: str | None) -> int:
    """Index into RATINGS of a rating written as text (PAPER.md §3.2.2, Table 27).

    Case-insensitive; words may be joined by spaces, underscores or hyphens ("Slightly better",
    "slightly_better"). "unsure" counts as "negligibly_better", as the paper groups them.
    None or an empty string means "no rating" and gives -1. Anything else raises ValueError.
    """
    if text is None or not text.strip():
        return -1
    key = "_".join(text.strip().lower().replace("-", " ").replace("_", " ").split())
    if key == "unsure":
        return RATINGS.index("negligibly_better")
    if key in RATINGS:
        return RATINGS.index(key)
    raise ValueError(f"unknown preference rating {text!r}; expected one of {RATINGS} or 'unsure'")
