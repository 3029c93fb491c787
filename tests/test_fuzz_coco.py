"""Random malformed COCO JSON only ever takes the clear-error path (UserError naming the file)."""
import copy
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from incdet.base.errors import UserError
from incdet.data.coco import load_coco

VALID = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                    {"id": 2, "file_name": "a.png", "width": 40, "height": 30}],
         "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 8],
                          "area": 80, "iscrowd": 0},
                         {"id": 2, "image_id": 2, "category_id": 5, "bbox": [5, 5, 4, 4]}],
         "categories": [{"id": 3, "name": "a"}, {"id": 5, "name": "b"}]}

scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats()
           | st.text(max_size=4))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3)
                      | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=8)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


ALL_PATHS = list(_paths(VALID))


@st.composite
def mutated(draw):
    doc = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(ALL_PATHS))
        if not path:
            return draw(values)
        node = doc
        try:
            for k in path[:-1]:
                node = node[k]
            if draw(st.booleans()) and isinstance(node, dict):
                node.pop(path[-1], None)
            else:
                node[path[-1]] = draw(values)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation changed the structure above this path
    return doc


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=mutated())
def test_malformed_coco_json_only_raises_user_errors(tmp_path, doc):
    (tmp_path / "img").mkdir(exist_ok=True)
    Image.new("RGB", (40, 30)).save(tmp_path / "img" / "a.png")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(doc))
    try:
        cats, records, _ = load_coco(ann, tmp_path / "img")
    except UserError as e:
        assert str(ann) in str(e) and "\n" not in str(e)
        return
    # accepted: then everything is well-formed
    ids = {c["id"] for c in cats}
    for r in records:
        assert r.boxes.shape[1] == 4 and (r.boxes[:, 2:] > r.boxes[:, :2]).all()
        assert set(r.category_ids.tolist()) <= ids
        assert r.width > 0 and r.height > 0
