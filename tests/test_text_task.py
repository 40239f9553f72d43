"""The example text task's checkers: the format, each value on its own, and all values together."""

import pytest

from loraforge.errors import UserError
from loraforge.examples.text.task import follows_task, matches_reference, values_right

PROMPT = "Describe as JSON: Tom ran under the big red bridge.\n"
REF = '{"who": "Tom", "did": "ran", "where": "under the big red bridge"}'


@pytest.mark.parametrize(
    "generation, right, follows",
    [
        (REF + "</s>", 3, True),
        ('{"who": "tom", "did": "Ran", "where": "under the big red bridge"}\n', 3, True),  # letter case
        ('{"who": "Mia", "did": "ran", "where": "under the big red bridge"}', 2, True),
        ('{"who": "Mia", "did": "listened", "where": "on the bright silver meadow"}', 0, True),
        ('{"who": "Tom", "where": "under the big red bridge", "did": "ran"}', 0, False),  # key order
        ('{"who": "Tom", "did": "ran"}', 0, False),  # a key missing
        ("who: Tom, did: ran", 0, False),  # not JSON
        (REF + " and more", 0, False),  # text after the object
    ],
)
def test_each_value_is_judged_on_its_own_and_only_in_the_format(generation, right, follows):
    assert follows_task(PROMPT, generation, REF) is follows
    assert values_right(PROMPT, generation, REF) == (right, 3)
    assert matches_reference(PROMPT, generation, REF) is (right == 3)


def test_a_reference_that_is_not_json_is_refused():
    with pytest.raises(UserError, match="not a JSON object"):
        values_right(PROMPT, REF, "who: Tom")
