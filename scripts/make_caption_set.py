"""Generate weightport's built-in image-caption set (src/weightport/data/captions-builtin.tar).

Every image is a small synthetic scene whose caption is derived from what was drawn, so the
captions are exactly right by construction. The output is byte-for-byte reproducible: the
scenes come from a fixed seed and the tar headers carry no time, user or host information.

    python scripts/make_caption_set.py [OUT.tar]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "weightport" / "data" / "captions-builtin.tar"
SEED = 20240611
COUNT = 100
SIZE = 64
# A JPEG quality where flat colours still read clearly; with optimized Huffman tables most
# images fit in two tar blocks, which keeps the whole set around 400 KB.
JPEG_QUALITY = 80
SOURCE = "weightport built-in caption set"

# Saturated, far-apart colours, so each name stays unambiguous after JPEG compression.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 210),
    "yellow": (245, 215, 30),
    "orange": (245, 135, 20),
    "purple": (130, 45, 170),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "stripes")
# Centre of each position's 18x18 box; the boxes never overlap, so every shape is fully
# visible and the caption never has to mention occlusion.
POSITIONS: dict[str, tuple[int, int]] = {
    "left": (12, 32),
    "right": (52, 32),
    "top": (32, 12),
    "bottom": (32, 52),
    "centre": (32, 32),
}
PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",
          "bottom": "at the bottom", "centre": "in the centre"}
HALF = 9


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    position: str

    def phrase(self) -> str:
        # "stripes" is plural, so it takes no article
        if self.kind == "stripes":
            return f"{self.colour} stripes {PHRASE[self.position]}"
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.kind} {PHRASE[self.position]}"


def random_scene(rng: random.Random) -> tuple[str, list[Shape]]:
    background = rng.choice(sorted(BACKGROUNDS))
    count = rng.randint(1, 3)
    colours = rng.sample([c for c in COLOURS if c != background], count)
    positions = rng.sample(list(POSITIONS), count)
    return background, [Shape(rng.choice(SHAPES), c, p) for c, p in zip(colours, positions)]


def caption(background: str, shapes: list[Shape]) -> str:
    parts = [s.phrase() for s in shapes]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed}, on a {background} background"


def draw(background: str, shapes: list[Shape]) -> bytes:
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[background])
    pen = ImageDraw.Draw(image)
    for s in shapes:
        cx, cy = POSITIONS[s.position]
        x0, y0, x1, y1 = cx - HALF, cy - HALF, cx + HALF, cy + HALF
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            pen.rectangle((x0, y0, x1, y1), fill=fill)
        elif s.kind == "triangle":
            pen.polygon([(cx, y0), (x0, y1), (x1, y1)], fill=fill)
        else:  # three horizontal bars with background-coloured gaps between them
            for top in (y0, y0 + 7, y0 + 14):
                pen.rectangle((x0, top, x1, top + 4), fill=fill)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue()


def samples(seed: int = SEED, count: int = COUNT) -> list[tuple[str, dict[str, bytes]]]:
    rng = random.Random(seed)
    result = []
    for index in range(count):
        background, shapes = random_scene(rng)
        text = caption(background, shapes)
        meta = {"caption": text, "background": background,
                "shapes": [{"shape": s.kind, "colour": s.colour, "position": s.position} for s in shapes],
                "source": SOURCE}
        members = {"jpg": draw(background, shapes), "txt": text.encode(),
                   "json": json.dumps(meta, separators=(",", ":")).encode()}
        result.append((f"{index:06d}", members))
    return result


def write_tar(out: Path, items: list[tuple[str, dict[str, bytes]]]) -> None:
    buffer = io.BytesIO()
    # USTAR never adds PAX records, and every header field is fixed, so the bytes depend
    # only on the samples.
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in items:
            for ext in sorted(members):
                data = members[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    out.parent.mkdir(parents=True, exist_ok=True)
    # write next to the target and rename, so a failed run never leaves half a tar behind
    partial = out.with_name(out.name + ".partial")
    partial.write_bytes(buffer.getvalue())
    partial.replace(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT,
                        help=f"tar file to write (default: {DEFAULT_OUT})")
    out = parser.parse_args(argv).out
    write_tar(out, samples())
    print(f"wrote {out} ({out.stat().st_size} bytes, {COUNT} samples)")


if __name__ == "__main__":
    main()
