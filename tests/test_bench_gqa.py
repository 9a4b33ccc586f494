"""bench.case_gqa's goals: a variant that is wrong is no baseline (no timing here: goals on recorded rows)."""

from bench import case_gqa


def row(copy_err: float, ratio: float) -> dict:
    return {"N": 8192, "M": 1, "rewrite_chosen": "dequantize+fold", "rewritten/as_shipped": None,
            "rewritten/copy": ratio, "as_shipped": {"error": "No implementation"},
            "rewritten": {"us": 100.0, "max_err": 1e-4}, "fold": {"us": 90.0, "max_err": copy_err},
            "copy": {"us": 90.0, "max_err": copy_err}}


def test_copy_goal_leaves_out_rows_where_copy_is_wrong():
    nan_copy, slow_right_copy = row(float("nan"), 1.14), row(2e-4, 1.10)
    goal = case_gqa.copy_goal([nan_copy, row(1.0, 1.2)])
    assert goal.met is True and "met by default in 2 where copy is wrong" in goal.detail
    goal = case_gqa.copy_goal([nan_copy, slow_right_copy])
    assert goal.met is False and "0/1 rows, max 1.10" in goal.detail


def test_notes_name_each_wrong_variant():
    notes = case_gqa.notes([row(float("nan"), 1.0), row(2e-4, 1.0)])
    assert [n.split(" is wrong")[0] for n in notes] == ["fold", "copy"]
    assert all("1/2 rows" in n for n in notes)
