"""Small generated datasets for the tests (learnable, tiny, written as real image files), and main.py in-process."""
import argparse
import contextlib
import io
import signal
from pathlib import Path

import numpy as np
from PIL import Image


def make_image_folder(root, num_classes: int = 3, train_per_class: int = 8, val_per_class: int = 4,
                      size: int = 32, seed: int = 0, fmt: str = 'png') -> Path:
    """Write `root/train/<class>/*.png` and `root/val/<class>/*.png`.

    Class c is a bright square at a class-specific place on a noisy background, so a small model
    can learn it in a few epochs. Returns `root` as a Path.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    half = size // 2
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for c in range(num_classes):
            folder = root / split / f'class_{c:02d}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                y0, x0 = (c // 2 % 2) * half, (c % 2) * half
                img[y0:y0 + half, x0:x0 + half, c % 3] = 255
                Image.fromarray(img).save(folder / f'{split}_{c}_{i}.{fmt}')
    return root


def run_main(argv):
    """main.main() in this process: (exit status, stdout, stderr). An exception other than SystemExit propagates
    (and fails the test): that is the traceback a user would see."""
    import main as trainer
    parser = argparse.ArgumentParser(parents=[trainer.get_args_parser()])
    out, err = io.StringIO(), io.StringIO()
    sigterm = signal.getsignal(signal.SIGTERM)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            trainer.main(parser.parse_args([str(a) for a in argv]))
    except SystemExit as e:
        code = e.code
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    return code, out.getvalue(), err.getvalue()
