"""Peak memory of decoding one image to the model's input, for large images that compress to almost nothing.

    .venv/bin/python bench/decode_memory.py [--megapixels 50] [--side 224] [--json PATH]

Each image is written once as a PNG (a few hundred KB at most), then decoded by `common.images.decode_image` in a
fresh Python process of its own; "peak growth" is how far that process's peak resident memory (VmHWM) rose above
what it held before the decode, and "decoded" the size of the image in its own mode: the least any decoder holds.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

MIB = 2**20
# Runs in the child: the bytes are read and every module imported before the first measure.
MEASURE = """
import json, sys
from common.images import decode_image
def status(field):
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024
data = open(sys.argv[1], "rb").read()
side = int(sys.argv[2])
before = status("VmRSS")
decode_image(data, (side, side), max_pixels=10**9)
print(json.dumps({"peak_growth": status("VmHWM") - before}))
"""


def images(side: int) -> dict[str, tuple[Image.Image, int]]:
    """name -> (image, bytes per pixel in its own mode) for a square of `side` x `side` pixels."""
    ramp = np.linspace(0, 65535, side, dtype=np.uint16)
    gray16 = np.broadcast_to(ramp, (side, side)).copy()
    rgba = Image.new("RGBA", (side, side), (200, 30, 40, 128))
    palette = Image.new("P", (side, side), 1)
    palette.putpalette([255, 255, 255, 200, 30, 40] + [0] * 762)
    palette.info["transparency"] = 0
    return {
        "16-bit grey PNG": (Image.fromarray(gray16), 2),
        "RGBA PNG": (rgba, 4),
        "palette PNG with transparency": (palette, 1),
        "RGB PNG": (Image.new("RGB", (side, side), (200, 30, 40)), 3),
    }


def peak_growth(path: Path, side: int) -> int:
    child = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(side)], capture_output=True, text=True,
                           check=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    return json.loads(child.stdout)["peak_growth"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=50)
    parser.add_argument("--side", type=int, default=224, help="the model's input side")
    parser.add_argument("--json", type=Path, help="also write the rows here (tests/test_decode.py reads them)")
    arguments = parser.parse_args()
    square = math.isqrt(int(arguments.megapixels * 1e6))
    print(f"{square}x{square} images ({square * square / 1e6:.1f} MP), decoded to {arguments.side}x{arguments.side}\n")
    print("| image | file | decoded | peak growth | vs decoded |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, (image, pixel_bytes) in images(square).items():
            path = Path(folder) / "image.png"
            image.save(path, "PNG", compress_level=9)
            decoded = square * square * pixel_bytes
            peak = peak_growth(path, arguments.side)
            rows.append({"image": name, "file_bytes": path.stat().st_size, "decoded": decoded, "peak_growth": peak})
            print(f"| {name} | {path.stat().st_size / 1024:.0f} KB | {decoded / MIB:.0f} MiB | {peak / MIB:.0f} MiB "
                  f"| {peak / decoded:.1f}x |")  # fmt: skip
    if arguments.json:
        arguments.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
