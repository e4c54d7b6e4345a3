"""Dataset readers: root discovery, shipped lists, COCO label mapping, bad input, verify."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from densebench.data import (
    FAMILIES,
    FRACTION_SEEDS,
    available,
    find_root,
    fraction_list,
    open_dataset,
    splits,
)
from densebench.data.coco import (
    diagnose_thing_values,
    read_categories,
    stuff_lut,
    thing_supercategories,
    things_lut,
    write_coco_split_lists,
)
from densebench.data.synth import write_synthetic_suite
from densebench.data.verify import prepare_instructions, verify
from densebench.errors import DataError
from densebench.paths import read_id_list, shipped

FOLDERS = {"voc": "VOCSegmentation", "ade20k": "ADEChallengeData2016", "coco-things": "coco",
           "coco-stuff": "coco", "spair": "SPair-71k", "davis": "DAVIS"}

SPEC_THINGS = ["accessory", "animal", "appliance", "electronic", "food", "furniture", "indoor", "kitchen",
               "outdoor", "person", "sports", "vehicle"]
SPEC_STUFF = ["building", "ceiling", "floor", "food-stuff", "furniture-stuff", "ground", "plant", "raw-material",
              "sky", "solid", "structural", "textile", "wall", "water", "window"]


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_src")
    write_synthetic_suite(root, seed=1, scale="tiny")
    return root


@pytest.fixture
def tiny(tiny_src, tmp_path):
    """A private copy of the tiny suite that a test may corrupt."""
    dst = tmp_path / "home"
    shutil.copytree(tiny_src, dst)
    return dst


# ------------------------------------------------------------------------------------------ roots
@pytest.mark.parametrize("family", FAMILIES)
def test_find_root_accepts_the_folder_itself_and_a_data_home(tiny_src, family):
    direct = tiny_src / FOLDERS[family]
    assert find_root(family, tiny_src) == direct
    assert find_root(family, direct) == direct
    assert len(open_dataset(family, direct, splits(family)[1])) == len(open_dataset(family, tiny_src,
                                                                                    splits(family)[1]))


def test_find_root_errors_name_what_was_looked_for(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        find_root("voc", tmp_path / "nope")
    with pytest.raises(DataError) as e:
        find_root("ade20k", tmp_path)
    assert "ADEChallengeData2016" in str(e.value) and e.value.hint
    with pytest.raises(DataError, match="unknown dataset family 'cityscapes'"):
        find_root("cityscapes", tmp_path)
    assert available(tmp_path) == [] and available(tmp_path / "missing") == []


def test_available_lists_only_present_families(tiny):
    shutil.rmtree(tiny / "SPair-71k")
    shutil.rmtree(tiny / "coco")
    shutil.rmtree(tiny / "DAVIS")
    assert available(tiny) == ["voc", "ade20k"]
    assert available(tiny / "VOCSegmentation") == ["voc"]


def test_split_names():
    assert splits("voc") == ("trainaug", "val")
    assert splits("ade20k") == ("training", "validation")
    assert splits("coco-things") == splits("coco-stuff") == ("train", "val")


# ------------------------------------------------------------------------------------------ shipped lists
def test_shipped_voc_and_ade_lists_have_the_published_counts():
    trainaug = read_id_list(shipped("voc", "trainaug.txt"))
    val = read_id_list(shipped("voc", "val.txt"))
    assert (len(trainaug), len(val)) == (10582, 1449)
    assert not set(trainaug) & set(val)                              # trainaug excludes VOC val
    assert all(len(i) == 11 and i[4] == "_" for i in trainaug + val)
    assert trainaug == sorted(trainaug) and val == sorted(val)
    training = read_id_list(shipped("ade20k", "training.txt"))
    validation = read_id_list(shipped("ade20k", "validation.txt"))
    assert (len(training), len(validation)) == (20210, 2000)
    assert training[0] == "ADE_train_00000001" and validation[-1] == "ADE_val_00002000"


@pytest.mark.parametrize("family,counts", [("voc", {128: 80, 64: 160, 8: 1320}),
                                           ("ade20k", {128: 150, 64: 300, 8: 2550})])
def test_shipped_fraction_lists(family, counts):
    full = set(read_id_list(shipped(family, "trainaug.txt" if family == "voc" else "training.txt")))
    for seed in FRACTION_SEEDS:
        lists = {}
        for frac, n in counts.items():
            ids = read_id_list(fraction_list(family, frac, seed))
            assert len(ids) == n, (family, frac, seed)
            assert set(ids) <= full, sorted(set(ids) - full)[:5]
            lists[frac] = set(ids)
        # the published lists are nested for every seed (spec §2.1 checked 42 and 400): a transcription check
        assert lists[128] <= lists[64] <= lists[8]
    with pytest.raises(DataError, match="training fraction"):
        fraction_list("voc", 16, 42)
    with pytest.raises(DataError, match="seed"):
        fraction_list("voc", 8, 7)


def test_shipped_class_names_and_categories():
    voc = read_id_list(shipped("voc", "class_names.txt"))
    assert len(voc) == 21 and voc[0] == "background" and voc[15] == "person"
    ade = shipped("ade20k", "class_names.txt").read_text().splitlines()
    assert len(ade) == 151 and ade[0] == "other" and ade[1] == "wall" and ade[150] == "flag"
    assert len(read_id_list(shipped("spair", "categories.txt"))) == 18
    pan = json.loads(shipped("coco", "panoptic_categories.json").read_text())["categories"]
    assert len(pan) == 133 and sum(c["isthing"] for c in pan) == 80
    stuff = json.loads(shipped("coco", "stuff_categories.json").read_text())["categories"]
    assert [c["id"] for c in stuff] == list(range(92, 184))
    sums = json.loads(shipped("checksums.json").read_text())["archives"]
    assert sums["VOCtrainval_11-May-2012.tar"]["md5"] == "6cd6e144f989b92b3379bac3b3de84fd"


# ------------------------------------------------------------------------------------------ COCO mapping
def test_coco_supercategory_ids_match_the_spec():
    pan, _ = read_categories("panoptic")
    stuff, _ = read_categories("stuff")
    assert thing_supercategories(pan) == SPEC_THINGS
    t, s = things_lut(pan), stuff_lut(stuff)
    # independent computation straight from the category dicts
    for c in pan:
        want = SPEC_THINGS.index(c["supercategory"]) if c["isthing"] else 255
        assert t[c["id"]] == want, c
    for c in stuff:
        want = 255 if c["supercategory"] == "other" else SPEC_STUFF.index(c["supercategory"])
        assert s[c["id"]] == want, c
    assert t[0] == 255 and t[1] == 9 and t[3] == 11 and t[200] == 255     # void, person, car, stuff
    assert s[0] == 255 and s[183] == 255 and s[157] == SPEC_STUFF.index("sky")


def test_coco_reader_maps_raw_masks_like_the_category_json(tiny_src):
    for family, sub, names in (("coco-things", "val2017", SPEC_THINGS),
                               ("coco-stuff", "stuff_annotations/stuff_val2017_pixelmaps", SPEC_STUFF)):
        ds = open_dataset(family, tiny_src, "val")
        assert ds.class_names == names and ds.num_classes == len(names) and ds.ignore_index == 255
        cats = json.loads((tiny_src / "coco" / "annotations" / (
            "panoptic_annotations/panoptic_val2017.json" if family == "coco-things"
            else "stuff_annotations/stuff_val2017.json")).read_text())["categories"]
        sup = {c["id"]: c["supercategory"] for c in cats if family == "coco-stuff" or c["isthing"]}
        for i in range(len(ds)):
            id_, _, mask = ds[i]
            raw = np.array(Image.open(tiny_src / "coco" / "annotations" / sub / f"{id_}.png"))
            want = np.vectorize(lambda v, n=names, s=sup: n.index(s[v]) if s.get(v, "other") != "other" else 255)(raw)
            np.testing.assert_array_equal(mask, want)


def _to_stuffthingmaps(home, split="train"):
    """Rewrite the thing masks as COCO-Stuff-164k 0-indexed stuffthingmaps (id - 1, 255 = unlabelled)."""
    ann = home / "coco" / "annotations"
    for p in (ann / f"{split}2017").glob("*.png"):
        things = np.array(Image.open(p))
        stuff = np.array(Image.open(ann / "stuff_annotations" / f"stuff_{split}2017_pixelmaps" / p.name))
        out = np.full(things.shape, 255, np.uint8)
        is_thing = (things >= 1) & (things <= 90)
        out[is_thing] = things[is_thing] - 1
        is_stuff = (stuff >= 92) & (stuff <= 182)
        out[is_stuff] = stuff[is_stuff] - 1
        Image.fromarray(out, "L").save(p)


def test_coco_zero_indexed_stuffthingmaps_are_refused(tiny):
    _to_stuffthingmaps(tiny)
    with pytest.raises(DataError, match="0-indexed") as e:
        open_dataset("coco-things", tiny, "train")
    assert "annotations/train2017" in str(e.value) and "panoptic2semantic" in e.value.hint
    assert len(open_dataset("coco-things", tiny, "val")) == 4       # the val masks are still fine


def test_diagnosis_separates_panoptic_ids_from_shifted_ones():
    pan, _ = read_categories("panoptic")
    assert diagnose_thing_values({0: 50, 1: 100, 3: 30, 187: 400, 199: 80}, pan) is None
    shifted = {0: 100, 2: 30, 12: 20, 94: 300, 156: 400, 255: 60}    # person→0, car→2, stop sign→12, ...
    assert "0-indexed" in diagnose_thing_values(shifted, pan)
    assert "not COCO panoptic category ids" in diagnose_thing_values({1: 10, 240: 10, 241: 10, 242: 10}, pan)


def test_write_coco_split_lists_is_a_seeded_ten_percent(tiny):
    (tiny / "coco" / "densebench_manifest.json").unlink()
    with pytest.raises(DataError, match="densebench data prepare coco-things --root"):
        open_dataset("coco-things", tiny, "val")
    for i in range(44):   # 50 train images in all
        Image.new("RGB", (8, 8)).save(tiny / "coco" / "images" / "train2017" / f"{900000 + i:012d}.jpg")
    paths = write_coco_split_lists(tiny / "coco")
    train = read_id_list(paths["train"])
    all_train = sorted(p.stem for p in (tiny / "coco" / "images" / "train2017").glob("*.jpg"))
    assert len(train) == 5 and train == sorted(train) and set(train) <= set(all_train)
    assert read_id_list(paths["val"]) == sorted(p.stem for p in (tiny / "coco" / "images" / "val2017").glob("*.jpg"))
    assert read_id_list(write_coco_split_lists(tiny / "coco")["train"]) == train       # deterministic
    assert len(open_dataset("coco-stuff", tiny, "val")) == 4


# ------------------------------------------------------------------------------------------ bad input
def test_missing_split_file_names_the_files(tiny):
    (tiny / "VOCSegmentation" / "densebench_manifest.json").unlink()
    with pytest.raises(DataError) as e:
        open_dataset("voc", tiny, "trainval")
    assert str(tiny / "VOCSegmentation" / "sets" / "trainval.txt") in str(e.value)
    with pytest.raises(DataError, match="split 'bogus' is not in"):
        open_dataset("ade20k", tiny, "bogus")
    with pytest.raises(DataError, match="does not exist"):
        open_dataset("voc", tiny, "val", id_list=tiny / "missing.txt")


def test_unreadable_image_and_missing_mask(tiny):
    ds = open_dataset("voc", tiny, "val")
    ds.image_path(ds.ids[0]).write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=str(ds.image_path(ds.ids[0]))):
        ds[0]
    ds.mask_path(ds.ids[1]).unlink()
    with pytest.raises(DataError, match=str(ds.mask_path(ds.ids[1]))):
        ds[1]


def test_mask_of_another_size(tiny):
    ds = open_dataset("ade20k", tiny, "validation")
    p = ds.mask_path(ds.ids[0])
    Image.fromarray(np.array(Image.open(p))[:-4], "L").save(p)
    with pytest.raises(DataError) as e:
        ds[0]
    assert str(p) in str(e.value) and str(ds.image_path(ds.ids[0])) in str(e.value)


@pytest.mark.parametrize("family,split,value", [("voc", "trainaug", 21), ("ade20k", "training", 151),
                                                ("coco-stuff", "train", 50)])
def test_label_values_out_of_range(tiny, family, split, value):
    ds = open_dataset(family, tiny, split)
    p = ds.mask_path(ds.ids[0])
    m = np.array(Image.open(p))
    m[:3, :3] = value
    Image.fromarray(m, "L").save(p)
    with pytest.raises(DataError, match=str(p)):
        ds[0]


def test_spair_missing_fields_and_out_of_image_keypoints(tiny):
    ds = open_dataset("spair", tiny, "test")
    first = ds.pair_path(ds.pair_names[0])
    data = json.loads(first.read_text())
    # a keypoint moved outside the source image: invisible and counted, not a crash
    cat, src = data["category"], data["src_imname"][:-4]
    ann_path = tiny / "SPair-71k" / "ImageAnnotation" / cat / f"{src}.json"
    ann = json.loads(ann_path.read_text())
    slot = next(k for k, v in ann["kps"].items() if v is not None)
    ann["kps"][slot] = [ann["image_width"] + 40.0, 10.0]
    ann_path.write_text(json.dumps(ann))
    ds = open_dataset("spair", tiny, "test")
    pair = ds.pairs[0]
    assert not pair["src_vis"][int(slot)] and ds.out_of_image >= 1
    del data["trg_bndbox"]
    first.write_text(json.dumps(data))
    with pytest.raises(DataError) as e:
        _ = open_dataset("spair", tiny, "test").pairs
    assert str(first) in str(e.value) and "trg_bndbox" in str(e.value)


def test_spair_falls_back_to_pair_keypoints(tiny):
    ds = open_dataset("spair", tiny, "trn")
    want = ds.pairs[0]
    shutil.rmtree(tiny / "SPair-71k" / "ImageAnnotation")
    got = open_dataset("spair", tiny, "trn").pairs[0]
    both = want["src_vis"] & want["trg_vis"]
    np.testing.assert_allclose(got["trg_kps"][both], want["trg_kps"][both])
    assert (got["src_vis"] & got["trg_vis"]).sum() == both.sum()


# ------------------------------------------------------------------------------------------ verify
@pytest.mark.parametrize("family", FAMILIES)
def test_verify_accepts_a_clean_tree(tiny_src, family):
    seen = []
    assert verify(family, tiny_src, progress=lambda d, t, p: seen.append((d, t))) == []
    assert seen and seen[-1][0] == seen[-1][1]


def test_verify_finds_every_planted_problem(tiny):
    voc = open_dataset("voc", tiny, "val")
    broken_img = voc.image_path(voc.ids[0])
    broken_img.write_bytes(broken_img.read_bytes()[:200])                 # truncated JPEG
    small = voc.mask_path(voc.ids[1])
    Image.open(small).crop((0, 0, 20, 20)).save(small)                    # wrong size
    bad = voc.mask_path(voc.ids[2])
    m = np.array(Image.open(bad))
    m[0, 0] = 42
    Image.fromarray(m, "L").save(bad)                                      # out of range
    gone = voc.mask_path(voc.ids[3])
    gone.unlink()                                                          # missing
    problems = verify("voc", tiny)
    paths = {p.path for p in problems}
    assert {str(broken_img), str(small), str(bad), str(gone)} <= paths, problems
    assert all(p.fix for p in problems)
    _to_stuffthingmaps(tiny)
    coco = verify("coco-things", tiny)
    assert any("0-indexed" in p.message for p in coco)
    assert verify("coco-stuff", tiny) == []
    assert verify("voc", tiny / "nowhere")[0].path == str(tiny / "nowhere")


def test_prepare_instructions_name_archives_and_layout():
    voc = prepare_instructions("voc")
    assert "VOCtrainval_11-May-2012.tar" in voc and "6cd6e144f989b92b3379bac3b3de84fd" in voc
    assert "SegmentationClassAug" in voc and "benchmark.tgz" in voc
    coco = prepare_instructions("coco-things")
    assert "panoptic2semantic_segmentation.py" in coco and "densebench data prepare coco-things --root coco" in coco
    assert "219e1696abb36c8ba3a3afe7fb2f4b4606a897c7" in prepare_instructions("ade20k")
    assert "SPair-71k.tar.gz" in prepare_instructions("spair")


def test_fraction_lists_of_a_synthetic_suite(tiny_src):
    """On a synthetic suite the fraction lists are the suite's own (the published ids do not exist there)."""
    for family, split in (("voc", "trainaug"), ("ade20k", "training")):
        train = set(open_dataset(family, tiny_src, split).ids)
        lists = {f: read_id_list(fraction_list(family, f, 400, data_root=tiny_src)) for f in (8, 64, 128)}
        assert set(lists[128]) <= set(lists[64]) <= set(lists[8]) <= train
        assert len(lists[8]) == max(1, round(len(train) / 8)) and len(lists[128]) == 1
        ds = open_dataset(family, tiny_src, split, id_list=fraction_list(family, 8, 400, data_root=tiny_src))
        assert ds.ids == lists[8]
        assert fraction_list(family, 8, 42, data_root=tiny_src) != fraction_list(family, 8, 400, data_root=tiny_src)
    # without a synthetic manifest the shipped list is returned
    assert fraction_list("voc", 8, 42) == shipped("voc", "1_div_8", "trainaug_8_42.txt")
