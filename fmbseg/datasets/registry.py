"""The benchmarks of the evaluation protocols (TCL's seven, plus SCLIP's PC-60), one frozen spec
each (in the spirit of timm), and the unlabelled training splits that Stage 1 pseudo-labels.

A spec says what the download stage fetches (official URLs, published checksums), which members
of each archive it needs, where the evaluated split lies inside them, and how raw annotation
values become class indices. Class names ship as UTF-8 files in ``classes/``.

The training splits are images plus a vocabulary, no masks: the paper trains on COCO train2017
pseudo-labelled with the 171 COCO-Stuff names, and fine-tunes per benchmark on its own training
images with its own names. They share archives with the benchmarks where the files are the same
(a second dataset of one archive extracts its own part from the kept download). Their splits are
the official ones: VOC 2012 ``train.txt`` of the segmentation task (1,464 images; "trainaug" adds
the unofficial SBD set), VOC 2010 ``Main/train.txt`` for PASCAL-Context (4,998 images; mmseg
lists its train split with the Detail API instead, which may differ by a few images), ADE20K's
20,210 and Cityscapes' 2,975 training images, COCO's 118,287.

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

from dataclasses import dataclass, replace
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

    def with_members(self, *members: str) -> Archive:
        """The same file for a dataset that needs other parts of it: the download is shared, and
        each dataset extracts its own parts into the same folder."""
        return replace(self, members=members)


@dataclass(frozen=True, kw_only=True)
class RawLayout:
    """Where the converted split lies in the extracted archives, relative to ``<root>/raw``.

    Each archive extracts to ``raw/<archive name without extension>/``. An image is
    ``images/<id><image_suffix>`` and its annotation ``masks/<id><mask_suffix>``; ids come from
    ``id_list`` (one per line) or, without one, from every image below ``images``.
    """

    split: str
    images: str
    image_suffix: str
    # None: an unlabelled training split; only its images (and the vocabulary) are converted.
    masks: str | None = None
    mask_suffix: str = ".png"
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
    members=(
        "VOCdevkit/VOC2010/JPEGImages/",
        "VOCdevkit/VOC2010/ImageSets/Main/val.txt",
        "VOCdevkit/VOC2010/ImageSets/Main/train.txt",
    ),
)
_CONTEXT_MATS = Archive(
    filename="trainval.tar.gz",
    url="https://cs.stanford.edu/~roozbeh/pascal-context/trainval.tar.gz",
    checksum=None,
    checksum_source="none published (PASCAL-Context site); downloaded unverified",
    members=("trainval/",),
)
_CONTEXT_VAL = RawLayout(
    split="val",
    images="VOCtrainval_03-May-2010/VOCdevkit/VOC2010/JPEGImages",
    masks="trainval/trainval",
    image_suffix=".jpg",
    mask_suffix=".mat",
    id_list="VOCtrainval_03-May-2010/VOCdevkit/VOC2010/ImageSets/Main/val.txt",
)
_COCO_VAL_IMAGES = Archive(
    filename="val2017.zip",
    url="http://images.cocodataset.org/zips/val2017.zip",
    checksum="sha1:4950dc9d00dbe1c933ee0170f5797584351d2a41",
    checksum_source="GluonCV scripts/datasets/mscoco.py (cocodataset.org publishes none)",
    members=("val2017/",),
)
_COCO_TRAIN_IMAGES = Archive(
    filename="train2017.zip",
    url="http://images.cocodataset.org/zips/train2017.zip",
    checksum="sha1:10ad623668ab00c62c096f0ed636d6aff41faca5",
    checksum_source="GluonCV scripts/datasets/mscoco.py (cocodataset.org publishes none)",
    members=("train2017/",),
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
_CITYSCAPES_IMAGES = Archive(
    filename="leftImg8bit_trainvaltest.zip",
    url=None,
    checksum=None,
    checksum_source=_CITYSCAPES_NOTE,
    members=("leftImg8bit/val/",),
    manual_page="https://www.cityscapes-dataset.com/file-handling/?packageID=3",
)
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


def _benchmark_specs() -> list[DatasetSpec]:
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
            layout=_CONTEXT_VAL,
            conversion="LabelMap of the official 459-class .mat files -> the 59 classes in "
            "mmseg's (alphabetical) order; unlabelled and the other 400 classes ignored. "
            "mmseg/TCL build their PNGs with the Detail API from trainval_merged.json instead; "
            "mmseg PR #474 reports the two differ on some pixels",
        ),
        DatasetSpec(
            name="context60",
            display_name="PC-60: PASCAL Context val (VOC 2010), 59 classes + background",
            class_names=("background", *names("context59")),
            ignore_index=IGNORE_INDEX,
            background_index=0,
            label_transform=labels.pascal_context_60(),
            archives=(_VOC2010, _CONTEXT_MATS),
            layout=_CONTEXT_VAL,
            conversion="LabelMap of the official 459-class .mat files -> background 0 and the "
            "59 classes 1..59 in mmseg's (alphabetical) order; unlabelled and the other 400 "
            "classes are background, nothing is ignored (mmseg's PascalContextDataset, "
            "SCLIP's PascalContext60Dataset)",
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
                _CITYSCAPES_IMAGES,
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


def _unlabelled(
    name: str, display_name: str, vocabulary: str, archive: Archive, layout: RawLayout
) -> DatasetSpec:
    """A training split with no masks, named in the vocabulary of benchmark ``vocabulary``."""
    class_names = read_packaged_class_names(vocabulary)
    return DatasetSpec(
        name=name,
        display_name=display_name,
        class_names=class_names,
        ignore_index=IGNORE_INDEX,
        background_index=None,
        label_transform=labels.identity(len(class_names)),
        archives=(archive,),
        layout=layout,
        conversion=f"images only (unlabelled), vocabulary of {vocabulary}",
    )


def _training_specs() -> list[DatasetSpec]:
    return [
        _unlabelled(
            "coco_train2017",
            "COCO train2017 images, unlabelled, COCO-Stuff 171-class vocabulary",
            "coco_stuff",
            _COCO_TRAIN_IMAGES,
            RawLayout(split="train", images="train2017/train2017", image_suffix=".jpg"),
        ),
        _unlabelled(
            "voc_train",
            "PASCAL VOC 2012 segmentation train images, unlabelled, 20 object classes",
            "voc20",
            _VOC2012,
            RawLayout(
                split="train",
                images="VOCtrainval_11-May-2012/VOCdevkit/VOC2012/JPEGImages",
                image_suffix=".jpg",
                id_list="VOCtrainval_11-May-2012/VOCdevkit/VOC2012/ImageSets/Segmentation/"
                "train.txt",
            ),
        ),
        _unlabelled(
            "context_train",
            "PASCAL Context train images (VOC 2010), unlabelled, 59 classes",
            "context59",
            _VOC2010,
            RawLayout(
                split="train",
                images="VOCtrainval_03-May-2010/VOCdevkit/VOC2010/JPEGImages",
                image_suffix=".jpg",
                id_list="VOCtrainval_03-May-2010/VOCdevkit/VOC2010/ImageSets/Main/train.txt",
            ),
        ),
        _unlabelled(
            "cityscapes_train",
            "Cityscapes train images, unlabelled, 19 classes",
            "cityscapes",
            _CITYSCAPES_IMAGES.with_members("leftImg8bit/train/"),
            RawLayout(
                split="train",
                images="leftImg8bit_trainvaltest/leftImg8bit/train",
                image_suffix="_leftImg8bit.png",
            ),
        ),
        _unlabelled(
            "ade20k_train",
            "ADE20K (SceneParsing) training images, unlabelled, 150 classes",
            "ade20k",
            _ADE.with_members("ADEChallengeData2016/images/training/"),
            RawLayout(
                split="train",
                images="ADEChallengeData2016/ADEChallengeData2016/images/training",
                image_suffix=".jpg",
            ),
        ),
    ]


_REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec for spec in [*_benchmark_specs(), *_training_specs()]
}


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
