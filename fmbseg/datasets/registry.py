"""The seven benchmarks of the evaluation protocol, one frozen spec each (in the spirit of timm).

A spec says what the download stage fetches (official URLs, published checksums), which members
of each archive it needs, where the evaluated split lies inside them, and how raw annotation
values become class indices. Class names ship as UTF-8 files in ``classes/``.

Sources: class names and label conversions follow TCL (github.com/kakaobrain/tcl, which
evaluates with mmsegmentation 0.27): its own PascalVOCDataset20 and COCOObjectDataset (+ the
GroupViT ``convert_coco_object.py``) and mmseg's PascalVOCDataset, PascalContextDataset59,
COCOStuffDataset, CityscapesDataset and ADE20KDataset. TCL uses these names verbatim (no
open-vocabulary renaming), so we do too; the one change is ADE20K's ``'bed '`` without its
trailing space. Checksums: we found none published by the dataset sites themselves except
Cityscapes' (behind its login); where a widely used loader publishes one (torchvision, GluonCV)
it is used and named, and an archive with none is downloaded unverified.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from fmbseg.datasets import labels
from fmbseg.datasets.labels import LabelTransform
from fmbseg.errors import InputError

IGNORE_INDEX = 255


@dataclass(frozen=True)
class Archive:
    """One file of an official release and the members of it that the conversion needs."""

    filename: str
    # None: the site needs a login, the user downloads the file (``manual_page``).
    url: str | None
    # "<md5|sha1|sha256>:<hex digest>", or None when no digest is published anywhere we trust.
    checksum: str | None
    checksum_source: str
    # Path prefixes inside the archive; only these are extracted (all members are vetted).
    members: tuple[str, ...]
    manual_page: str | None = None


@dataclass(frozen=True)
class RawLayout:
    """Where the evaluated split lies in the extracted archives, relative to ``<root>/raw``.

    Each archive extracts to ``raw/<archive name without extension>/``. An image is
    ``images/<id><image_suffix>`` and its annotation ``masks/<id><mask_suffix>``; ids come from
    ``id_list`` (one per line) or, without one, from every image below ``images``.
    """

    split: str
    images: str
    masks: str
    image_suffix: str
    mask_suffix: str
    id_list: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    display_name: str
    class_names: tuple[str, ...]
    ignore_index: int
    # Index of the 'background' class (PV-21, CO-80), which the segmenter fills by its own rule.
    background_index: int | None
    label_transform: LabelTransform
    archives: tuple[Archive, ...] = ()
    layout: RawLayout | None = None
    conversion: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def read_packaged_class_names(name: str) -> tuple[str, ...]:
    text = resources.files("fmbseg.datasets").joinpath("classes", f"{name}.txt").read_text("utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


_VOC2012 = Archive(
    filename="VOCtrainval_11-May-2012.tar",
    url="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
    checksum="md5:6cd6e144f989b92b3379bac3b3de84fd",
    checksum_source="torchvision.datasets.VOCSegmentation (the VOC site publishes none)",
    members=(
        "VOCdevkit/VOC2012/JPEGImages/",
        "VOCdevkit/VOC2012/SegmentationClass/",
        "VOCdevkit/VOC2012/ImageSets/Segmentation/",
    ),
)
_VOC2012_VAL = RawLayout(
    split="val",
    images="VOCtrainval_11-May-2012/VOCdevkit/VOC2012/JPEGImages",
    masks="VOCtrainval_11-May-2012/VOCdevkit/VOC2012/SegmentationClass",
    image_suffix=".jpg",
    mask_suffix=".png",
    id_list="VOCtrainval_11-May-2012/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt",
)
_VOC2010 = Archive(
    filename="VOCtrainval_03-May-2010.tar",
    url="http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar",
    checksum="md5:da459979d0c395079b5c75ee67908abb",
    checksum_source="torchvision.datasets.VOCSegmentation (the VOC site publishes none)",
    members=("VOCdevkit/VOC2010/JPEGImages/", "VOCdevkit/VOC2010/ImageSets/Main/val.txt"),
)
_CONTEXT_MATS = Archive(
    filename="trainval.tar.gz",
    url="https://cs.stanford.edu/~roozbeh/pascal-context/trainval.tar.gz",
    checksum=None,
    checksum_source="none published (PASCAL-Context site); downloaded unverified",
    members=("trainval/",),
)
_COCO_VAL_IMAGES = Archive(
    filename="val2017.zip",
    url="http://images.cocodataset.org/zips/val2017.zip",
    checksum="sha1:4950dc9d00dbe1c933ee0170f5797584351d2a41",
    checksum_source="GluonCV scripts/datasets/mscoco.py (cocodataset.org publishes none)",
    members=("val2017/",),
)
_COCO_STUFF_MAPS = Archive(
    filename="stuffthingmaps_trainval2017.zip",
    url="http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip",
    checksum=None,
    checksum_source="none published (the COCO-Stuff README gives only its size, 659 MB)",
    members=("val2017/",),
)
_COCO_VAL = RawLayout(
    split="val",
    images="val2017/val2017",
    masks="stuffthingmaps_trainval2017/val2017",
    image_suffix=".jpg",
    mask_suffix=".png",
)
_CITYSCAPES_NOTE = "an md5 is shown on the login-only Cityscapes download page; not copied here"
_ADE = Archive(
    filename="ADEChallengeData2016.zip",
    url="http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
    checksum="sha1:219e1696abb36c8ba3a3afe7fb2f4b4606a897c7",
    checksum_source="GluonCV scripts/datasets/ade20k.py (the MIT site publishes none)",
    members=(
        "ADEChallengeData2016/images/validation/",
        "ADEChallengeData2016/annotations/validation/",
    ),
)


def _builtin_specs() -> list[DatasetSpec]:
    names = read_packaged_class_names
    return [
        DatasetSpec(
            name="voc21",
            display_name="PV-21: PASCAL VOC 2012 val with background",
            class_names=names("voc21"),
            ignore_index=IGNORE_INDEX,
            background_index=0,
            label_transform=labels.identity(21),
            archives=(_VOC2012,),
            layout=_VOC2012_VAL,
            conversion="SegmentationClass palette PNGs as they are: 0 background, 1-20 the "
            "classes, 255 (object borders) ignored",
        ),
        DatasetSpec(
            name="voc20",
            display_name="PV-20: PASCAL VOC 2012 val, background ignored",
            class_names=names("voc20"),
            ignore_index=IGNORE_INDEX,
            background_index=None,
            label_transform=labels.reduce_zero_label(20),
            archives=(_VOC2012,),
            layout=_VOC2012_VAL,
            conversion="SegmentationClass with background ignored: 0 -> 255, k -> k-1 "
            "(TCL's PascalVOCDataset20, reduce_zero_label)",
        ),
        DatasetSpec(
            name="context59",
            display_name="PC-59: PASCAL Context val (VOC 2010), 59 classes",
            class_names=names("context59"),
            ignore_index=IGNORE_INDEX,
            background_index=None,
            label_transform=labels.pascal_context_59(),
            archives=(_VOC2010, _CONTEXT_MATS),
            layout=RawLayout(
                split="val",
                images="VOCtrainval_03-May-2010/VOCdevkit/VOC2010/JPEGImages",
                masks="trainval/trainval",
                image_suffix=".jpg",
                mask_suffix=".mat",
                id_list="VOCtrainval_03-May-2010/VOCdevkit/VOC2010/ImageSets/Main/val.txt",
            ),
            conversion="LabelMap of the official 459-class .mat files -> the 59 classes in "
            "mmseg's (alphabetical) order; unlabelled and the other 400 classes ignored. "
            "mmseg/TCL build their PNGs with the Detail API from trainval_merged.json instead; "
            "mmseg PR #474 reports the two differ on some pixels",
        ),
        DatasetSpec(
            name="coco_object",
            display_name="CO-80: COCO-Object val2017, 80 things + background",
            class_names=names("coco_object"),
            ignore_index=IGNORE_INDEX,
            background_index=0,
            label_transform=labels.coco_object_81(),
            archives=(_COCO_VAL_IMAGES, _COCO_STUFF_MAPS),
            layout=_COCO_VAL,
            conversion="stuffthingmaps: things -> 1..80, stuff and unlabeled -> 0 background "
            "(TCL/GroupViT convert_coco_object.py)",
        ),
        DatasetSpec(
            name="coco_stuff",
            display_name="CS-171: COCO-Stuff 164k val2017",
            class_names=names("coco_stuff"),
            ignore_index=IGNORE_INDEX,
            background_index=None,
            label_transform=labels.coco_stuff_171(),
            archives=(_COCO_VAL_IMAGES, _COCO_STUFF_MAPS),
            layout=_COCO_VAL,
            conversion="stuffthingmaps ids 0..181 minus the 11 unused thing ids -> 0..170, "
            "255 unlabeled ignored (mmseg coco_stuff164k converter)",
        ),
        DatasetSpec(
            name="cityscapes",
            display_name="City: Cityscapes val, 19 classes",
            class_names=names("cityscapes"),
            ignore_index=IGNORE_INDEX,
            background_index=None,
            label_transform=labels.cityscapes_train_ids(),
            archives=(
                Archive(
                    filename="gtFine_trainvaltest.zip",
                    url=None,
                    checksum=None,
                    checksum_source=_CITYSCAPES_NOTE,
                    members=("gtFine/val/",),
                    manual_page="https://www.cityscapes-dataset.com/file-handling/?packageID=1",
                ),
                Archive(
                    filename="leftImg8bit_trainvaltest.zip",
                    url=None,
                    checksum=None,
                    checksum_source=_CITYSCAPES_NOTE,
                    members=("leftImg8bit/val/",),
                    manual_page="https://www.cityscapes-dataset.com/file-handling/?packageID=3",
                ),
            ),
            layout=RawLayout(
                split="val",
                images="leftImg8bit_trainvaltest/leftImg8bit/val",
                masks="gtFine_trainvaltest/gtFine/val",
                image_suffix="_leftImg8bit.png",
                mask_suffix="_gtFine_labelIds.png",
            ),
            conversion="gtFine labelIds -> the 19 train ids of cityscapesScripts, all other "
            "ids ignored (same result as createTrainIdLabelImgs)",
        ),
        DatasetSpec(
            name="ade20k",
            display_name="ADE: ADE20K (SceneParsing) val, 150 classes",
            class_names=names("ade20k"),
            ignore_index=IGNORE_INDEX,
            background_index=None,
            label_transform=labels.reduce_zero_label(150),
            archives=(_ADE,),
            layout=RawLayout(
                split="val",
                images="ADEChallengeData2016/ADEChallengeData2016/images/validation",
                masks="ADEChallengeData2016/ADEChallengeData2016/annotations/validation",
                image_suffix=".jpg",
                mask_suffix=".png",
            ),
            conversion="reduce_zero_label: 0 (other) -> 255, k -> k-1",
        ),
    ]


_REGISTRY: dict[str, DatasetSpec] = {spec.name: spec for spec in _builtin_specs()}


def register_dataset(spec: DatasetSpec, *, replace: bool = False) -> None:
    """Add a benchmark (or, with ``replace``, swap one, e.g. to point it at a local mirror)."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


def get_dataset_spec(name: str) -> DatasetSpec:
    spec = _REGISTRY.get(name)
    if spec is None:
        raise InputError(f"unknown dataset {name!r} (known: {', '.join(list_datasets())})")
    return spec


def coco_stuff_stuff_names() -> tuple[str, ...]:
    """The 91 COCO-Stuff *stuff* names: PV-21 counts a pixel given any of them as background."""
    return read_packaged_class_names("coco_stuff")[len(labels.COCO_THING_IDS) :]
