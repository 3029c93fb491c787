import pytest

from incdet.base.errors import UserError
from incdet.data.classes import ClassSpace, parse_split_sizes

CATS = [{"id": i, "name": f"c{i}"} for i in (1, 2, 4, 5, 7, 9, 11, 14, 16, 18)]


@pytest.mark.parametrize("split,sizes", [
    ("40+40", [40, 40]), ("70+10", [70, 10]), ("40+10x4", [40, 10, 10, 10, 10]),
    ("15+1x5", [15, 1, 1, 1, 1, 1]), ("10", [10]), (" 5 + 5 ", [5, 5]), ("2x3+4", [2, 2, 2, 4]),
])
def test_parse_split_sizes(split, sizes):
    assert parse_split_sizes(split) == sizes


@pytest.mark.parametrize("split", ["", "40+", "a+b", "40+0", "4x0+6", "40,40", "+5"])
def test_bad_split_strings(split):
    with pytest.raises(UserError, match="split"):
        parse_split_sizes(split)


def test_default_order_is_ascending_category_id_and_labels_are_positions():
    cs = ClassSpace(list(reversed(CATS)), "4+3+3")
    assert cs.order == (1, 2, 4, 5, 7, 9, 11, 14, 16, 18)
    assert cs.steps == [(1, 2, 4, 5), (7, 9, 11), (14, 16, 18)]
    assert cs.label_of[18] == 9 and cs.label_of[1] == 0
    # labels never equal category ids here (ids have gaps and start at 1)
    assert all(cs.label_of[c] != c for c in cs.order)
    s1 = cs.step(1)
    assert s1.old == (1, 2, 4, 5) and s1.new == (7, 9, 11) and s1.seen == s1.old + s1.new
    assert s1.groups == ((1, 2, 4, 5), (7, 9, 11))


def test_split_must_add_up():
    with pytest.raises(UserError, match="adds up to 9 classes but the dataset has 10"):
        ClassSpace(CATS, "5+4")


def test_explicit_steps_by_id_and_name():
    cs = ClassSpace(CATS, [["c18", 1], [4, "c2"]])
    assert cs.order == (18, 1, 4, 2)
    assert cs.labels([4, 18]) == [2, 0]


@pytest.mark.parametrize("split,msg", [
    ([[1, 2], [2, 4]], "more than one step"),
    ([[1, 2], []], "empty"),
    ([[1, 99]], "unknown class 99"),
    ([["c1", "dog"]], "unknown class 'dog'"),
    ([[1, 1]], "listed twice"),
])
def test_explicit_split_errors(split, msg):
    with pytest.raises(UserError, match=msg):
        ClassSpace(CATS, split)


def test_class_order_for_string_split():
    order = [18, 16, 14, 11, 9, 7, 5, 4, 2, 1]
    cs = ClassSpace(CATS, "5+5", class_order=order)
    assert cs.steps[0] == (18, 16, 14, 11, 9)
    with pytest.raises(UserError, match="--step 2"):
        cs.step(2)
