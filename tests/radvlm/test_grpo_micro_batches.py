"""Token-balanced micro-batches (``radvlm.grpo.token_micro_batches``), by hand."""

import pytest

from radvlm.grpo import token_micro_batches


def test_token_micro_batches_by_hand():
    # sorted by length: 1 (2), 3 (3), 2 (9), 0 (10); [1, 3] is 2 x 3 = 6 <= 12, + row 2: 3 x 9 = 27 > 12
    assert token_micro_batches([0, 1, 2, 3], [10, 2, 9, 3], 4, 12) == [[1, 3], [2], [0]]
    # a budget of 20: [1, 3] then [2, 0] is 2 x 10 = 20 <= 20
    assert token_micro_batches([0, 1, 2, 3], [10, 2, 9, 3], 4, 20) == [[1, 3], [2, 0]]
    # max_rows still caps: 2 rows at most
    assert token_micro_batches([0, 1, 2, 3], [1, 1, 1, 1], 2, 100) == [[0, 1], [2, 3]]
    # a row longer than the budget is a micro-batch of its own; row ids, not positions, come back
    assert token_micro_batches([7, 9], [50, 5], 8, 10) == [[9], [7]]
    # no token budget: plain micro-batches in the given order
    assert token_micro_batches([4, 5, 6], [9, 1, 5], 2, None) == [[4, 5], [6]]
    assert token_micro_batches([], [], 2, 10) == []
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        token_micro_batches([0], [1], 1, 0)
