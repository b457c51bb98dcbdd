"""The format and length-penalty rewards (issue 34's verifiable rewards), by hand, alone and in the
weighted sum `rl.add_rewards` builds; a bad pattern or limit names its key."""

from __future__ import annotations

import pytest

from strop.core.errors import ConfigError
from strop.eval import rewards

REPLIES = ["Six eights be 48.\n#### 48", "#### 12", "It is 48.", "  #### 7  "]


def test_format_rewards_a_reply_that_matches_anywhere_or_whole():
    anywhere = rewards.reward_function("format", {"pattern": r"#### \d+"})
    assert anywhere([""] * 4, REPLIES) == [1.0, 1.0, 0.0, 1.0]
    whole = rewards.reward_function("format", {"pattern": r"#### \d+", "full": True})
    assert whole([""] * 4, REPLIES) == [0.0, 1.0, 0.0, 1.0]  # the last one once stripped
    reasoning = rewards.reward_function("format", {"pattern": r"^.+\n#### \d+$", "full": True})
    assert reasoning([""] * 4, REPLIES) == [1.0, 0.0, 0.0, 0.0]  # `.` spans the lines before the answer


def test_length_penalty_is_zero_up_to_the_limit_then_linear():
    fn = rewards.reward_function("length_penalty", {"max_words": 4})
    assert fn(["", "", ""], ["one two three", "a b c d", "a b c d e f"]) == [0.0, 0.0, -0.5]


def test_the_weighted_sum_of_gsm8k_format_and_length_is_the_hand_computed_one():
    parts = [
        (1.0, rewards.reward_function("gsm8k", {})),
        (0.5, rewards.reward_function("format", {"pattern": r"#### \d+$"})),
        (0.1, rewards.reward_function("length_penalty", {"max_words": 3})),
    ]
    answer = ["Six eights.\n#### 48"] * 4
    got = [
        sum(w * s for w, s in zip([w for w, _ in parts], scores, strict=True))
        for scores in zip(*[fn([""] * 4, REPLIES, answer=answer) for _, fn in parts], strict=True)
    ]
    # reply 0: right (1), formatted (0.5), 6 words, 3 over 3 (0.1 * -1); 1: formatted only; 2: right by its
    # last number; 3: wrong, and `$` fails on its trailing spaces (not stripped unless `full`)
    assert got == pytest.approx([1 + 0.5 - 0.1, 0.5, 1.0, 0.0], abs=1e-12)


@pytest.mark.parametrize(
    "name, args, key",
    [
        ("format", {}, "rl.reward_args.pattern"),
        ("format", {"pattern": "(unclosed"}, "rl.reward_args.pattern: not a regular expression"),
        ("length_penalty", {"max_words": 0}, "rl.reward_args.max_words"),
        ("length_penalty", {"max_words": 2.5}, "rl.reward_args.max_words"),
    ],
)
def test_a_bad_argument_names_its_key(name, args, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")):
        rewards.reward_function(name, args)([""], ["x"])
