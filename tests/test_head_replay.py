"""``benchmarks/head_replay.py``: which answer tokens copy text, and whether the head could have read it."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import head_replay
from head_replay import COPIED_FAR, COPIED_NEAR, NOT_COPIED


def test_a_trigram_seen_in_the_window_is_a_near_copy_one_only_before_it_a_far_copy():
    far = {(7, 8, 9)}
    #          0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 4, 1, 2, 3, 7, 8, 9]
    got = head_replay.copied(tokens, far).tolist()
    assert got[6] == COPIED_NEAR  # (1, 2, 3) ends at 2 and again at 6
    assert got[4] == got[5] == got[7] == got[8] == NOT_COPIED  # (3, 4, 1), (4, 1, 2), (2, 3, 7), (3, 7, 8): new
    assert got[9] == COPIED_FAR  # (7, 8, 9) occurs only in the text before the window


def test_near_wins_over_far_and_a_trigram_does_not_match_itself():
    tokens = [5, 6, 7, 5, 6, 7]
    got = head_replay.copied(tokens, {(5, 6, 7)}).tolist()
    assert got[2] == COPIED_FAR  # its own first occurrence is not an earlier one
    assert got[5] == COPIED_NEAR
