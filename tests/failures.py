"""What the bad-input tests assert: one error line naming the flag or file, the exit status, and that the files that
existed before are unchanged; plus a tiny model and a finished run to try things on."""
import re
from pathlib import Path

from helpers import make_image_folder, run_main

MODEL = ['--model', 'deit_tiny_12', '--model-kwargs', 'depth=2', 'embed_dim=48', 'num_heads=2', 'patch_size=8']
SMALL = ['--input-size', '32', '--batch-size', '8', '--num_workers', '0', '--data-set', 'IMNET', '--no-log-tensorboard',
         '--print-freq', '100']
TINY = MODEL + SMALL
TRACEBACK = re.compile(r'Traceback|File ".*\.py", line')


def snapshot(*folders) -> dict:
    """{path: bytes} of every file under `folders` (a file is compared by its bytes, and by its presence)."""
    return {str(p): p.read_bytes() for folder in folders for p in sorted(Path(folder).rglob('*')) if p.is_file()}


def assert_one_error(code, err: str, pattern: str, status: int = 2, prefix: str = 'error: '):
    """Exit `status`, exactly one line on stderr starting with `prefix` (the only one that is not a warning), that
    line matching `pattern` (re.search), and no traceback."""
    assert code == status, err
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and re.search(pattern, lines[0]), err
    others = [line for line in err.splitlines() if line.strip() and not line.startswith((prefix, 'warning: '))]
    assert not others, err
    assert not TRACEBACK.search(err), err
    return lines[0]


def small_data(root: Path) -> Path:
    """Two classes of 8 training and 2 validation images under `root`."""
    return make_image_folder(root, num_classes=2, train_per_class=8, val_per_class=2)


def finished_run(data: Path, out: Path, *flags) -> Path:
    """`out` after a run of the tiny model on `data` with `flags` ended well."""
    code, _, err = run_main([*TINY, *flags, '--data-path', data, '--output_dir', out])
    assert code == 0, err
    return out
