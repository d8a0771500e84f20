"""Export scikit-learn's bundled UCI handwritten digits as a small ImageFolder (no download needed).

    python scripts/export_digits.py --output data/digits --size 32

Writes `train/<digit>/<index>.png` and `val/<digit>/<index>.png` (index: position in
`sklearn.datasets.load_digits()`) for the 1,797 8x8 images of 10 classes: a fixed stratified split
(`train_test_split(test_size=0.2, stratify=y, random_state=0)`: 1,437 train / 360 val), the 16 gray
levels scaled to 0..255 and upscaled by nearest neighbour to --size pixels, saved as RGB PNGs. It
gives main.py a real dataset small enough to train on a CPU in minutes.
If --output already holds exactly these files (names and image size), nothing is rewritten;
otherwise the train/ and val/ folders are written again from scratch.
"""
import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def split_indices(labels, test_size: float) -> dict:
    """{'train': indices, 'val': indices}: the fixed stratified split."""
    train, val = train_test_split(np.arange(len(labels)), test_size=test_size, stratify=labels,
                                  random_state=0)
    return {'train': np.sort(train), 'val': np.sort(val)}


def expected_files(labels, splits: dict) -> list:
    """Relative paths of every image the export writes."""
    return sorted(f'{split}/{labels[i]}/{i:04d}.png' for split, idx in splits.items() for i in idx)


def is_complete(output: Path, files: list, size: int) -> bool:
    """True when train/ and val/ hold exactly `files`, each a size x size image."""
    present = sorted(str(p.relative_to(output)) for split in ('train', 'val')
                     for p in (output / split).rglob('*') if p.is_file())
    if present != files:
        return False
    for name in files:
        with Image.open(output / name) as img:
            if img.size != (size, size):
                return False
    return True


def export(output: Path, size: int, test_size: float) -> dict:
    """Write the ImageFolder (unless already complete); returns {split: number of images}."""
    digits = load_digits()
    splits = split_indices(digits.target, test_size)
    files = expected_files(digits.target, splits)
    counts = {split: len(idx) for split, idx in splits.items()}
    summary = f'{counts["train"]} train and {counts["val"]} val images, 10 classes, {size}x{size} RGB'
    if is_complete(output, files, size):
        print(f'{output} already holds the expected {summary}; nothing rewritten')
        return counts
    for split, idx in splits.items():
        shutil.rmtree(output / split, ignore_errors=True)
        for i in idx:
            gray = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
            img = Image.fromarray(gray).resize((size, size), Image.Resampling.NEAREST).convert('RGB')
            path = output / split / str(digits.target[i]) / f'{i:04d}.png'
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path)
    print(f'wrote {output}: {summary}')
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--output', type=Path, default=Path('data/digits'))
    parser.add_argument('--size', type=int, default=32, help='side of the upscaled images, in pixels')
    parser.add_argument('--test-size', type=float, default=0.2, help='fraction of images in val/')
    args = parser.parse_args(argv)
    export(args.output, args.size, args.test_size)


if __name__ == '__main__':
    main()
