"""Prompt-lookup drafts (Saxena, 2023): where the last n tokens of the context occurred
earlier in it, propose the tokens that followed them there.

They cost no model call to draft, so where decoding is bound by reading the weights a
round that verifies them costs about one step however many are accepted; text that
repeats itself (names, code, lists, quoted context) accepts them often. SSD takes them in
the rounds where the context repeats and its exit draft otherwise (``SSDConfig.ngram``).
"""

from __future__ import annotations


def lookup(context: list[int], n: int, k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the context's last n
    tokens ([] where they never occurred before).

    The proposal copies the context from d tokens back, d being how far back that
    occurrence lies; where the copy reaches the present it goes on copying its own
    proposal, so a periodic tail ("ha ha ha") proposes k tokens of its period, not one."""
    if n < 1 or k < 1 or len(context) <= n:
        return []
    key = context[-n:]
    # Latest occurrence first: nearer context predicts better. It may overlap the key
    # itself (a periodic tail).
    for start in range(len(context) - n - 1, -1, -1):
        if context[start + n - 1] == key[-1] and context[start:start + n] == key:
            d = len(context) - n - start                  # >= 1
            ext = context[-d:]
            for i in range(k):
                ext.append(ext[i])                        # the token d places back
            return ext[d:]
    return []
