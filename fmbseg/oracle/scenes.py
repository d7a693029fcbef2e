"""Procedural scenes with exact label maps: the ground truth behind the oracle fakes.

A world gives every class one base colour, chosen so that colours stay far apart and no colour
lies near the straight line between two others. Scenes paint a label map in those colours plus
a small texture; the class of any pixel is then its nearest base colour, which is how the fakes
"see". Because blends of two colours (what a bilinear resize makes at a boundary) never come
near a third colour, a decoder with a tolerance reports such blends as :data:`AMBIGUOUS`
instead of inventing a class, and :meth:`OracleWorld.unblend` can give each blend to one of
the two classes it mixes.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.draw import polygon as draw_polygon
from skimage.measure import label as label_components

UNKNOWN = -1
"""Label of the unknown background colour, which belongs to no vocabulary."""
AMBIGUOUS = -2
"""Decoded label of a colour farther than the tolerance from every base colour."""
IGNORE_PNG = 255
"""Value that stands for :data:`UNKNOWN` in label PNG files."""

DEFAULT_CLASSES: tuple[str, ...] = (
    "cat",
    "dog",
    "grass",
    "sky",
    "traffic light",
    "crème brûlée",
    "road",
    "person",
)

_TEXTURES = ("flat", "stripes", "checker", "noise")
_ROUNDING = 0.5 * np.sqrt(3.0)  # largest colour error that rounding to uint8 adds


def normalize_name(name: str) -> str:
    """Names compare in NFC, case-folded, so "Crème" typed either way is the same class."""
    return unicodedata.normalize("NFC", name).casefold().strip()


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from points ``p`` to segments ``[a, b]`` (all broadcast over leading axes)."""
    ab = b - a
    length2 = np.maximum((ab * ab).sum(-1, keepdims=True), 1e-12)
    t = np.clip(((p - a) * ab).sum(-1, keepdims=True) / length2, 0.0, 1.0)
    return np.linalg.norm(p - (a + t * ab), axis=-1)


def palette_separation(colours: np.ndarray) -> float:
    """Smallest distance from any colour to any other colour or segment between two others.

    Half of it is the decoding tolerance: a pixel within it of a base colour is that class, and
    a blend of two classes (plus texture) can never fall within it of a third.
    """
    c = np.asarray(colours, dtype=np.float64)
    n = len(c)
    d = _segment_distance(c[:, None, None], c[None, :, None], c[None, None, :])
    i, j, k = np.meshgrid(np.arange(n), np.arange(n), np.arange(n), indexing="ij")
    return float(d[(i != j) & (i != k)].min())


@functools.lru_cache(maxsize=32)
def _choose_palette(n: int, low: int, high: int, seed: int) -> np.ndarray:
    """Greedy farthest-point choice on a colour lattice, counting segments between picks.

    Cached (read-only result): worlds are rebuilt often in tests and fakes.
    """
    rng = np.random.default_rng([seed, 0])
    axis = np.unique(np.linspace(low, high, 12).round())
    cands = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    chosen = [int(rng.integers(len(cands)))]
    score = np.full(len(cands), np.inf)
    for _ in range(n - 1):
        new, old = cands[chosen[-1]], cands[chosen[:-1]]
        # a candidate near a pick or a segment between picks, or a pick near a segment from
        # the candidate to another pick, would let a blend of two classes decode as a third
        terms = [np.linalg.norm(cands - new, axis=-1)]
        if len(old):
            terms += [
                _segment_distance(cands[:, None], old[None], new).min(1),
                _segment_distance(old[None], cands[:, None], new).min(1),
                _segment_distance(new, cands[:, None], old[None]).min(1),
            ]
        score = np.minimum(score, np.min(terms, axis=0))
        score[chosen] = -np.inf
        chosen.append(int(score.argmax()))
    colours = cands[chosen].astype(np.uint8)
    colours.flags.writeable = False
    return colours


@dataclass(frozen=True, eq=False)
class _Texture:
    kind: str
    direction: np.ndarray  # unit RGB direction of the offset
    period: int
    orientation: tuple[int, int]  # stripes run across x * ox + y * oy


@dataclass(frozen=True)
class OracleWorld:
    """Class names, their base colours and textures; everything derives from ``seed``.

    ``colours`` has one row per class and a last row for the unknown background colour.
    ``texture_norm`` bounds the length of the texture offset added to a base colour; it must
    stay below the decoding tolerance, which shrinks as classes are added.
    """

    class_names: tuple[str, ...] = DEFAULT_CLASSES
    seed: int = 0
    texture_norm: float = 10.0
    colours: np.ndarray = field(init=False, repr=False, compare=False)
    separation: float = field(init=False, repr=False, compare=False)
    _textures: tuple[_Texture, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = tuple(self.class_names)
        keys = [normalize_name(n) for n in names]
        if len(names) < 2 or any(not k for k in keys) or len(set(keys)) != len(keys):
            raise ValueError(f"need at least two distinct, non-empty class names, got {names!r}")
        if len(names) >= IGNORE_PNG:
            raise ValueError(f"at most {IGNORE_PNG - 1} classes fit in a label PNG")
        if self.texture_norm < 0:
            raise ValueError("texture_norm must be >= 0")
        low = int(np.ceil(self.texture_norm + 1))
        colours = _choose_palette(len(names) + 1, low, 255 - low, self.seed)
        separation = palette_separation(colours)
        if self.texture_norm + _ROUNDING >= separation / 2:
            raise ValueError(
                f"{len(names)} classes leave a decoding tolerance of {separation / 2:.1f}; "
                f"texture_norm={self.texture_norm} must be below it (lower it, or use fewer classes)"
            )
        rng = np.random.default_rng([self.seed, 1])
        textures = []
        for _ in range(len(names) + 1):
            direction = rng.standard_normal(3)
            textures.append(
                _Texture(
                    kind=str(rng.choice(_TEXTURES)),
                    direction=direction / np.linalg.norm(direction),
                    period=int(rng.integers(2, 7)),
                    orientation=((1, 0), (0, 1), (1, 1), (1, -1))[rng.integers(4)],
                )
            )
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "colours", colours)
        object.__setattr__(self, "separation", separation)
        object.__setattr__(self, "_textures", tuple(textures))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def tolerance(self) -> float:
        """Largest distance from a base colour that still decodes to that class."""
        return self.separation / 2

    def class_id(self, name: str) -> int:
        keys = [normalize_name(n) for n in self.class_names]
        try:
            return keys.index(normalize_name(name))
        except ValueError:
            raise KeyError(f"{name!r} is not a class of this world") from None

    def nearest(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Palette index (``num_classes`` = unknown colour) and distance per pixel.

        ``pixels`` is (..., 3) in the 0-255 scale, any numeric dtype (floats from a resize too).
        """
        x = np.asarray(pixels, dtype=np.float32)
        c = self.colours.astype(np.float32)
        d2 = (x * x).sum(-1, keepdims=True) - 2.0 * (x @ c.T) + (c * c).sum(-1)
        index = d2.argmin(-1)
        distance = np.sqrt(np.maximum(np.take_along_axis(d2, index[..., None], -1)[..., 0], 0))
        return index.astype(np.int32), distance

    def decode(self, image: np.ndarray, tolerance: float | None = None) -> np.ndarray:
        """(..., 3) colours -> int32 labels: class id, :data:`UNKNOWN`, or :data:`AMBIGUOUS`.

        Without ``tolerance`` every pixel takes its nearest base colour (exact on rendered
        images); with it, pixels farther than ``tolerance`` from every colour are ambiguous.
        """
        index, distance = self.nearest(image)
        labels = np.where(index == self.num_classes, UNKNOWN, index).astype(np.int32)
        if tolerance is not None:
            labels[distance > tolerance] = AMBIGUOUS
        return labels

    def unblend(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Palette index per pixel, reading any pixel beyond the tolerance as a blend.

        Returns the index and whether the pixel was clean (within the tolerance). A blend is
        given to the nearer end of the nearest segment between two base colours: a wide
        bilinear ramp between two classes then splits between those two, where plain nearest
        colour could name a third class near the ramp's middle.
        """
        x = np.asarray(pixels, dtype=np.float32)
        index, distance = self.nearest(x)
        clean = distance <= self.tolerance
        blends = x[~clean]
        if len(blends):
            c = self.colours.astype(np.float32)
            start, end = np.triu_indices(len(c), 1)
            a, ab = c[start], c[end] - c[start]
            ab2, a_ab = (ab * ab).sum(-1), (a * ab).sum(-1)
            picked = []
            for chunk in np.array_split(blends, -(-len(blends) // 65536)):
                t = np.clip((chunk @ ab.T - a_ab) / ab2, 0.0, 1.0)
                d2 = ((chunk[:, None] - a[None] - t[..., None] * ab[None]) ** 2).sum(-1)
                best = d2.argmin(1)
                far_end = t[np.arange(len(chunk)), best] > 0.5
                picked.append(np.where(far_end, end[best], start[best]))
            index[~clean] = np.concatenate(picked)
        return index, clean

    def render(self, labels: np.ndarray, seed: int = 0) -> np.ndarray:
        """Paint a label map (class ids and :data:`UNKNOWN`) as a textured uint8 RGB image."""
        labels = np.asarray(labels)
        if (
            labels.ndim != 2
            or labels.min(initial=0) < UNKNOWN
            or labels.max(initial=0) >= self.num_classes
        ):
            raise ValueError("labels must be 2-D class ids of this world or UNKNOWN")
        index = np.where(labels == UNKNOWN, self.num_classes, labels)
        image = self.colours[index].astype(np.float64)
        rng = np.random.default_rng(seed)
        for k in np.unique(index):
            texture = self._textures[k]
            if texture.kind == "flat" or self.texture_norm == 0:
                continue
            ys, xs = np.nonzero(index == k)
            if texture.kind == "noise":
                offset = rng.uniform(-1, 1, (len(ys), 3)) * (self.texture_norm / np.sqrt(3))
            else:
                if texture.kind == "stripes":
                    ox, oy = texture.orientation
                    phase = ((xs * ox + ys * oy) // texture.period) % 2
                else:  # checker
                    phase = (xs // texture.period + ys // texture.period) % 2
                offset = (2.0 * phase - 1.0)[:, None] * (self.texture_norm * texture.direction)
            image[ys, xs] += offset
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)


@dataclass(frozen=True, eq=False)
class Scene:
    """One procedural image and its exact labels (class ids, :data:`UNKNOWN` for unknown)."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    labels: np.ndarray  # (H, W) int32
    present: tuple[int, ...]  # class ids that occur, sorted, UNKNOWN left out
    background: int  # class id (or UNKNOWN) the scene was filled with before the shapes
    seed: int


def _boundary(labels: np.ndarray) -> np.ndarray:
    """Pixels on the image frame or with a 4-neighbour of another label."""
    edge = np.ones_like(labels, dtype=bool)
    inner = edge[1:-1, 1:-1]
    c = labels[1:-1, 1:-1]
    inner[...] = (
        (c != labels[:-2, 1:-1])
        | (c != labels[2:, 1:-1])
        | (c != labels[1:-1, :-2])
        | (c != labels[1:-1, 2:])
    )
    return edge


def _shape_mask(
    rng: np.random.Generator,
    shape: tuple[int, int],
    centre: tuple[float, float],
    radii: tuple[float, float],
) -> np.ndarray:
    """A rectangle, ellipse or star-shaped polygon; never empty (the centre pixel is in it)."""
    height, width = shape
    cy, cx = centre
    ry, rx = radii
    kind = rng.integers(3)
    mask = np.zeros(shape, dtype=bool)
    if kind == 0:
        mask[
            max(0, int(cy - ry)) : int(np.ceil(cy + ry)),
            max(0, int(cx - rx)) : int(np.ceil(cx + rx)),
        ] = True
    elif kind == 1:
        ys = np.arange(height)[:, None] + 0.5
        xs = np.arange(width)[None, :] + 0.5
        mask = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0
    else:
        n = int(rng.integers(3, 9))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        scale = rng.uniform(0.5, 1.0, n)
        rows, cols = draw_polygon(
            cy + ry * scale * np.sin(angles), cx + rx * scale * np.cos(angles), shape
        )
        mask[rows, cols] = True
    mask[min(int(cy), height - 1), min(int(cx), width - 1)] = True
    return mask


def _nest(rng: np.random.Generator, labels: np.ndarray, world: OracleWorld) -> None:
    """Draw one ellipse strictly inside a region, ringed by at least two pixels of its host."""
    depth = ndimage.distance_transform_edt(~_boundary(labels))
    if depth.max() < 4:
        return
    ys, xs = np.nonzero(depth >= 0.8 * depth.max())
    pick = rng.integers(len(ys))
    y, x = int(ys[pick]), int(xs[pick])
    room = depth[y, x] - 2.5
    radii = (max(1.5, rng.uniform(0.5, 1.0) * room), max(1.5, rng.uniform(0.5, 1.0) * room))
    host = int(labels[y, x])
    cls = int(rng.choice([k for k in range(world.num_classes) if k != host]))
    yy, xx = np.ogrid[: labels.shape[0], : labels.shape[1]]
    labels[((yy - y) / radii[0]) ** 2 + ((xx - x) / radii[1]) ** 2 <= 1.0] = cls


def _absorb_small_regions(labels: np.ndarray, min_area: int) -> None:
    """Give regions under ``min_area`` pixels (slivers where shapes overlap) to their most
    common neighbour, as no segmenter would find them and they only make tests flaky.

    One region per pass: each pass joins two regions, so the loop ends.
    """
    while True:
        ids, _ = connected_regions(labels)
        areas = np.bincount(ids.ravel())
        region = int(areas.argmin())
        if areas[region] >= min_area or len(areas) == 1:
            return
        rows, cols = ndimage.find_objects((ids == region).astype(np.int8))[0]
        window = (
            slice(max(rows.start - 1, 0), rows.stop + 1),
            slice(max(cols.start - 1, 0), cols.stop + 1),
        )
        mask = ids[window] == region
        ring = ndimage.binary_dilation(mask) & ~mask
        labels[window][mask] = np.bincount(labels[window][ring] - UNKNOWN).argmax() + UNKNOWN


def make_scene(
    world: OracleWorld,
    height: int,
    width: int,
    seed: int,
    *,
    shapes: tuple[int, int] = (2, 6),
    background: str | int | None = None,
    unknown_background: bool = False,
    nest: bool = True,
    min_region: int = 8,
) -> Scene:
    """A background filled with ``shapes`` (min, max) random shapes of other classes.

    Shapes overlap and often start on the previous shape's edge, so regions touch; with
    ``nest`` one more shape is drawn strictly inside an existing region when there is room.
    ``unknown_background`` paints the background in the colour no vocabulary names. Regions
    smaller than ``min_region`` pixels are absorbed by a neighbour (unless the whole image is
    that small).
    """
    if height < 1 or width < 1:
        raise ValueError(f"scene size must be positive, got {height}x{width}")
    rng = np.random.default_rng(seed)
    if unknown_background:
        bg = UNKNOWN
    elif background is None:
        bg = int(rng.integers(world.num_classes))
    else:
        bg = world.class_id(background) if isinstance(background, str) else int(background)
    others = [k for k in range(world.num_classes) if k != bg]
    labels = np.full((height, width), bg, dtype=np.int32)
    previous: np.ndarray | None = None
    for _ in range(int(rng.integers(shapes[0], shapes[1] + 1))):
        if previous is not None and rng.random() < 0.5:
            edge_y, edge_x = np.nonzero(previous & ~ndimage.binary_erosion(previous))
            pick = rng.integers(len(edge_y))
            centre = (edge_y[pick] + 0.5, edge_x[pick] + 0.5)
        else:
            centre = (rng.uniform(0, height), rng.uniform(0, width))
        radii = (
            max(1.0, rng.uniform(0.08, 0.3) * height),
            max(1.0, rng.uniform(0.08, 0.3) * width),
        )
        previous = _shape_mask(rng, (height, width), centre, radii)
        labels[previous] = rng.choice(others)
    if nest:
        _nest(rng, labels, world)
    _absorb_small_regions(labels, min_region)
    present = tuple(int(k) for k in np.unique(labels) if k != UNKNOWN)
    return Scene(world.render(labels, seed), labels, present, bg, seed)


def connected_regions(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """4-connected regions of equal label -> (region id per pixel from 0, label per region)."""
    ids = label_components(labels, background=AMBIGUOUS - 1, connectivity=1).astype(np.int32) - 1
    _, first = np.unique(ids.ravel(), return_index=True)
    return ids, np.asarray(labels).ravel()[first].astype(np.int32)


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of the mask pixel farthest from its edge: a prompt that cannot miss the region.

    Integer coordinates, so flooring and rounding conventions land on the same pixel.
    """
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(depth.argmax()), depth.shape)
    return float(x), float(y)


def labels_at_points(labels: np.ndarray, points_xy: np.ndarray) -> np.ndarray:
    """Labels under (x, y) points; pixel (row r, column c) covers [c, c+1) x [r, r+1)."""
    points = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    cols = np.clip(np.floor(points[:, 0]).astype(int), 0, labels.shape[1] - 1)
    rows = np.clip(np.floor(points[:, 1]).astype(int), 0, labels.shape[0] - 1)
    return labels[rows, cols]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def patch_vote(
    values: np.ndarray, n_values: int, patch_size: int, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted vote of values in [0, n_values) over each patch of (B, H, W) maps.

    Returns the winning value (B, h, w) (ties go to the smaller value) and its share of the
    patch's total weight. H and W must be multiples of ``patch_size``.
    """
    b, h, w = values.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"map size {h}x{w} is not a multiple of patch size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    patch_index = (
        np.arange(b)[:, None, None] * (gh * gw)
        + (np.arange(h) // patch_size)[None, :, None] * gw
        + (np.arange(w) // patch_size)[None, None, :]
    )
    keys = (patch_index * n_values + values).ravel()
    flat_weights = None if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    counts = np.bincount(keys, flat_weights, minlength=b * gh * gw * n_values).reshape(-1, n_values)
    winner = counts.argmax(1)
    share = counts[np.arange(len(counts)), winner] / counts.sum(1)
    return winner.reshape(b, gh, gw).astype(np.int32), share.reshape(b, gh, gw).astype(np.float32)


def patch_majority(labels: np.ndarray, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Majority label (class id or :data:`UNKNOWN`) of each patch of an (H, W) label map,
    and the fraction of the patch it covers."""
    labels = np.asarray(labels)
    winner, share = patch_vote(
        (labels - UNKNOWN)[None], int(labels.max()) - UNKNOWN + 1, patch_size
    )
    return winner[0] + UNKNOWN, share[0]


def write_scene_folder(
    world: OracleWorld,
    n: int,
    folder: str | Path,
    seed: int,
    sizes: Sequence[tuple[int, int]] = ((64, 64),),
    **scene_options: object,
) -> list[Scene]:
    """Write ``n`` scenes as ``images/NNNN.png`` and ``labels/NNNN.png`` plus ``classes.json``.

    Label PNGs are 8-bit class ids with :data:`IGNORE_PNG` for unknown pixels; scene ``i`` has
    size ``sizes[i % len(sizes)]`` and its own seed drawn from ``seed``.
    """
    root = Path(folder)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    seeds = np.random.SeedSequence(seed).generate_state(n) if n else []
    scenes = []
    for i, scene_seed in enumerate(seeds):
        height, width = sizes[i % len(sizes)]
        scene = make_scene(world, height, width, int(scene_seed), **scene_options)  # type: ignore[arg-type]
        Image.fromarray(scene.image).save(root / "images" / f"{i:04d}.png")
        png = np.where(scene.labels == UNKNOWN, IGNORE_PNG, scene.labels).astype(np.uint8)
        Image.fromarray(png).save(root / "labels" / f"{i:04d}.png")
        scenes.append(scene)
    meta = {
        "classes": list(world.class_names),
        "ignore_index": IGNORE_PNG,
        "world_seed": world.seed,
        "texture_norm": world.texture_norm,
    }
    (root / "classes.json").write_text(
        json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8"
    )
    return scenes


def read_labels(path: str | Path) -> np.ndarray:
    """A label PNG written by :func:`write_scene_folder` -> int32 labels with :data:`UNKNOWN`."""
    png = np.asarray(Image.open(path)).astype(np.int32)
    return np.where(png == IGNORE_PNG, UNKNOWN, png).astype(np.int32)
