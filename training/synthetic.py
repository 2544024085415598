"""Synthetic DocVQA-shaped documents, for runs that cannot download DocVQA (the offline demo, tests).

    python -m training.synthetic OUT_DIR [--train-documents 400] [--validation-documents 60] [--seed 0] [--overwrite]
                                         [--captions]

Pages are drawn with PIL: invoices, forms, letters and tables, mostly grayscale like DocVQA's scans, some in colour.
Each page has a coloured header band, a very large title word, and sometimes a stamp and a signature; invoices and
tables have 2-7 data rows. The questions mix two families:
- answered from layout, colour and shape, which a small model can learn in minutes (the demo's, at 192x192):
  `kind`, `header_color` (colour pages only), `stamp`, `signature`, `row_count`, `largest_word`;
- reading small print, which needs a real pretrained model: `invoice_number`, `date`, `total_amount`, `name`.
Every page asks all of its learnable questions and one or two reading questions, so a small model can show ANLS
rising within minutes while the reading questions stay as hard as in DocVQA.
With --captions, each page has one `<CAPTION>` row instead, whose answer says what the page shows (the demo's
pretraining task); caption pages come from page streams of their own, never the question pages.

The rows follow HuggingFaceM4/DocumentVQA: one row per question, several rows per page (same docId, same image
bytes), our question type as the single item of `question_types`. The datasets Arrow format stores each row's image
bytes again (it cannot share a cell between rows), as DocumentVQA's own files do (the data loader's image key is a
hash of the bytes, so every question of a page still maps to one image).
Everything is a function of (seed, split, page index): the same seed gives byte-identical pages and rows, and the
validation pages come from a separate stream, so they never appear in training and stay the same when the number of
training pages changes. docIds: training pages 0.., validation pages 1,000,000..; questionId = docId * 10 + question.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import io
import math
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import datasets
from PIL import Image, ImageDraw, ImageFont

PALETTE = {"red": (200, 35, 35), "green": (30, 140, 60), "blue": (35, 75, 205), "orange": (240, 135, 20),
           "purple": (125, 45, 165), "gray": (125, 125, 125)}
COLOR_ALIASES = {"gray": ["grey"]}
KINDS = ("invoice", "form", "letter", "table")
TITLES = {"invoice": ("INVOICE", "RECEIPT"), "form": ("FORM", "APPLICATION"), "letter": ("LETTER", "MEMO"),
          "table": ("REPORT", "STATEMENT")}
STAMP_WORDS = ("PAID", "RECEIVED", "APPROVED", "COPY", "FILED")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}
# page streams: the question splits, and the caption pages the demo pretrains on (never the same pages)
FIRST_DOC_ID = {"train": 0, "validation": 1_000_000, "captions": 2_000_000, "captions-validation": 3_000_000}
MAX_DOCUMENTS = 1_000_000
RGB_SHARE = 0.35  # DocVQA pages are mostly grayscale scans; colour questions are asked on colour pages only

FIRST_NAMES = ("James", "Mary", "Robert", "Linda", "Michael", "Susan", "David", "Karen", "William", "Nancy", "Richard",
               "Betty", "Thomas", "Helen", "Charles", "Sandra", "Daniel", "Donna", "Paul", "Carol", "Mark", "Ruth",
               "George", "Sharon", "Steven", "Laura", "Edward", "Emily", "Brian", "Anna")
LAST_NAMES = ("Smith", "Johnson", "Williams", "Brown", "Jones", "Miller", "Davis", "Wilson", "Anderson", "Taylor",
              "Moore", "Martin", "Jackson", "Thompson", "White", "Harris", "Clark", "Lewis", "Walker", "Hall", "Allen",
              "Young", "King", "Wright", "Scott", "Green", "Baker", "Adams", "Nelson", "Carter")
COMPANIES = ("Acme Supply Co.", "Northwind Traders", "Blue Ridge Labs", "Summit Packaging", "Harbor Freight Lines",
             "Lakeside Printing", "Pioneer Chemicals", "Redwood Research", "Granite Paper Mills", "Oak Valley Farms",
             "Silverline Tools", "Crescent Foods", "Atlas Instruments", "Meridian Health", "Keystone Office")
STREETS = ("Main St.", "Oak Ave.", "Maple Rd.", "Park Blvd.", "Cedar Ln.", "Elm St.", "Lake Dr.", "Hill Rd.")
CITIES = (("Richmond", "VA"), ("Raleigh", "NC"), ("Louisville", "KY"), ("Denver", "CO"), ("Austin", "TX"),
          ("Columbus", "OH"), ("Madison", "WI"), ("Portland", "OR"), ("Albany", "NY"), ("Trenton", "NJ"))
ITEMS = ("Paper, letter size (box)", "Toner cartridge", "Filing cabinet", "Desk lamp", "Printer service", "Shipping",
         "Binder clips", "Lab gloves (case)", "Sample vials", "Consulting hours", "Software licence", "Office chair",
         "Courier delivery", "Data analysis")
REGIONS = ("North", "South", "East", "West", "Central", "Coastal", "Mountain", "Export", "Retail", "Wholesale")
FORM_FIELDS = ("Department", "Employee ID", "Telephone", "Project code", "Supervisor", "Location", "Account no.")
SENTENCES = ("The committee reviewed the results of the recent study.", "We enclose the samples you requested.",
             "The figures below are preliminary and may change after the audit.", "Please return the signed copy.",
             "Our staff will contact your office to arrange a meeting.", "Thank you for your continued support.",
             "The shipment left our warehouse on schedule.", "A summary of the findings is attached.",
             "We agreed to continue the program next year.", "Payment should reach us within thirty days.",
             "The board will discuss the budget at its next meeting.", "Please let us know if anything is missing.")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")

QUESTIONS = {
    "kind": ("What kind of document is this?", "What type of document is shown?", "What is this document?"),
    "header_color": ("What color is the header?", "What is the color of the header band?",
                     "Which color is the bar at the top of the page?"),
    "stamp": ("Is there a stamp on this document?", "Does the page have a stamp?", "Has this document been stamped?"),
    "signature": ("Is the document signed?", "Does this document have a signature?", "Is there a signature?"),
    "row_count": ("How many rows does the table have?", "How many rows are in the table?",
                  "How many data rows does the table contain?"),
    "largest_word": ("What is the largest word printed on the page?", "Which word is printed in the biggest letters?",
                     "What is the big title word?"),
    "invoice_number": ("What is the invoice number?", "Which invoice number is given?"),
    "date": ("What is the date on this document?", "What date is written on the page?", "When is it dated?"),
    "total_amount": ("What is the total amount?", "What is the total?", "How much is the total?"),
    "name": {"invoice": ("Who is the invoice billed to?", "To whom is the invoice addressed?"),
             "form": ("What is the name of the applicant?", "Who filled in the form?"),
             "letter": ("Who wrote the letter?", "Who is the sender of the letter?"),
             "table": ("Who prepared the report?", "Whose name is given as preparer?")},
}
LEARNABLE = ("kind", "header_color", "stamp", "signature", "row_count", "largest_word")
READING = ("invoice_number", "date", "total_amount", "name")

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in page pixels


@dataclass(frozen=True)
class DocumentSpec:
    """What a page shows. Every answer is read from here, and `render` draws exactly this."""

    kind: str
    rgb: bool
    landscape: bool
    header_color: str
    title: str
    stamp: str | None  # the stamp's word, None for no stamp
    stamp_color: str
    signed: bool
    columns: tuple[str, ...]  # table header; empty for forms and letters
    rows: tuple[tuple[str, ...], ...]  # data rows, the last cell an amount
    name: str
    date: str
    invoice_number: str  # "" except on invoices
    total: str  # "" without a table
    layout_seed: int  # filler text and position jitter, which no answer depends on


@dataclass(frozen=True)
class Layout:
    """Where `render` drew the parts that answers depend on (for tests and for looking at samples)."""

    header: Box
    title: Box
    rows: tuple[Box, ...]
    stamp: Box | None
    signature: Box | None


class Question(NamedTuple):
    type: str
    question: str
    answers: list[str]


@dataclass(frozen=True)
class Document:
    doc_id: int
    spec: DocumentSpec
    png: bytes
    questions: tuple[Question, ...]


# ------------------------------------------------------------------------------------------------- sampling
def sample_spec(rng: random.Random) -> DocumentSpec:
    kind = rng.choice(KINDS)
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    columns, rows = (), ()
    if kind == "invoice":
        columns = ("Description", "Qty", "Unit price", "Amount")
        rows = tuple(invoice_row(rng) for _ in range(rng.randint(2, 7)))
    elif kind == "table":
        columns = ("Region", "Q1", "Q2", "Q3", "Total")
        rows = tuple(table_row(region, rng) for region in rng.sample(REGIONS, rng.randint(2, 7)))
    total = money(sum(float(row[-1].strip("$").replace(",", "")) for row in rows)) if rows else ""
    return DocumentSpec(
        kind=kind, rgb=rng.random() < RGB_SHARE, landscape=kind == "table" and rng.random() < 0.8,
        header_color=rng.choice(list(PALETTE)), title=rng.choice(TITLES[kind]),
        stamp=rng.choice(STAMP_WORDS) if rng.random() < 0.5 else None,
        stamp_color=rng.choice(("red", "blue", "purple", "green")), signed=rng.random() < 0.5,
        columns=columns, rows=rows, name=name, date=random_date(rng),
        invoice_number=rng.choice(("INV-", "A-", "")) + str(rng.randint(10000, 99999)) if kind == "invoice" else "",
        total=total, layout_seed=rng.getrandbits(32))


def invoice_row(rng: random.Random) -> tuple[str, ...]:
    quantity, unit = rng.randint(1, 12), rng.randint(200, 40000) / 100
    return rng.choice(ITEMS), str(quantity), money(unit), money(quantity * unit)


def table_row(region: str, rng: random.Random) -> tuple[str, ...]:
    quarters = [rng.randint(100, 9999) for _ in range(3)]
    return region, *(f"{q:,}" for q in quarters), money(sum(quarters))


def money(value: float) -> str:
    return f"${value:,.2f}"


def random_date(rng: random.Random) -> str:
    year, month, day = rng.randint(1985, 2005), rng.randint(1, 12), rng.randint(1, 28)
    return rng.choice((f"{MONTHS[month - 1]} {day}, {year}", f"{month:02d}/{day:02d}/{year}",
                       f"{day} {MONTHS[month - 1]} {year}"))


def ask(spec: DocumentSpec, rng: random.Random) -> tuple[Question, ...]:
    """All of the page's learnable questions and one or two of its reading questions."""
    answers = {"kind": [spec.kind], "stamp": ["yes" if spec.stamp else "no"],
               "signature": ["yes" if spec.signed else "no"], "largest_word": [spec.title]}
    if spec.rgb:
        answers["header_color"] = [spec.header_color, *COLOR_ALIASES.get(spec.header_color, [])]
    if spec.rows:
        answers["row_count"] = [str(len(spec.rows)), NUMBER_WORDS[len(spec.rows)]]
    reading = {"date": [spec.date], "name": [spec.name]}
    if spec.total:
        reading["total_amount"] = [spec.total, spec.total.removeprefix("$")]
    if spec.invoice_number:
        digits = spec.invoice_number.rsplit("-", 1)[-1]
        reading["invoice_number"] = list(dict.fromkeys([spec.invoice_number, digits]))
    for question_type in rng.sample(sorted(reading), 1 if rng.random() < 0.5 else 2):
        answers[question_type] = reading[question_type]
    questions = []
    for question_type in (*LEARNABLE, *READING):
        if question_type in answers:
            phrasings = QUESTIONS[question_type]
            if question_type == "name":
                phrasings = phrasings[spec.kind]
            questions.append(Question(question_type, rng.choice(phrasings), answers[question_type]))
    return tuple(questions)


# ------------------------------------------------------------------------------------------------ rendering
INK = (25, 25, 25)
SIGNATURE_INK = (20, 30, 120)
HEADER_ROW = (70, 70, 70)
ZEBRA = (232, 232, 232)


@functools.cache
def font(size: int) -> ImageFont.FreeTypeFont:
    loaded = ImageFont.load_default(size=size)
    if not isinstance(loaded, ImageFont.FreeTypeFont):
        raise RuntimeError("synthetic pages need Pillow >= 10.1 built with FreeType (sized default font)")
    return loaded


def render(spec: DocumentSpec) -> tuple[Image.Image, Layout]:
    """The page (mode "RGB" or "L") and where its answer-bearing parts are."""
    rng = random.Random(spec.layout_seed)
    width, height = (800, 600) if spec.landscape else (600, 800)
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    margin = rng.randint(36, 52)
    band = rng.randint(44, 60)
    draw.rectangle((0, 0, width - 1, band - 1), fill=PALETTE[spec.header_color])
    company = rng.choice(COMPANIES)
    draw.text((margin, band // 2), company.upper(), font=font(20), fill="white", anchor="lm", stroke_width=1,
              stroke_fill="white")
    title_size = rng.randint(52, 64)
    centred = spec.kind in ("form", "table")
    title_at = (width // 2, band + 18) if centred else (margin, band + 18)
    title = draw.textbbox(title_at, spec.title, font=font(title_size), anchor="mt" if centred else "lt")
    draw.text(title_at, spec.title, font=font(title_size), fill=INK, anchor="mt" if centred else "lt",
              stroke_width=1, stroke_fill=INK)
    below_title = title[3] + 20
    body = {"invoice": draw_invoice, "form": draw_form, "letter": draw_letter, "table": draw_table_page}[spec.kind]
    rows, signature_at, stamp_at = body(draw, spec, rng, margin, below_title, width, height, company)
    # the marks draw from their own streams, so adding or removing one leaves the rest of the page unchanged
    signature = None
    if spec.signed:
        signature = draw_signature(draw, signature_at, random.Random(f"{spec.layout_seed}/signature"),
                                   SIGNATURE_INK if spec.rgb else INK)
    stamp = None
    if spec.stamp:
        stamp = draw_stamp(page, stamp_at, spec.stamp, PALETTE[spec.stamp_color],
                           random.Random(f"{spec.layout_seed}/stamp"))
    header = (0, 0, width, band)
    layout = Layout(header=header, title=title, rows=rows, stamp=stamp, signature=signature)
    return (page if spec.rgb else page.convert("L")), layout


def write(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, size: int = 14, bold: bool = False,
          fill=INK, anchor: str = "la") -> None:
    draw.text(xy, text, font=font(size), fill=fill, anchor=anchor)
    if bold:  # one typeface only: a second pass one pixel to the right (a stroke smudges small text)
        draw.text((xy[0] + 1, xy[1]), text, font=font(size), fill=fill, anchor=anchor)


def signature_line(draw, x: int, y: int, label: str) -> tuple[int, int]:
    """A line with a label under it; a signature, if any, goes on the line."""
    draw.line((x, y, x + 200, y), fill=INK, width=1)
    write(draw, (x, y + 5), label, size=12)
    return x + 10, y - 2


def draw_table(draw, x: int, y: int, widths: list[int], columns: tuple[str, ...], rows, row_height: int,
               grid: bool) -> tuple[tuple[Box, ...], int]:
    """A header row filled dark, data rows zebra-shaded and ruled; `grid` adds the vertical lines.
    Returns the data rows' boxes and the y under the table."""
    x1 = x + sum(widths)
    draw.rectangle((x, y, x1, y + row_height), fill=HEADER_ROW)
    edges = [x + sum(widths[:i]) for i in range(len(widths) + 1)]
    for left, column in zip(edges, columns):
        write(draw, (left + 8, y + row_height // 2), column, size=14, bold=True, fill="white", anchor="lm")
    boxes = [(x, y + (i + 1) * row_height, x1, y + (i + 2) * row_height) for i in range(len(rows))]
    for box in boxes[1::2]:  # shade first: a later fill would cover the rule above it
        draw.rectangle(box, fill=ZEBRA)
    for row, (_, top, _, _) in zip(rows, boxes):
        for left, right, cell in zip(edges, edges[1:], row):
            numeric = cell[:1].isdigit() or cell.startswith("$")
            write(draw, (right - 8, top + row_height // 2) if numeric else (left + 8, top + row_height // 2), cell,
                  anchor="rm" if numeric else "lm")
        draw.line((x, top + row_height, x1, top + row_height), fill=INK, width=2)
    bottom = y + (len(rows) + 1) * row_height
    for edge in edges if grid else (edges[0], edges[-1]):
        draw.line((edge, y, edge, bottom), fill=INK, width=2)
    return tuple(boxes), bottom


# Each page body draws below the title from `top` down and returns (the table's data-row boxes, the point a signature
# stands on, the stamp's centre), so `render` can add the optional marks in places that cover no answer.
def draw_invoice(draw, spec, rng, margin, top, width, height, company):
    right = width - margin
    write(draw, (right, top - 70), f"Invoice No.: {spec.invoice_number}", anchor="ra", bold=True)
    write(draw, (right, top - 48), f"Date: {spec.date}", anchor="ra")
    write(draw, (margin, top + 4), "BILL TO:", size=12, bold=True)
    street, (city, state) = f"{rng.randint(10, 9999)} {rng.choice(STREETS)}", rng.choice(CITIES)
    for i, line in enumerate((spec.name, street, f"{city}, {state} {rng.randint(10000, 99999)}")):
        write(draw, (margin, top + 22 + 18 * i), line)
    write(draw, (right, top + 4), "FROM:", size=12, bold=True, anchor="ra")
    write(draw, (right, top + 22), company, anchor="ra")
    rows, bottom = draw_table(draw, margin, top + 100, [width - 2 * margin - 270, 60, 100, 110], spec.columns,
                              spec.rows, rng.randint(28, 32), grid=False)
    draw.rectangle((right - 210, bottom + 14, right, bottom + 50), outline=INK, width=2)
    write(draw, (right - 200, bottom + 32), "TOTAL", bold=True, anchor="lm")
    write(draw, (right - 10, bottom + 32), spec.total, size=16, bold=True, anchor="rm")
    write(draw, (margin, height - 40), "Payment due within 30 days. Thank you for your business.", size=12)
    return rows, signature_line(draw, margin, height - 90, "Authorized signature"), (int(width * 0.66), height - 125)


def draw_form(draw, spec, rng, margin, top, width, height, company):
    form_code = f"Form {rng.randint(10, 99)}-{rng.choice('ABCDE')}  (Rev. 19{rng.randint(85, 99)})"
    write(draw, (width // 2, top - 12), form_code, size=12, anchor="mt")
    fields = [("Name of applicant", spec.name), ("Date", spec.date)]
    fields += [(label, f"{rng.randint(100, 99999)}") for label in rng.sample(FORM_FIELDS, 6)]
    box_width, box_height = (width - 2 * margin - 20) // 2, 56
    for i, (label, value) in enumerate(fields):
        x, y = margin + (i % 2) * (box_width + 20), top + 20 + (i // 2) * (box_height + 14)
        draw.rectangle((x, y, x + box_width, y + box_height), outline=INK, width=2)
        write(draw, (x + 6, y + 5), label.upper(), size=11)
        write(draw, (x + 10, y + 26), value, size=16)
    y = top + 20 + 4 * (box_height + 14) + 10
    for i, option in enumerate(("Full time", "Part time", "Contractor")):
        x = margin + i * 160
        draw.rectangle((x, y, x + 16, y + 16), outline=INK, width=2)
        if rng.random() < 0.4:
            draw.line((x + 3, y + 8, x + 7, y + 13, x + 14, y + 2), fill=INK, width=2)
        write(draw, (x + 24, y + 1), option)
    write(draw, (margin, y + 40), "I certify that the information given above is true and complete.", size=12)
    return (), signature_line(draw, margin, height - 90, "Signature of applicant"), (width - margin - 80, height - 110)


def draw_letter(draw, spec, rng, margin, top, width, height, company):
    right = width - margin
    write(draw, (right, top - 64), company, anchor="ra", size=12, bold=True)
    write(draw, (right, top - 46), f"{rng.randint(10, 9999)} {rng.choice(STREETS)}", anchor="ra", size=12)
    write(draw, (margin, top + 4), spec.date)
    recipient = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    write(draw, (margin, top + 34), recipient)
    write(draw, (margin, top + 52), rng.choice(COMPANIES))
    y = top + 90
    write(draw, (margin, y), f"Dear {recipient.split()[0]},")
    y += 28
    for _ in range(rng.randint(2, 4)):
        if y > height - 300:  # leave room for the closing and the signature
            break
        line = ""
        for word in " ".join(rng.sample(SENTENCES, rng.randint(3, 5))).split():
            if draw.textlength(f"{line} {word}", font=font(13)) > width - 2 * margin:
                write(draw, (margin, y), line, size=13)
                y, line = y + 18, ""
            line = f"{line} {word}".strip()
        write(draw, (margin, y), line, size=13)
        y += 30
    write(draw, (margin, y), "Sincerely,")
    y = max(y + 70, height - 160)
    write(draw, (margin, y + 8), spec.name, bold=True)
    write(draw, (margin, y + 26), rng.choice(("Director", "Research Manager", "Secretary", "Treasurer")), size=12)
    return (), (margin + 6, y - 2), (width - margin - 90, y - 10)


def draw_table_page(draw, spec, rng, margin, top, width, height, company):
    write(draw, (width // 2, top - 8), f"Prepared by: {spec.name}      Date: {spec.date}", anchor="mt")
    table_width = width - 2 * margin
    widths = [table_width - 4 * (table_width // 6)] + [table_width // 6] * 4
    rows, bottom = draw_table(draw, margin, top + 24, widths, spec.columns, spec.rows,
                              rng.randint(26, 30) if spec.landscape else rng.randint(36, 44), grid=True)
    write(draw, (width - margin - 8, bottom + 12), f"Total: {spec.total}", size=16, bold=True, anchor="ra")
    return rows, signature_line(draw, margin, height - 50, "Approved by"), (width // 2, height - 78)


def draw_signature(draw, at: tuple[int, int], rng: random.Random, ink) -> Box:
    """A cursive-looking scribble standing on `at`: loops along a drifting baseline, then an underline flourish."""
    x0, y0, x1, y1 = at[0], at[1] - 46, at[0] + rng.randint(130, 170), at[1]
    loops, amplitude = rng.randint(4, 7), (y1 - y0) / 2.4
    points = []
    for step in range(120):
        t = step / 119
        angle = 2 * math.pi * loops * t
        points.append((x0 + 10 + (x1 - x0 - 30) * t + 9 * math.cos(angle),
                       (y0 + y1) / 2 - amplitude * math.sin(angle) * (0.6 + 0.4 * math.sin(3 * t + loops))))
    draw.line(points, fill=ink, width=3, joint="curve")
    draw.line((x0, y1 - 6, (x0 + x1) / 2, y1 - 2, x1, y1 - 10), fill=ink, width=3, joint="curve")
    return x0, y0, x1, y1


def draw_stamp(page: Image.Image, center: tuple[int, int], word: str, color, rng: random.Random) -> Box:
    """A ring (or a double-bordered box) around the word, slightly rotated, pasted onto the page."""
    word_width = int(font(18).getlength(word))
    size = max(90, word_width + 28)
    stamp = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(stamp)
    ink = (*color, 255)
    if rng.random() < 0.5:
        draw.ellipse((2, 2, size - 3, size - 3), outline=ink, width=5)
        draw.ellipse((11, 11, size - 12, size - 12), outline=ink, width=2)
    else:
        draw.rectangle((2, size // 2 - 26, size - 3, size // 2 + 26), outline=ink, width=5)
        draw.rectangle((9, size // 2 - 19, size - 10, size // 2 + 19), outline=ink, width=2)
    draw.text((size // 2, size // 2), word, font=font(18), fill=ink, anchor="mm", stroke_width=1, stroke_fill=ink)
    stamp = stamp.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BICUBIC, expand=True)
    x, y = center[0] - stamp.width // 2, center[1] - stamp.height // 2
    page.paste(stamp, (x, y), stamp)
    return x, y, x + stamp.width, y + stamp.height


# ------------------------------------------------------------------------------------------ dataset, CLI
FEATURES = datasets.Features({  # HuggingFaceM4/DocumentVQA's, column for column
    "questionId": datasets.Value("int32"), "question": datasets.Value("string"),
    "question_types": datasets.Sequence(datasets.Value("string")), "image": datasets.Image(),
    "docId": datasets.Value("int32"), "ucsf_document_id": datasets.Value("string"),
    "ucsf_document_page_no": datasets.Value("string"), "answers": datasets.Sequence(datasets.Value("string")),
})


SCAN_REDUCTION = 2  # pages are drawn at 600x800 (or 800x600) and written at half that, as a 72-dpi scan: a quarter
# of the pixels to encode and to decode for every question, and at the demo's 192x192 nearly the same image


def make_documents(num_documents: int, seed: int, split: str = "train") -> list[Document]:
    """Pages 0..num_documents-1 of a split's stream, drawn in a process per core: page i depends only on (seed,
    split, i), so they are the same with any number of processes."""
    if split not in FIRST_DOC_ID:
        raise ValueError(f"split must be one of {sorted(FIRST_DOC_ID)}, not {split!r}")
    if not 0 <= num_documents <= MAX_DOCUMENTS:
        raise ValueError(f"num_documents must be in [0, {MAX_DOCUMENTS}], not {num_documents}")
    with concurrent.futures.ProcessPoolExecutor() as pool:  # a process per core: each page is drawn on its own
        return list(pool.map(functools.partial(make_document, seed, split), range(num_documents), chunksize=32))


def make_document(seed: int, split: str, index: int) -> Document:
    """Page `index` of a split's stream, drawn and encoded, with its questions."""
    rng = random.Random(f"florence2-synthetic/{seed}/{split}/{index}")  # str seeds hash the same in every run
    spec = sample_spec(rng)
    image, _ = render(spec)
    encoded = io.BytesIO()
    image.reduce(SCAN_REDUCTION).save(encoded, format="PNG")
    return Document(FIRST_DOC_ID[split] + index, spec, encoded.getvalue(), ask(spec, rng))


def to_rows(documents: list[Document]) -> list[dict]:
    return [{"questionId": document.doc_id * 10 + i, "question": q.question, "question_types": [q.type],
             "image": {"bytes": document.png, "path": None}, "docId": document.doc_id,
             "ucsf_document_id": f"synth{document.doc_id:07d}", "ucsf_document_page_no": "1", "answers": q.answers}
            for document in documents for i, q in enumerate(document.questions)]


def caption(spec: DocumentSpec) -> str:
    """What the page shows, in words: the target of the `<CAPTION>` pretraining task."""
    header = f"{spec.header_color} header" if spec.rgb else "header"  # a grayscale scan shows no colour
    parts = [f"{with_article(spec.kind).capitalize()} with {with_article(header)} and the title {spec.title}"]
    if spec.rows:
        parts.append(f"a table of {NUMBER_WORDS[len(spec.rows)]} rows")
    parts.append(f"stamped {spec.stamp}" if spec.stamp else "no stamp")
    parts.append("signed" if spec.signed else "not signed")
    return ", ".join(parts) + "."


def with_article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def caption_rows(documents: list[Document]) -> list[dict]:
    """One `<CAPTION>` row per page, in the DocumentVQA schema (train with --prompt-template '{question}')."""
    return to_rows([replace(document, questions=(Question("caption", "<CAPTION>", [caption(document.spec)]),))
                    for document in documents])


def build_dataset(train_documents: int, validation_documents: int, seed: int,
                  captions: bool = False) -> datasets.DatasetDict:
    """`train` and `validation` splits in the DocumentVQA schema, from disjoint pages: questions, or with `captions`
    one caption per page, from page streams of their own."""
    streams = ("captions", "captions-validation") if captions else ("train", "validation")
    rows = caption_rows if captions else to_rows
    return datasets.DatasetDict({
        split: datasets.Dataset.from_list(rows(make_documents(count, seed, stream)), features=FEATURES)
        for split, stream, count in zip(("train", "validation"), streams, (train_documents, validation_documents))})


def write_dataset(out_dir: str | Path, train_documents: int, validation_documents: int, seed: int,
                  overwrite: bool = False, captions: bool = False) -> datasets.DatasetDict:
    """Save `build_dataset(...)` with `save_to_disk`, so `datasets.load_from_disk(out_dir)` reads it.

    A non-empty `out_dir` is an error unless `overwrite`, and even then only a folder holding a saved DatasetDict is
    replaced: anything else there may be the user's, so it is never deleted. The data is written to a temporary
    sibling folder first and moved into place at the end, so an interrupted run leaves no half-written dataset."""
    out_dir = Path(out_dir)
    existing = out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    if existing and not (out_dir / "dataset_dict.json").is_file():
        raise FileExistsError(f"{out_dir} is not a saved DatasetDict (no dataset_dict.json): refusing to delete it")
    dataset = build_dataset(train_documents, validation_documents, seed, captions)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        dataset.save_to_disk(str(staging / "data"))
        if existing:
            shutil.rmtree(out_dir)
        elif out_dir.exists():
            out_dir.rmdir()
        (staging / "data").rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dataset


def summary(dataset: datasets.DatasetDict) -> str:
    lines = []
    for split, rows in dataset.items():
        types = Counter(t for item in rows["question_types"] for t in item)
        lines.append(f"{split}: {len(rows)} questions on {len(set(rows['docId']))} pages")
        lines += [f"  {name:<15} {count:>6}  {count / len(rows):6.1%}" for name, count in types.most_common()]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="folder to write (datasets.load_from_disk reads it)")
    parser.add_argument("--train-documents", type=int, default=400, help="pages in the train split")
    parser.add_argument("--validation-documents", type=int, default=60, help="pages in the validation split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset folder written before")
    parser.add_argument("--captions", action="store_true",
                        help="one <CAPTION> row per page (what the page shows) instead of questions, from other pages")
    args = parser.parse_args(argv)
    try:
        dataset = write_dataset(args.out_dir, args.train_documents, args.validation_documents, args.seed,
                                overwrite=args.overwrite, captions=args.captions)
    except (FileExistsError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {args.out_dir}\n{summary(dataset)}")


if __name__ == "__main__":
    main()
