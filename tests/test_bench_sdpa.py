"""The sdpa case's output goal: bitwise equal to mask=None, unless the A/A control shows the kernel itself is not
reproducible at that L (seen on an H100 at L=1); then within the control's own differences."""

from bench.case_sdpa import output_goal


def row(l: int, diff: float, control: float = 0.0, first_control: float = 0.0) -> dict:
    return {"L": l, "rewrite_chosen": "drop_mask", "max_diff_vs_none": diff, "max_diff_none_again": control,
            "max_diff_first_call_none_again": first_control}


def test_bitwise_rows_meet_the_goal():
    assert output_goal([row(1, 0.0), row(4, 0.0)]).met


def test_a_difference_where_the_control_never_differs_misses_it():
    assert output_goal([row(1, 6e-5), row(1, 0.0)]).met is False


def test_a_difference_within_the_controls_spread_at_that_l_meets_it_and_says_so():
    goal = output_goal([row(1, 6e-5), row(1, 0.0, first_control=1.2e-4), row(4, 0.0)])
    assert goal.met and "within the A/A spread in 1" in goal.detail and "L=1: 1.2e-04" in goal.detail


def test_the_spread_of_one_l_does_not_excuse_another():
    assert output_goal([row(4, 6e-5), row(1, 0.0, control=1.2e-4)]).met is False


def test_a_kept_mask_misses_it():
    assert output_goal([dict(row(1, 0.0), rewrite_chosen="none")]).met is False
