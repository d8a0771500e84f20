"""datasets.py: layouts, error messages, bad images, transforms and the timm Posterize guard."""
import json
import logging
import os
import random
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment
from torchvision import transforms

import datasets
from datasets import DatasetError, build_dataset, build_transform
from helpers import make_image_folder


def make_args(data_path, **overrides):
    """The fields of main.py's argparse namespace that datasets.py reads, at the official defaults."""
    args = dict(data_set='IMNET', data_path=str(data_path), inat_category='name', input_size=32, color_jitter=0.4,
                aa='rand-m9-mstd0.5-inc1', train_interpolation='bicubic', reprob=0.25, remode='pixel', recount=1)
    args.update(overrides)
    return Namespace(**args)


def rgb_image(size=32, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# ImageFolder layout
# ---------------------------------------------------------------------------------------------------------------

def test_imnet_train_and_val(tmp_path):
    make_image_folder(tmp_path, num_classes=3, train_per_class=8, val_per_class=4, size=32)
    args = make_args(tmp_path)
    train, nb_classes = build_dataset(True, args)
    val, val_classes = build_dataset(False, args)
    assert (nb_classes, val_classes) == (3, 3)
    assert (len(train), len(val)) == (24, 12)
    assert train.classes == val.classes == ['class_00', 'class_01', 'class_02']
    assert sorted(set(train.targets)) == [0, 1, 2] and val.targets.count(2) == 4
    img, target = train[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and target == 0
    img, target = val[11]
    assert img.shape == (3, 32, 32) and target == 2
    assert train.num_skipped == 0


def test_imnet100_same_layout_larger_input(tmp_path):
    make_image_folder(tmp_path, num_classes=2, train_per_class=2, val_per_class=2, size=40)
    args = make_args(tmp_path, data_set='IMNET100', input_size=48)
    train, nb_classes = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    assert nb_classes == 2
    assert train[0][0].shape == val[0][0].shape == (3, 48, 48)


def test_val_class_mismatch_names_classes(tmp_path):
    make_image_folder(tmp_path, num_classes=3, train_per_class=1, val_per_class=1)
    os.rename(tmp_path / 'val' / 'class_01', tmp_path / 'val' / 'zebra')
    build_dataset(True, make_args(tmp_path))  # the train split alone is fine
    with pytest.raises(DatasetError) as err:
        build_dataset(False, make_args(tmp_path))
    msg = str(err.value)
    assert 'only in train: class_01' in msg and 'only in val: zebra' in msg and 'fix:' in msg
    assert '\n' not in msg


def test_missing_data_path_and_splits(tmp_path):
    with pytest.raises(DatasetError, match=r'--data-path .*nowhere does not exist; fix:'):
        build_dataset(True, make_args(tmp_path / 'nowhere'))
    (tmp_path / 'file').write_text('x')
    with pytest.raises(DatasetError, match='is not a directory'):
        build_dataset(True, make_args(tmp_path / 'file'))
    make_image_folder(tmp_path / 'd', num_classes=2, train_per_class=1, val_per_class=1)
    os.rename(tmp_path / 'd' / 'val', tmp_path / 'd' / 'validation')
    with pytest.raises(DatasetError, match=r'd/val is missing \(train/ is there\); fix: put the validation images '
                                           r'in val/<class>/'):
        build_dataset(False, make_args(tmp_path / 'd'))
    os.rename(tmp_path / 'd' / 'train', tmp_path / 'd' / 'training')
    with pytest.raises(DatasetError, match=r'd/train is missing'):
        build_dataset(True, make_args(tmp_path / 'd'))


def test_flat_val_points_to_prepare_script(tmp_path):
    make_image_folder(tmp_path, num_classes=2, train_per_class=1, val_per_class=2)
    for folder in (tmp_path / 'val').iterdir():
        for f in folder.iterdir():
            f.rename(tmp_path / 'val' / f.name)
        folder.rmdir()
    with pytest.raises(DatasetError) as err:
        build_dataset(False, make_args(tmp_path))
    msg = str(err.value)
    assert 'holds 4 image files but no class folders' in msg
    assert 'python scripts/prepare_imagenet.py' in msg


def test_split_without_classes_or_images(tmp_path):
    (tmp_path / 'train').mkdir()
    (tmp_path / 'val').mkdir()
    with pytest.raises(DatasetError, match=r'train has no class folders; fix: put each class'):
        build_dataset(True, make_args(tmp_path))
    for split in ('train', 'val'):
        (tmp_path / split / 'a').mkdir()
        (tmp_path / split / 'b').mkdir()
    with pytest.raises(DatasetError, match=r'train has 2 class folders but no images; fix: add images'):
        build_dataset(True, make_args(tmp_path))
    rgb_image().save(tmp_path / 'train' / 'a' / 'x.png')
    with pytest.raises(DatasetError, match=r'1 class folders have no images \(b\); fix:'):
        build_dataset(True, make_args(tmp_path))


def test_unknown_data_set(tmp_path):
    with pytest.raises(DatasetError, match='unknown --data-set .IMAGENET.; fix: choose one of IMNET, IMNET100'):
        build_dataset(True, make_args(tmp_path, data_set='IMAGENET'))


# ---------------------------------------------------------------------------------------------------------------
# Bad images
# ---------------------------------------------------------------------------------------------------------------

def corrupt_first_image(root):
    bad = sorted((root / 'train' / 'class_00').iterdir())[0]
    bad.write_bytes(b'this is not a png' * 10)
    return bad


def test_corrupt_image_raises_with_path_and_hint(tmp_path):
    make_image_folder(tmp_path, num_classes=2, train_per_class=3, val_per_class=1)
    bad = corrupt_first_image(tmp_path)
    train, _ = build_dataset(True, make_args(tmp_path))
    with pytest.raises(DatasetError) as err:
        train[0]
    msg = str(err.value)
    assert str(bad) in msg and '--skip-bad-images' in msg and 'UnidentifiedImageError' in msg
    assert '\n' not in msg
    assert train[1][1] == 0  # readable images still load


def test_corrupt_image_skipped_and_counted(tmp_path, caplog):
    make_image_folder(tmp_path, num_classes=2, train_per_class=3, val_per_class=1)
    bad = corrupt_first_image(tmp_path)
    train, _ = build_dataset(True, make_args(tmp_path, skip_bad_images=True, aa='none', reprob=0.0))
    with caplog.at_level(logging.WARNING, logger='datasets'):
        img, target = train[0]  # replaced by the next sample, same class here
        train[0]
    assert img.shape == (3, 32, 32) and target == 0
    assert train.num_skipped == 1
    assert len(caplog.records) == 1 and f'skipped unreadable image {bad}' in caplog.records[0].message
    items = [train[i][1] for i in range(len(train))]
    assert items == [0, 0, 0, 1, 1, 1] and train.num_skipped == 1


def test_all_images_unreadable_with_skip(tmp_path):
    for c in ('a', 'b'):
        (tmp_path / 'train' / c).mkdir(parents=True)
        (tmp_path / 'val' / c).mkdir(parents=True)
        (tmp_path / 'train' / c / 'x.jpg').write_bytes(b'\x00' * 20)
    train, _ = build_dataset(True, make_args(tmp_path, skip_bad_images=True))
    with pytest.raises(DatasetError, match=r'no readable image left in .*train \(2 unreadable\)'):
        train[1]


# ---------------------------------------------------------------------------------------------------------------
# CIFAR and iNaturalist
# ---------------------------------------------------------------------------------------------------------------

def test_cifar_missing_never_downloads(tmp_path):
    with pytest.raises(DatasetError) as err:
        build_dataset(True, make_args(tmp_path, data_set='CIFAR'))
    msg = str(err.value)
    assert f'expected {tmp_path}/cifar-100-python/' in msg and 'never downloaded' in msg
    assert list(tmp_path.iterdir()) == []


INAT_CATEGORIES = [dict(id=0, name='Apis mellifera', genus='Apis', kingdom='Animalia', supercategory='Insecta'),
                   dict(id=1, name='Bombus terrestris', genus='Bombus', kingdom='Animalia', supercategory='Insecta'),
                   dict(id=2, name='Apis cerana', genus='Apis', kingdom='Animalia', supercategory='Insecta'),
                   dict(id=3, name='Quercus robur', genus='Quercus', kingdom='Plantae', supercategory='Plantae')]


def make_inat(root, year=2018, layout='deit'):
    """A tiny iNaturalist tree: categories.json, train/val<year>.json and the images, in DeiT's layout
    (`train_val<year>/<category id>/<file>`) or the archive's (`train_val<year>/<supercategory>/<id>/<file>`).

    The train annotations meet the categories in the order 3, 0, 2, 1 (not by id, not by name), so labels that
    follow DeiT (order of first occurrence) differ from sorted names and from ids. Train images are listed in
    another order than their annotations. Returns {split: [category id of each listed image]}.
    """
    (root / 'categories.json').write_text(json.dumps(INAT_CATEGORIES))
    annotated = {'train': [3, 0, 2, 1, 3, 0], 'val': [1, 3, 2, 0]}
    listed = {'train': [5, 4, 3, 2, 1, 0], 'val': [0, 1, 2, 3]}  # image order in the json, by annotation number
    cats = {}
    for split, ids in annotated.items():
        images, annotations = [], []
        for i, cat in enumerate(ids):
            file_name = f'train_val{year}/{INAT_CATEGORIES[cat]["supercategory"]}/{cat}/{split}{i}.jpg'
            folder, supercategory, cat_id, name = file_name.split('/')
            on_disk = root / (file_name if layout == 'archive' else f'{folder}/{cat_id}/{name}')
            on_disk.parent.mkdir(parents=True, exist_ok=True)
            rgb_image(24, seed=i).save(on_disk)
            images.append(dict(id=100 + i, file_name=file_name))
            annotations.append(dict(id=i, image_id=100 + i, category_id=cat))
        images = [images[i] for i in listed[split]]
        cats[split] = [ids[i] for i in listed[split]]
        (root / f'{split}{year}.json').write_text(json.dumps(dict(images=images, annotations=annotations)))
    return cats


@pytest.mark.parametrize('data_set,year', [('INAT', 2018), ('INAT19', 2019)])
def test_inat_labels_follow_deit(tmp_path, data_set, year):
    """Class index = order of first occurrence in train<year>.json's annotations, at every level; each image's
    label comes from the category id folder of its file_name; DeiT's folder layout is read."""
    cats = make_inat(tmp_path, year)
    args = make_args(tmp_path, data_set=data_set, input_size=32)
    train, nb_classes = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    assert nb_classes == 4 and train.classes == ['Quercus robur', 'Apis mellifera', 'Apis cerana', 'Bombus terrestris']
    index = {0: 1, 1: 3, 2: 2, 3: 0}  # category id -> class index at the 'name' level
    assert train.targets == [index[c] for c in cats['train']] == [1, 0, 3, 2, 1, 0]
    assert val.targets == [index[c] for c in cats['val']] == [3, 0, 2, 1]
    assert [os.path.relpath(p, tmp_path) for p, _ in val.samples][:2] == [f'train_val{year}/1/val0.jpg',
                                                                         f'train_val{year}/3/val1.jpg']
    assert val[0][0].shape == (3, 32, 32)

    for level, classes, targets in (('genus', ['Quercus', 'Apis', 'Bombus'], [1, 0, 2, 1, 1, 0]),
                                    ('kingdom', ['Plantae', 'Animalia'], [1, 0, 1, 1, 1, 0]),
                                    ('supercategory', ['Plantae', 'Insecta'], [1, 0, 1, 1, 1, 0])):
        level_train, level_classes = build_dataset(True, make_args(tmp_path, data_set=data_set, inat_category=level))
        assert (level_train.classes, level_classes, level_train.targets) == (classes, len(classes), targets), level


def test_inat_reads_the_archive_layout_too(tmp_path):
    """Images left where the extracted archive puts them (with the supercategory folder) are found as well."""
    cats = make_inat(tmp_path, layout='archive')
    val, _ = build_dataset(False, make_args(tmp_path, data_set='INAT'))
    assert os.path.relpath(val.samples[0][0], tmp_path) == 'train_val2018/Insecta/1/val0.jpg'
    assert val.targets == [3, 0, 2, 1] and len(cats['val']) == 4
    assert val[3][0].shape == (3, 32, 32)


def test_inat_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"categories.json is missing; fix: put iNaturalist's categories.json"):
        build_dataset(True, make_args(tmp_path, data_set='INAT'))
    make_inat(tmp_path)
    with pytest.raises(DatasetError, match=r"has no 'order' field; fix: choose --inat-category from genus, kingdom, "
                                           r"name, supercategory"):
        build_dataset(True, make_args(tmp_path, data_set='INAT', inat_category='order'))
    (tmp_path / 'val2018.json').write_text('{"images": [')
    with pytest.raises(DatasetError, match='val2018.json is not valid JSON'):
        build_dataset(False, make_args(tmp_path, data_set='INAT'))
    (tmp_path / 'val2018.json').write_text(json.dumps(dict(annotations=[], images=[
        dict(id=1, file_name='train_val2018/Plantae/7/x.jpg')])))
    with pytest.raises(DatasetError, match=r"category id 7 .* is not an entry of categories.json \(4 entries\)"):
        build_dataset(False, make_args(tmp_path, data_set='INAT'))
    (tmp_path / 'val2018.json').write_text(json.dumps(dict(annotations=[], images=[dict(id=1, file_name='x.jpg')])))
    with pytest.raises(DatasetError, match=r"file_name 'x.jpg' is not <folder>/<supercategory>/<category id>/<file>"):
        build_dataset(False, make_args(tmp_path, data_set='INAT'))
    (tmp_path / 'categories.json').write_text(json.dumps(INAT_CATEGORIES[::-1]))
    with pytest.raises(DatasetError, match=r'entry 0 has id 3, but category ids index this list'):
        build_dataset(True, make_args(tmp_path, data_set='INAT'))


# ---------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------

def transform_types(t):
    return [type(x).__name__ for x in t.transforms]


def test_deit_train_transform_small_and_large():
    small = build_transform(True, make_args('.', input_size=32))
    assert isinstance(small.transforms[0], transforms.RandomCrop) and small.transforms[0].padding == 4
    assert 'RandAugment' in transform_types(small) and 'RandomErasing' in transform_types(small)
    large = build_transform(True, make_args('.', input_size=64, aa='none'))
    assert transform_types(large)[0] == 'RandomResizedCropAndInterpolation'
    assert 'RandAugment' not in transform_types(large) and 'ColorJitter' in transform_types(large)
    assert large(rgb_image(80)).shape == (3, 64, 64)


def test_eval_transform_sizes_and_normalization():
    t = build_transform(False, make_args('.', input_size=224))
    assert t.transforms[0].size == 256 and t.transforms[1].size == (224, 224)
    t = build_transform(False, make_args('.', input_size=64, eval_crop_ratio=0.5))
    assert t.transforms[0].size == 128
    white = Image.new('RGB', (40, 40), (255, 255, 255))
    out = t(white)
    assert out.shape == (3, 64, 64)
    expected = [(1 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-4)
    small = build_transform(False, make_args('.', input_size=32))
    img = rgb_image(32)
    assert torch.allclose(small(img), transforms.Compose(datasets.normalize_to_tensor())(img))  # CIFAR untouched
    assert small(rgb_image(8)).shape == (3, 32, 32)  # digits brought to the input size


def test_shift_aug_transform():
    t = build_transform(True, make_args('.', input_size=16, shift_aug=0.25))
    assert transform_types(t) == ['Resize', 'RandomAffine', 'ToTensor', 'Normalize']
    assert t.transforms[1].translate == (0.25, 0.25) and t.transforms[1].degrees == [0.0, 0.0]
    img = Image.new('RGB', (8, 8))
    img.putpixel((4, 4), (255, 255, 255))
    outs = [t(img) for _ in range(30)]
    assert all(o.shape == (3, 16, 16) for o in outs)
    assert len({int(o[0].argmax()) for o in outs}) > 1  # the bright pixel moves


def test_three_augment_transform():
    t = build_transform(True, make_args('.', input_size=32, ThreeAugment=True, src=True))
    types = transform_types(t)
    assert types == ['Resize', 'RandomCrop', 'RandomHorizontalFlip', 'RandomChoice', 'ColorJitter', 'ToTensor',
                     'Normalize']
    assert t.transforms[1].padding_mode == 'reflect'
    choices = [type(x).__name__ for x in t.transforms[3].transforms]
    assert choices == ['Grayscale', 'RandomSolarize', 'RandomGaussianBlur']
    rrc = build_transform(True, make_args('.', input_size=32, ThreeAugment=True, color_jitter=0.0))
    assert transform_types(rrc)[0] == 'RandomResizedCrop' and 'ColorJitter' not in transform_types(rrc)
    assert all(rrc(rgb_image(48, seed=s)).shape == (3, 32, 32) for s in range(10))


# ---------------------------------------------------------------------------------------------------------------
# timm Posterize guard (Pillow 13 rejects 0 bits)
# ---------------------------------------------------------------------------------------------------------------

def test_posterize_zero_bits_is_black():
    img = rgb_image(16)
    for op_name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
        assert auto_augment.NAME_TO_OP[op_name] is datasets.posterize_keep_zero_bits
    out = datasets.posterize_keep_zero_bits(img, 0)
    assert out.mode == 'RGB' and out.size == (16, 16) and not np.asarray(out).any()
    gray = datasets.posterize_keep_zero_bits(img.convert('L'), 0)
    assert gray.mode == 'L' and not np.asarray(gray).any()
    two = np.asarray(datasets.posterize_keep_zero_bits(img, 2))
    assert np.array_equal(two, np.asarray(img) & 0b11000000)
    # the case that crashed: inc1 RandAugment at magnitude 10 keeps 4 - 4 = 0 bits
    op = auto_augment.AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)
    assert not np.asarray(op(img)).any()


def test_every_augment_op_at_every_magnitude_runs():
    imgs = [rgb_image(32, seed=s) for s in range(2)]
    for name in auto_augment.NAME_TO_OP:
        for magnitude in range(11):
            op = auto_augment.AugmentOp(name, prob=1.0, magnitude=magnitude)
            for img in imgs:
                out = op(img)
                assert out.size == img.size and out.mode == 'RGB', (name, magnitude)
        noisy = auto_augment.AugmentOp(name, prob=1.0, magnitude=9, hparams=dict(
            auto_augment._HPARAMS_DEFAULT, magnitude_std=0.5))
        uniform = auto_augment.AugmentOp(name, prob=1.0, magnitude=10, hparams=dict(
            auto_augment._HPARAMS_DEFAULT, magnitude_std=float('inf')))
        for _ in range(20):
            assert noisy(imgs[0]).size == uniform(imgs[1]).size == (32, 32)


def test_official_rand_augment_reaches_zero_bits_without_error(monkeypatch):
    """DeiT's default policy keeps 0 bits in about one image in 650, which Pillow 13 alone would reject."""
    bits_seen = []

    def recording_posterize(img, bits_to_keep, **kwargs):
        bits_seen.append(bits_to_keep)
        return datasets.posterize_keep_zero_bits(img, bits_to_keep, **kwargs)

    monkeypatch.setitem(auto_augment.NAME_TO_OP, 'PosterizeIncreasing', recording_posterize)
    random.seed(0)
    np.random.seed(0)
    ra = auto_augment.rand_augment_transform('rand-m9-mstd0.5-inc1', dict(auto_augment._HPARAMS_DEFAULT))
    img = rgb_image(8)
    for _ in range(5000):
        assert ra(img).size == (8, 8)
    assert 0 in bits_seen and set(bits_seen) <= {0, 1, 2}
