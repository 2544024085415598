"""Draw a parsed Florence-2 answer on its image, as the plotting helpers of the model card do, with Pillow only.

Boxes (<OD>, <DENSE_REGION_CAPTION>, <CAPTION_TO_PHRASE_GROUNDING>, <OPEN_VOCABULARY_DETECTION>,
<REGION_PROPOSAL>) get an outline and a filled label tag; polygons (<REFERRING_EXPRESSION_SEGMENTATION>,
<REGION_TO_SEGMENTATION>, <OPEN_VOCABULARY_DETECTION>) an outline over a translucent fill; OCR quads
(<OCR_WITH_REGION>) an outline and their text. Text answers leave the image as it is. One colour per label, so
every "wheel" looks alike; unlabelled regions (proposals, segmentations) get a colour each.
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from .processor import to_pil

# Distinct colours (after Sasha Trubetskoy's list), used in order of first appearance.
PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 200, 200),
    (240, 50, 230), (128, 128, 0), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128),
)
FILL_ALPHA = 96  # of 255: the image stays visible under a polygon


def draw_result(image, result: dict, task: str | None = None) -> Image.Image:
    """A new RGB image: `image` (whatever processor.to_pil accepts) with `result` drawn on it.

    `result` is what post_process_generation returns, {task: answer}, or the answer itself. Coordinates are pixels
    of `image`, which is never modified.
    """
    answer = _answer(result, task)
    canvas = to_pil(image)  # a copy, in RGB so that the colours are colours
    if not isinstance(answer, dict):  # a text answer
        return canvas
    line = max(2, round(max(canvas.size) / 300))
    font = _font(max(11, round(max(canvas.size) / 50)))
    colours = _Colours()

    polygons = answer.get("polygons") or []
    polygon_labels = answer.get("polygons_labels", answer.get("labels")) or []
    if polygons:
        overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
        fill = ImageDraw.Draw(overlay)
        for i, instance in enumerate(polygons):
            for polygon in instance:
                if len(polygon) >= 6:
                    fill.polygon(_points(polygon), fill=(*colours(_at(polygon_labels, i), i), FILL_ALPHA))
        canvas = Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    for i, instance in enumerate(polygons):
        colour = colours(_at(polygon_labels, i), i)
        for polygon in instance:
            points = _points(polygon)
            if len(points) >= 3:
                draw.polygon(points, outline=colour, width=line)
            elif len(points) == 2:
                draw.line(points, fill=colour, width=line)
        if instance and instance[0] and _at(polygon_labels, i):
            _tag(draw, _points(instance[0])[0], _at(polygon_labels, i), colour, font)

    box_labels = answer.get("bboxes_labels", answer.get("labels")) or []
    for i, box in enumerate(answer.get("bboxes") or []):
        colour = colours(_at(box_labels, i), i)
        x0, x1 = sorted((round(box[0]), round(box[2])))  # the model may give x2 < x1
        y0, y1 = sorted((round(box[1]), round(box[3])))
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        if _at(box_labels, i):
            _tag(draw, (x0, y0), _at(box_labels, i), colour, font)

    ocr_labels = answer.get("labels") or []
    for i, quad in enumerate(answer.get("quad_boxes") or []):
        colour = colours(_at(ocr_labels, i), i)
        draw.polygon(_points(quad), outline=colour, width=line)
        if _at(ocr_labels, i):
            _tag(draw, _points(quad)[0], _at(ocr_labels, i), colour, font)
    return canvas


def _answer(result, task: str | None):
    """The answer inside {task: answer}, or `result` when it is the answer already."""
    if isinstance(result, dict):
        if task is not None and task in result:
            return result[task]
        if len(result) == 1:
            (key, value), = result.items()
            if isinstance(key, str) and key.startswith("<"):
                return value
    return result


class _Colours:
    """Colour of a label, given in order of first appearance; an empty label gets the colour of its index."""

    def __init__(self):
        self.seen: dict[str, tuple[int, int, int]] = {}

    def __call__(self, label: str, index: int) -> tuple[int, int, int]:
        if not label:
            return PALETTE[index % len(PALETTE)]
        if label not in self.seen:
            self.seen[label] = PALETTE[len(self.seen) % len(PALETTE)]
        return self.seen[label]


def _tag(draw: ImageDraw.ImageDraw, at: tuple[float, float], label: str, colour, font) -> None:
    """`label` in white on a `colour` tag just above `at` (just below it when there is no room above)."""
    x, y = round(at[0]), round(at[1])
    try:
        left, top, right, bottom = draw.textbbox((x, y), label, font=font, anchor="lb")
    except UnicodeEncodeError:  # the bitmap fallback font knows Latin-1 only
        label = label.encode("latin-1", errors="replace").decode("latin-1")
        left, top, right, bottom = draw.textbbox((x, y), label, font=font, anchor="lb")
    pad = 2
    if top - pad < 0:  # no room above: hang the tag inside, below the corner
        top, bottom = y, y + (bottom - top)
    draw.rectangle((left - pad, top - pad, right + pad, bottom), fill=colour)
    draw.text((left, bottom), label, font=font, fill="white", anchor="lb")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow's built-in Aileron, needs FreeType
    except ImportError:
        return ImageFont.load_default()


def _points(flat) -> list[tuple[float, float]]:
    return [(flat[j], flat[j + 1]) for j in range(0, len(flat) - 1, 2)]


def _at(labels, i: int) -> str:
    return str(labels[i]) if i < len(labels) else ""
