"""Datasets and image transforms for training and evaluation (DeiT's `build_dataset` / `build_transform`).

Supported `--data-set` values:
  * IMNET / IMNET100: ImageFolder layout `<data_path>/train/<class>/*` and `<data_path>/val/<class>/*`; the class
    list comes from `train/` and `val/` must have the same class folders.
  * CIFAR: torchvision's CIFAR-100 (python version) already extracted under `<data_path>/cifar-100-python/`.
  * INAT / INAT19: iNaturalist 2018 / 2019 as DeiT reads it: `<data_path>/categories.json`,
    `<data_path>/{train,val}{2018,2019}.json`, images under `<data_path>/train_val{year}/<category id>/` (DeiT's
    layout) or where the annotation's `file_name` puts them; class indices as in DeiT (see INatDataset).

Every bad input raises `DatasetError`, a one-line message that names the problem and the fix. An unreadable image
file raises it too, unless `--skip-bad-images` is set: then the next readable sample is returned instead, a warning
names the file once, and `dataset.num_skipped` counts the distinct files skipped (DataLoader workers included).

Importing this module also guards timm's RandAugment Posterize op against Pillow >= 13 (see `_guard_posterize`).
"""
import json
import logging
import os
import random

import numpy as np
import torch
from PIL import Image, ImageFilter
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment, create_transform
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode

_logger = logging.getLogger(__name__)

DATA_SETS = ('IMNET', 'IMNET100', 'CIFAR', 'INAT', 'INAT19')
INAT_YEARS = {'INAT': 2018, 'INAT19': 2019}
CIFAR_FOLDER = 'cifar-100-python'
CIFAR_URL = 'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz'
PREPARE_IMAGENET = 'python scripts/prepare_imagenet.py'
SMALL_IMAGE_SIZE = 32  # at or below this input size, images are not crop-resized (DeiT's CIFAR rule)


class DatasetError(ValueError):
    """A bad dataset location, layout, annotation file or image; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# timm RandAugment guard
# ---------------------------------------------------------------------------------------------------------------

_timm_posterize = auto_augment.posterize


def posterize_keep_zero_bits(img, bits_to_keep, **kwargs):
    """timm's `posterize`, except that keeping 0 bits gives a black image of the same mode and size.

    That is what Pillow < 13 returned (every bit masked). Pillow 13's `ImageOps.posterize` raises
    `bits must be between or equal to 1 and 8` instead, which timm's RandAugment reaches when a sampled
    magnitude maps to 0 bits (e.g. 'PosterizeIncreasing' at magnitude 10, about one image in 650 with
    'rand-m9-mstd0.5-inc1'), and one such image would stop a whole training run.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return _timm_posterize(img, bits_to_keep, **kwargs)


def _guard_posterize() -> None:
    """Point every entry of timm's op table that uses its `posterize` at `posterize_keep_zero_bits`.

    timm's `AugmentOp` looks its function up in `auto_augment.NAME_TO_OP` when it is built, so replacing the
    table entries here (before any transform is created) fixes RandAugment, AutoAugment and AugMix without
    editing the installed package. Entries already replaced are left alone, so re-importing is harmless.
    """
    for name, op in auto_augment.NAME_TO_OP.items():
        if op is _timm_posterize:
            auto_augment.NAME_TO_OP[name] = posterize_keep_zero_bits


_guard_posterize()


# ---------------------------------------------------------------------------------------------------------------
# Image loading with an explicit bad-file policy
# ---------------------------------------------------------------------------------------------------------------

def load_rgb(path: str) -> Image.Image:
    """Decode the image at `path` fully as RGB; any failure becomes a DatasetError naming the file. Images of more
    than 8 bits per channel are scaled from their range to 8 bits (to_8bit), not clipped."""
    try:
        with Image.open(path) as img:
            return to_8bit(img, path).convert('RGB')
    except DatasetError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... depending on the format
        reason = (str(exc).splitlines() or [''])[0]
        raise DatasetError(
            f'cannot read image {path} ({type(exc).__name__}: {reason}); fix: replace or delete the file, '
            f'or pass --skip-bad-images to skip unreadable images') from exc


def to_8bit(img: Image.Image, path: str) -> Image.Image:
    """`img` with 8-bit channels. Pillow's own conversion clips: a 16-bit image (modes I;16*, and I as 16-bit PNGs
    open) would turn white and a float image (mode F, values in [0, 1]) black. Here 16-bit values are scaled from
    [0, 65535] and float values from [0, 1]; values outside those ranges cannot be mapped without a guess, and
    the file is refused, like an unreadable one."""
    if img.mode not in ('F', 'I') and not img.mode.startswith('I;16'):
        return img
    values = np.asarray(img, dtype=np.float64)
    top = 1.0 if img.mode == 'F' else 65535.0
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > top:
        raise DatasetError(f'cannot read image {path} ({img.mode} image with values in [{low:g}, {high:g}], outside '
                           f'[0, {top:g}]); fix: save it as an 8-bit image, or pass --skip-bad-images to skip it')
    return Image.fromarray(np.rint(values * (255.0 / top)).astype(np.uint8), mode='L')


class ImageListDataset(torch.utils.data.Dataset):
    """Images given as `(path, class index)` pairs, decoded as RGB and transformed.

    An unreadable file raises DatasetError, or with `skip_bad_images` is replaced by the next readable sample
    (wrapping around). `num_skipped` is the number of distinct files skipped so far. The record is a tensor in
    shared memory, so what DataLoader workers skip (in their copies of the dataset) is counted too.
    """

    def __init__(self, root: str, samples: list, classes: list, transform=None, skip_bad_images: bool = False):
        self.root = root
        self.samples = samples
        self.targets = [target for _, target in samples]
        self.classes = classes
        self.class_to_idx = {name: i for i, name in enumerate(classes)}
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self._bad = torch.zeros(len(samples), dtype=torch.bool).share_memory_()  # seen by forked/spawned workers

    @property
    def bad_files(self) -> set:
        """The unreadable files skipped so far (by this process and its DataLoader workers)."""
        return {self.samples[i][0] for i in self._bad.nonzero().flatten().tolist()}

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable files skipped so far (by this process and its DataLoader workers)."""
        return int(self._bad.sum())

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            path, target = self.samples[i]
            if self._bad[i]:
                continue
            try:
                img = load_rgb(path)
            except DatasetError as err:
                if not self.skip_bad_images:
                    raise
                self._bad[i] = True
                _logger.warning('--skip-bad-images: skipped unreadable image %s (%s)', path, err.__cause__)
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, target
        raise DatasetError(f'no readable image left in {self.root} ({self.num_skipped} unreadable); '
                           f'fix: check the files under --data-path')


# ---------------------------------------------------------------------------------------------------------------
# ImageNet (ImageFolder layout)
# ---------------------------------------------------------------------------------------------------------------

def _names(items, limit: int = 5) -> str:
    """'a, b, c (+N more)' for error messages."""
    items = sorted(items)
    more = f' (+{len(items) - limit} more)' if len(items) > limit else ''
    return ', '.join(items[:limit]) + more


def check_data_path(data_path: str) -> None:
    """Fail clearly when `--data-path` does not exist or is not a directory."""
    if not data_path:
        raise DatasetError('--data-path is empty; fix: pass the folder that holds the dataset')
    if not os.path.exists(data_path):
        raise DatasetError(f'--data-path {data_path} does not exist; fix: pass the folder that holds the dataset')
    if not os.path.isdir(data_path):
        raise DatasetError(f'--data-path {data_path} is not a directory; fix: pass the folder that holds the dataset')


def class_folders(split_dir: str) -> list:
    """Sorted class folder names of an ImageFolder split, with clear errors for a missing, flat or empty split."""
    split = os.path.basename(split_dir)
    if not os.path.isdir(split_dir):
        if split == 'val' and os.path.isdir(os.path.join(os.path.dirname(split_dir), 'train')):
            raise DatasetError(f'{split_dir} is missing (train/ is there); fix: put the validation images in '
                               f'val/<class>/, with the class folders of train/ (ImageNet: `{PREPARE_IMAGENET}`)')
        raise DatasetError(f'{split_dir} is missing; fix: --data-path must hold train/<class>/<images> and '
                           f'val/<class>/<images>')
    entries = list(os.scandir(split_dir))
    classes = sorted(e.name for e in entries if e.is_dir())
    if classes:
        return classes
    images = [e.name for e in entries if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)]
    if images and split == 'val':
        raise DatasetError(f'{split_dir} holds {len(images)} image files but no class folders (flat ImageNet val '
                           f'layout); fix: run `{PREPARE_IMAGENET}` to sort them into val/<class>/ folders')
    raise DatasetError(f'{split_dir} has no class folders; fix: put each class\'s images in {split_dir}/<class>/')


def find_images(split_dir: str, class_to_idx: dict) -> list:
    """`(path, class index)` of every image under `split_dir/<class>/`, at any depth, folder links followed, in
    torchvision's `make_dataset` order (folders by path, files by name).

    A folder link that leads back to a folder being walked (a cycle, which os.walk would follow until paths got
    too long) and a file reached from two classes (through links) are DatasetErrors naming the paths."""
    folders, linked = [], False  # folders: (class index, path, real path, file names)
    for name, index in sorted(class_to_idx.items()):
        top, found = os.path.join(split_dir, name), []
        linked |= _walk(top, os.path.realpath(top), frozenset([os.path.realpath(split_dir)]), index, found)
        folders += sorted(found, key=lambda f: f[1])
    samples = [(os.path.join(folder, n), index) for index, folder, _, names in folders for n in names
               if n.lower().endswith(IMG_EXTENSIONS)]
    if linked:
        _check_one_class_per_file(folders, {i: n for n, i in class_to_idx.items()})
    return samples


def _walk(folder: str, real: str, ancestors: frozenset, index: int, out: list) -> bool:
    """Add `(index, folder, real path, file names)` for `folder` and every folder below it to `out`; returns
    whether a link was met. `ancestors`: the real paths of the folders being walked above `folder`."""
    files, subfolders, linked = [], [], False
    with os.scandir(folder) as entries:
        for entry in entries:
            linked |= entry.is_symlink()
            (subfolders if entry.is_dir() else files).append(entry)
    out.append((index, folder, real, sorted(e.name for e in files)))
    for entry in sorted(subfolders, key=lambda e: e.name):
        target = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
        if target in ancestors or target == real:
            raise DatasetError(f'{entry.path} links back to {target}, a folder it is inside of (a symlink cycle); '
                               'fix: remove the link')
        linked |= _walk(entry.path, target, ancestors | {real}, index, out)
    return linked


def _check_one_class_per_file(folders: list, names: dict):
    """Fail if one image file is reached from two class folders."""
    owner = {}
    for index, folder, real, files in folders:
        for name in files:
            if not name.lower().endswith(IMG_EXTENSIONS):
                continue
            path = os.path.join(folder, name)
            key = os.path.realpath(path) if os.path.islink(path) else os.path.join(real, name)
            first = owner.setdefault(key, (index, path))
            if first[0] != index:
                raise DatasetError(f'{first[1]} (class {names[first[0]]}) and {path} (class {names[index]}) are the '
                                   f'same file {key}: an image can have one class only; fix: remove one of them')


class ImageFolderDataset(ImageListDataset):
    """One split of an ImageFolder tree (`split_dir/<class>/<image>`), with the given class order.

    Unlike torchvision's ImageFolder, every class folder must hold at least one image, the class list is passed
    in, so that `val/` is indexed exactly like `train/`, and links that form a cycle or put one file in two
    classes are errors (find_images).
    """

    def __init__(self, split_dir: str, classes: list, transform=None, skip_bad_images: bool = False):
        class_to_idx = {name: i for i, name in enumerate(classes)}
        samples = find_images(split_dir, class_to_idx)
        found = {target for _, target in samples}
        if not found:
            raise DatasetError(f'{split_dir} has {len(classes)} class folders but no images; fix: add images '
                               f'({", ".join(IMG_EXTENSIONS)}) under {split_dir}/<class>/')
        empty = [name for name, i in class_to_idx.items() if i not in found]
        if empty:
            raise DatasetError(f'{split_dir}: {len(empty)} class folders have no images ({_names(empty)}); '
                               f'fix: add their images or remove the folders from both train/ and val/')
        super().__init__(split_dir, samples, classes, transform, skip_bad_images)


def build_image_folder(data_path: str, is_train: bool, transform, skip_bad_images: bool) -> ImageFolderDataset:
    """The train or val split of an ImageFolder tree, indexed by the class folders of `train/`.

    Both `train/` and `val/` are checked for either split, so a missing or flat `val/` fails before the long scan
    of `train/`; the val split must have exactly the class folders of `train/`.
    """
    check_data_path(data_path)
    train_dir, val_dir = os.path.join(data_path, 'train'), os.path.join(data_path, 'val')
    classes = class_folders(train_dir)
    val_classes = class_folders(val_dir)
    if not is_train and val_classes != classes:
        only_train, only_val = set(classes) - set(val_classes), set(val_classes) - set(classes)
        raise DatasetError(
            f'{val_dir} and {train_dir} have different class folders (only in train: {_names(only_train) or "-"}; '
            f'only in val: {_names(only_val) or "-"}); fix: give val/ exactly the class folders of train/')
    split_dir = train_dir if is_train else val_dir
    return ImageFolderDataset(split_dir, classes, transform, skip_bad_images)


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-100 and iNaturalist
# ---------------------------------------------------------------------------------------------------------------

def build_cifar100(data_path: str, is_train: bool, transform) -> datasets.CIFAR100:
    """torchvision's CIFAR-100 from `<data_path>/cifar-100-python/`; it is never downloaded."""
    check_data_path(data_path)
    expected = os.path.join(data_path, CIFAR_FOLDER)
    try:
        return datasets.CIFAR100(data_path, train=is_train, transform=transform, download=False)
    except RuntimeError as exc:  # torchvision: 'Dataset not found or corrupted'
        raise DatasetError(f'CIFAR-100 not found or corrupt: expected {expected}/ with train, test and meta; '
                           f'fix: extract {CIFAR_URL} into --data-path {data_path} (it is never downloaded)') from exc


def _read_json(path: str, what: str, fix: str):
    """The parsed JSON file at `path` (`what` names it in errors, `fix` says how to get it)."""
    if not os.path.isfile(path):
        raise DatasetError(f'{path} is missing; fix: {fix}')
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise DatasetError(f'{path} is not valid JSON ({exc}); fix: download {what} again') from exc


def inat_categories(root: str, level: str) -> list:
    """`<root>/categories.json` as DeiT reads it: entry i is category id i; returns each id's value at `level`."""
    path = os.path.join(root, 'categories.json')
    categories = _read_json(path, "iNaturalist's categories.json",
                            "put iNaturalist's categories.json (the list of categories with their taxonomy) in "
                            "--data-path, next to the annotation files")
    if not isinstance(categories, list) or not all(isinstance(c, dict) for c in categories):
        raise DatasetError(f'{path} is not a list of categories; fix: use the official iNaturalist categories.json')
    values = []
    for position, cat in enumerate(categories):
        if cat.get('id', position) != position:
            raise DatasetError(f'{path}: entry {position} has id {cat["id"]}, but category ids index this list; fix: '
                               'use the official categories.json (sorted by id, ids 0, 1, 2, ...)')
        if level not in cat:
            fields = sorted(k for k in cat if k != 'id')
            raise DatasetError(f'category {position} in {path} has no {level!r} field; fix: choose --inat-category '
                               f'from {", ".join(fields)}')
        values.append(cat[level])
    return values


def _inat_annotations(root: str, split: str, year: int) -> dict:
    """`<root>/<split><year>.json`, checked for the lists DeiT reads."""
    path = os.path.join(root, f'{split}{year}.json')
    data = _read_json(path, f'the iNaturalist {year} annotation file',
                      f'put the iNaturalist {year} annotation files train{year}.json and val{year}.json in --data-path')
    missing = [key for key in ('images', 'annotations') if key not in data]
    if missing:
        raise DatasetError(f'{path} has no {", ".join(missing)} list; fix: use the official iNaturalist {year} '
                           'annotation file')
    return data


def _inat_image(root: str, file_name: str, path: str) -> tuple:
    """(DeiT's location, the extracted archive's location, category id) of an image's `file_name`.

    iNaturalist names an image `train_val2018/<supercategory>/<category id>/<file>`; DeiT reads it from
    `<root>/train_val2018/<category id>/<file>` (no supercategory folder) and takes its label from the id folder.
    """
    parts = file_name.split('/')
    if len(parts) != 4 or not parts[2].isdigit():
        raise DatasetError(f'{path}: file_name {file_name!r} is not <folder>/<supercategory>/<category id>/<file>; '
                           'fix: use the official iNaturalist annotation file')
    deit = os.path.join(root, parts[0], parts[2], parts[3])
    return deit, os.path.join(root, file_name), int(parts[2])


class INatDataset(ImageListDataset):
    """iNaturalist 2018 / 2019 at one taxonomic level (`--inat-category`), labelled exactly as DeiT labels it.

    Files in `root`: `categories.json` (entry i = category id i, with its taxonomy), `train<year>.json` and
    `val<year>.json` (the official annotation files). Class index of a value at `category` level = the order in
    which the value first occurs when walking the `annotations` of `train<year>.json` (not sorted), so official
    iNat checkpoints evaluate with their own labels. Each split's samples are its json's `images`, in order; an
    image's category is the `<category id>` folder of its `file_name`. Images are read from DeiT's layout
    `<root>/<folder>/<category id>/<file>`, or, when the first image is not there, from the extracted archive's
    `<root>/<file_name>`.
    """

    def __init__(self, root: str, is_train: bool, year: int, category: str, transform=None,
                 skip_bad_images: bool = False):
        values = inat_categories(root, category)

        def value_of(category_id):
            if not isinstance(category_id, int) or not 0 <= category_id < len(values):
                raise DatasetError(f'category id {category_id!r} in the iNaturalist {year} files of {root} is not '
                                   f'an entry of categories.json ({len(values)} entries); fix: use the '
                                   'categories.json of the same release')
            return values[category_id]

        class_to_idx = {}
        for annotation in _inat_annotations(root, 'train', year)['annotations']:
            class_to_idx.setdefault(value_of(annotation['category_id']), len(class_to_idx))
        split = 'train' if is_train else 'val'
        path = os.path.join(root, f'{split}{year}.json')
        listed = _inat_annotations(root, split, year)['images']
        images = [_inat_image(root, image['file_name'], path) for image in listed]
        use_deit_layout = not images or os.path.exists(images[0][0]) or not os.path.exists(images[0][1])
        samples = []
        for deit_path, archive_path, category_id in images:
            value = value_of(category_id)
            if value not in class_to_idx:
                raise DatasetError(f'{category} {value!r} of {archive_path} does not occur in the annotations of '
                                   f'train{year}.json; fix: use train and val annotation files of the same release')
            samples.append((deit_path if use_deit_layout else archive_path, class_to_idx[value]))
        super().__init__(root, samples, list(class_to_idx), transform, skip_bad_images)


def build_dataset(is_train: bool, args):
    """DeiT's entry point: `(dataset, nb_classes)` for the split chosen by `is_train`.

    Reads `args.data_set`, `args.data_path`, `args.inat_category`, `args.skip_bad_images` (default False) and the
    transform fields read by `build_transform`.
    """
    if args.data_set not in DATA_SETS:
        raise DatasetError(f'unknown --data-set {args.data_set!r}; fix: choose one of {", ".join(DATA_SETS)}')
    transform = build_transform(is_train, args)
    skip_bad_images = getattr(args, 'skip_bad_images', False)
    if args.data_set == 'CIFAR':
        return build_cifar100(args.data_path, is_train, transform), 100
    if args.data_set in INAT_YEARS:
        check_data_path(args.data_path)
        dataset = INatDataset(args.data_path, is_train, INAT_YEARS[args.data_set], args.inat_category,
                              transform, skip_bad_images)
    else:
        dataset = build_image_folder(args.data_path, is_train, transform, skip_bad_images)
    return dataset, len(dataset.classes)


# ---------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------

def normalize_to_tensor() -> list:
    """ToTensor then ImageNet mean/std normalization, the end of every pipeline here."""
    return [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]


def deit_train_transform(args) -> transforms.Compose:
    """DeiT's training pipeline: timm's RandomResizedCrop + flip + RandAugment + RandomErasing.

    At input sizes of 32 px or less the random-resized crop becomes `RandomCrop(input_size, padding=4)`, as in
    DeiT for CIFAR. `args.aa` of None, '' or 'none' turns RandAugment off (timm then applies `color_jitter`).
    """
    aa = None if args.aa is None or str(args.aa).lower() in ('', 'none') else args.aa
    transform = create_transform(
        input_size=args.input_size, is_training=True, color_jitter=args.color_jitter, auto_augment=aa,
        interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
    if args.input_size <= SMALL_IMAGE_SIZE:  # images smaller than the crop are padded too (with zeros)
        transform.transforms[0] = transforms.RandomCrop(args.input_size, padding=4, pad_if_needed=True)
    return transform


class RandomGaussianBlur:
    """PIL Gaussian blur with a radius drawn uniformly from [radius_min, radius_max] (DeiT III's 3-Augment)."""

    def __init__(self, radius_min: float = 0.1, radius_max: float = 2.0):
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}(radius=({self.radius_min}, {self.radius_max}))'


def three_augment_transform(input_size: int, color_jitter, simple_random_crop: bool) -> transforms.Compose:
    """DeiT III's 3-Augment: crop + flip, then one of grayscale / solarize / blur, optional color jitter.

    `simple_random_crop` (`--src`) replaces the random-resized crop with resize + reflect-padded RandomCrop.
    """
    if simple_random_crop:
        crop = [transforms.Resize(input_size, interpolation=InterpolationMode.BICUBIC),
                transforms.RandomCrop(input_size, padding=4, padding_mode='reflect')]
    else:
        crop = [transforms.RandomResizedCrop(input_size, scale=(0.08, 1.0), interpolation=InterpolationMode.BICUBIC)]
    tfl = crop + [
        transforms.RandomHorizontalFlip(),
        transforms.RandomChoice([transforms.Grayscale(num_output_channels=3),
                                 transforms.RandomSolarize(threshold=128, p=1.0),
                                 RandomGaussianBlur()]),
    ]
    if color_jitter:
        tfl.append(transforms.ColorJitter(color_jitter, color_jitter, color_jitter))
    return transforms.Compose(tfl + normalize_to_tensor())


def shift_transform(input_size: int, shift: float) -> transforms.Compose:
    """Resize to `input_size` x `input_size` and translate by up to `shift` of each side; no flip.

    Meant for small centred images such as digits, where flips and crops would change the label.
    """
    return transforms.Compose([
        transforms.Resize((input_size, input_size), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomAffine(degrees=0, translate=(shift, shift)),
    ] + normalize_to_tensor())


def eval_transform(input_size: int, crop_ratio: float) -> transforms.Compose:
    """Bicubic resize to `int(input_size / crop_ratio)`, centre crop `input_size`, normalize (DeiT).

    At input sizes of 32 px or less DeiT does not crop (CIFAR images already have the input size); here such
    images are resized to exactly `input_size` x `input_size`, which leaves 32 px CIFAR images unchanged and
    brings smaller images (digits) to the size the shift-augmented training pipeline produces.
    """
    if input_size <= SMALL_IMAGE_SIZE:
        resize = [transforms.Resize((input_size, input_size), interpolation=InterpolationMode.BICUBIC)]
    else:
        resize = [transforms.Resize(int(input_size / crop_ratio), interpolation=InterpolationMode.BICUBIC),
                  transforms.CenterCrop(input_size)]
    return transforms.Compose(resize + normalize_to_tensor())


def build_transform(is_train: bool, args) -> transforms.Compose:
    """The image transform for one split.

    Training picks, in this order: `--shift-aug > 0` (shift_transform), `--ThreeAugment` (DeiT III, with `--src`),
    else DeiT's RandAugment pipeline. Evaluation uses `--eval-crop-ratio` (default 0.875 = 224/256).
    """
    if not is_train:
        return eval_transform(args.input_size, getattr(args, 'eval_crop_ratio', 0.875))
    shift = getattr(args, 'shift_aug', 0.0) or 0.0
    if shift > 0:
        return shift_transform(args.input_size, shift)
    if getattr(args, 'ThreeAugment', False):
        return three_augment_transform(args.input_size, args.color_jitter, getattr(args, 'src', False))
    return deit_train_transform(args)
