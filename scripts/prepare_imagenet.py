"""Unpack the official ILSVRC2012 archives into the ImageFolder layout that `--data-set IMNET` reads.

    python scripts/prepare_imagenet.py --archives ~/Downloads/ilsvrc2012 --output data/imagenet

`--archives` holds ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz
as downloaded from image-net.org; `--output` receives train/<wnid>/*.JPEG, val/<wnid>/*.JPEG and
torchvision's meta.bin (class names and validation labels, parsed from the devkit). The parsing is
torchvision's own (torchvision.datasets.imagenet), so the result matches `torchvision.datasets.ImageNet`.
Needs about 150 GB free in --output; torchvision checks each archive's MD5 first (reading it whole).

Each split is extracted into `<split>.partial` and renamed when done, so an interrupted run leaves no
half-written split behind; a split that already verifies is not extracted again, one that does not
is replaced by a fresh extraction. At the end the folder is checked (class count, image counts,
same classes in train and val) and every shortfall is reported, in one line. Images are counted with every
extension the training code reads (torchvision's IMG_EXTENSIONS), not only ImageNet's .JPEG.
Exit status: 0 complete, 1 incomplete (or an archive missing, corrupt or unreadable), 2 bad usage.
"""
import argparse
import shutil
import sys
from pathlib import Path

from torchvision.datasets import imagenet
from torchvision.datasets.folder import IMG_EXTENSIONS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402

IMAGENET_CLASSES, IMAGENET_TRAIN, IMAGENET_VAL = 1000, 1_281_167, 50_000


def count_images(split_dir: Path) -> dict:
    """{class folder name: number of image files in it} for one split folder (every extension the data sets of
    datasets.py accept, in any case)."""
    return {d.name: sum(1 for f in d.iterdir() if f.name.lower().endswith(IMG_EXTENSIONS))
            for d in sorted(split_dir.iterdir()) if d.is_dir()}


def split_problems(output: Path, split: str, expect_classes: int, expect_images: int) -> list:
    """What is wrong with one extracted split, as sentences (empty when it is complete)."""
    folder = output / split
    if not folder.is_dir():
        return [f'{split}/ is missing (from {imagenet.ARCHIVE_META[split][0]})']
    counts = count_images(folder)
    problems = []
    if len(counts) != expect_classes:
        problems.append(f'{split}/: found {len(counts)} classes, expected {expect_classes}')
    if sum(counts.values()) != expect_images:
        problems.append(f'{split}/: found {sum(counts.values())} images, expected {expect_images}'
                        f' (from {imagenet.ARCHIVE_META[split][0]})')
    empty = [name for name, n in counts.items() if n == 0]
    if empty:
        problems.append(f'{split}/: {len(empty)} classes without images: {preview(empty)}')
    return problems


def preview(names, limit: int = 10) -> str:
    names = sorted(names)
    more = f' ... ({len(names) - limit} more)' if len(names) > limit else ''
    return ' '.join(names[:limit]) + more


def verify(output: Path, args) -> list:
    """Every shortfall of the prepared folder, as sentences (empty when it is complete)."""
    problems = (split_problems(output, 'train', args.expect_classes, args.expect_train)
                + split_problems(output, 'val', args.expect_classes, args.expect_val))
    if (output / 'train').is_dir() and (output / 'val').is_dir():
        train = {d.name for d in (output / 'train').iterdir() if d.is_dir()}
        val = {d.name for d in (output / 'val').iterdir() if d.is_dir()}
        if train - val:
            problems.append(f'classes only in train/: {preview(train - val)}')
        if val - train:
            problems.append(f'classes only in val/: {preview(val - train)}')
    return problems


def run_parser(parse, output: Path, archive: Path, **kwargs) -> str:
    """Run one torchvision parser on `archive`; returns an error sentence, or '' on success."""
    try:
        parse(str(output), file=str(archive.resolve()), **kwargs)  # an absolute `file` wins over root
    except RuntimeError as e:  # torchvision's "not present ... or is corrupted": the MD5 differs
        if 'corrupted' in str(e) or 'not present' in str(e):
            return f'{archive} fails its MD5 check (a corrupted or incomplete download?)'
        return f'{archive} cannot be read ({cli.describe(e)}); download it again'
    except Exception as e:  # noqa: BLE001 (not a tar archive, truncated, garbage inside: whatever the parser meets)
        return f'{archive} cannot be read ({cli.describe(e)}); download it again'
    return ''


def extract(output: Path, archives: Path, split: str) -> str:
    """Extract one split with torchvision's parser; returns an error sentence, or '' on success."""
    archive = archives / imagenet.ARCHIVE_META[split][0]
    if not archive.is_file():
        return f'missing archive {archive} (needed for {split}/)'
    if split == 'val' and not (output / imagenet.META_FILE).is_file():
        return f'cannot sort val/ into classes without {imagenet.META_FILE} (from the devkit archive)'
    partial, final = output / f'{split}.partial', output / split
    shutil.rmtree(partial, ignore_errors=True)
    print(f'extracting {archive} -> {final}', flush=True)
    parse = imagenet.parse_train_archive if split == 'train' else imagenet.parse_val_archive
    error = run_parser(parse, output, archive, folder=partial.name)
    if error:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-extracted stays behind
    else:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    return error


def prepare(output: Path, archives: Path, args) -> list:
    """Extract the devkit metadata and every split that does not verify yet; returns errors."""
    output.mkdir(parents=True, exist_ok=True)
    errors = []
    devkit = archives / imagenet.ARCHIVE_META['devkit'][0]
    if (output / imagenet.META_FILE).is_file():
        print(f'{imagenet.META_FILE} already present')
    elif devkit.is_file():
        print(f'parsing {devkit} -> {output / imagenet.META_FILE}', flush=True)
        errors.append(run_parser(imagenet.parse_devkit_archive, output, devkit))
    else:
        errors.append(f'missing archive {devkit} (needed for {imagenet.META_FILE} and val/)')
    expected = {'train': args.expect_train, 'val': args.expect_val}
    for split in ('train', 'val'):
        if not split_problems(output, split, args.expect_classes, expected[split]):
            print(f'{split}/ already complete, not extracted again')
            continue
        errors.append(extract(output, archives, split))
    return [error for error in errors if error]


def skip_md5_checks():
    """Make torchvision check only that the archives exist (check_integrity with md5=None)."""
    imagenet.ARCHIVE_META = {key: (name, None) for key, (name, _) in imagenet.ARCHIVE_META.items()}


@cli.one_line_errors('prepare_imagenet.py')
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--archives', type=Path, help='folder with the three ILSVRC2012 archives')
    parser.add_argument('--output', type=Path, required=True, help='folder to create train/ and val/ in')
    parser.add_argument('--verify-only', action='store_true', help='only check an existing --output')
    parser.add_argument('--skip-md5', action='store_true',
                        help='skip the archives\' MD5 checks (already checked, or test archives)')
    parser.add_argument('--expect-classes', type=int, default=IMAGENET_CLASSES)
    parser.add_argument('--expect-train', type=int, default=IMAGENET_TRAIN)
    parser.add_argument('--expect-val', type=int, default=IMAGENET_VAL)
    args = parser.parse_args(argv)
    if not args.verify_only and args.archives is None:
        parser.error('--archives is required unless --verify-only')
    if args.skip_md5:
        skip_md5_checks()

    errors = [] if args.verify_only else prepare(args.output, args.archives, args)
    problems = errors + verify(args.output, args)
    if problems:
        raise cli.ScriptError(f'{args.output} is incomplete: {"; ".join(problems)}', code=1)
    print(f'{args.output} is complete: {args.expect_classes} classes, '
          f'{args.expect_train} train and {args.expect_val} val images')
    return 0


if __name__ == '__main__':
    sys.exit(main())
