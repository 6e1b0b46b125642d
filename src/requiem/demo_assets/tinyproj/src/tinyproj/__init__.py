"""Word counts of a text, the smallest useful thing to package."""

from collections import Counter


def word_counts(text: str) -> dict[str, int]:
    """How often each lower-cased word occurs in ``text``."""
    return dict(Counter(text.lower().split()))
