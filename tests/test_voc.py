import numpy as np
import pytest
from PIL import Image

from incdet.base.errors import UserError
from incdet.data.voc import VOC_CLASSES, load_voc

XML = """<annotation><filename>{name}.jpg</filename>
<size><width>100</width><height>80</height><depth>3</depth></size>
<object><name>dog</name><difficult>0</difficult>
<bndbox><xmin>11</xmin><ymin>21</ymin><xmax>50</xmax><ymax>60</ymax></bndbox></object>
<object><name>person</name><difficult>1</difficult>
<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>100</xmax><ymax>80</ymax></bndbox></object>
</annotation>"""


def _voc(tmp_path, xml=XML):
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "Annotations" / "0001.xml").write_text(xml.format(name="0001"))
    Image.new("RGB", (100, 80)).save(tmp_path / "JPEGImages" / "0001.jpg")
    (tmp_path / "ImageSets/Main/trainval.txt").write_text("0001\n")
    return tmp_path


def test_voc_reads_standard_classes_and_difficult(tmp_path):
    cats, recs, _ = load_voc(_voc(tmp_path), "ImageSets/Main/trainval.txt")
    assert [c["name"] for c in cats] == list(VOC_CLASSES) and len(cats) == 20
    (rec,) = recs
    assert rec.category_ids.tolist() == [VOC_CLASSES.index("dog") + 1,
                                         VOC_CLASSES.index("person") + 1]
    # 1-based inclusive -> 0-based xyxy
    np.testing.assert_allclose(rec.boxes[0], [10, 20, 50, 60])
    # difficult: ignored in evaluation (crowd), excluded from training
    assert rec.iscrowd.tolist() == [False, True]


def test_voc_unknown_class_is_an_error(tmp_path):
    _voc(tmp_path, XML.replace("<name>dog</name>", "<name>dragon</name>"))
    with pytest.raises(UserError, match="unknown VOC class 'dragon'"):
        load_voc(tmp_path, "ImageSets/Main/trainval.txt")
