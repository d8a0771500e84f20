"""Data problems: symlink cycles and files reached from two classes are one line naming the path; 16-bit and float
images are scaled from their range (or refused), never clipped; images smaller than the crop are padded;
prepare_imagenet.py counts every image extension and reports broken archives in one line."""
import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datasets
from datasets import DatasetError
from failures import TINY, assert_one_error, snapshot
from helpers import make_image_folder, run_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    """A finished 1-epoch run on a 2-class folder: (its data, its output folder)."""
    data = make_image_folder(tmp_path_factory.mktemp('data'), num_classes=2, train_per_class=8, val_per_class=2)
    out = tmp_path_factory.mktemp('finished')
    code, _, err = run_main([*TINY, '--data-path', data, '--output_dir', out, '--epochs', 1])
    assert code == 0, err
    return data, out


@pytest.fixture
def copies(finished, tmp_path):
    """Copies of the finished run's data and output folder, to break and to continue."""
    data, out = finished
    return shutil.copytree(data, tmp_path / 'data'), shutil.copytree(out, tmp_path / 'run')


def continue_run(data, out, *extra):
    return run_main([*TINY, '--data-path', data, '--output_dir', out, '--epochs', 2, '--auto_reload', *extra])


def link_cycle(data):
    os.symlink(data / 'train', data / 'train' / 'class_01' / 'again')
    return rf'{data}/train/class_01/again links back to {data}/train, a folder it is inside of \(a symlink cycle\)'


def link_other_class(data):
    os.symlink(data / 'train' / 'class_00' / 'train_0_3.png', data / 'train' / 'class_01' / 'borrowed.png')
    return (rf'{data}/train/class_00/train_0_3\.png \(class class_00\) and {data}/train/class_01/borrowed\.png '
            r'\(class class_01\) are the same file .*: an image can have one class only')


def float_out_of_range(data):
    image = data / 'train' / 'class_01' / 'hdr.tiff'
    Image.fromarray(np.linspace(0, 4, 64, dtype=np.float32).reshape(8, 8)).save(image)
    return rf'cannot read image {image} \(F image with values in \[0, 4\], outside \[0, 1\]\); fix: save it as an 8-bit'


@pytest.mark.parametrize('damage', [link_cycle, link_other_class, float_out_of_range])
def test_bad_data_is_one_line_naming_the_path(copies, damage):
    data, out = copies
    expected = damage(data)
    before = snapshot(out)
    code, _, err = continue_run(data, out, '--no-repeated-aug')  # every training image is read in the epoch
    assert_one_error(code, err, expected)
    assert snapshot(out) == before


def test_the_walk_keeps_torchvisions_order(tmp_path):
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
    data = make_image_folder(tmp_path, num_classes=3, train_per_class=3, val_per_class=1)
    (data / 'train' / 'class_01' / 'deeper' / 'er').mkdir(parents=True)
    for name in ('b.JPG', 'a.png', 'notes.txt'):
        (data / 'train' / 'class_01' / 'deeper' / name).write_bytes(b'')
    (data / 'train' / 'class_01' / 'deeper' / 'er' / 'c.webp').write_bytes(b'')
    classes = {f'class_{i:02d}': i for i in range(3)}
    expected = make_dataset(str(data / 'train'), classes, extensions=IMG_EXTENSIONS)
    assert datasets.find_images(str(data / 'train'), classes) == expected and len(expected) == 12


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    grey16 = np.array([[0, 257, 32896], [65535, 1000, 51400]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / 'grey16.png')
    grey_float = np.array([[0.0, 0.25, 0.5], [1.0, 0.1, 0.75]], dtype=np.float32)
    Image.fromarray(grey_float).save(tmp_path / 'float.tiff')
    for name, values, top in (('grey16.png', grey16, 65535.0), ('float.tiff', grey_float, 1.0)):
        rgb = np.asarray(datasets.load_rgb(str(tmp_path / name)))
        expected = np.floor(values.astype(np.float64) / top * 255.0 + 0.5).astype(np.uint8)  # round half up
        assert rgb.shape == (2, 3, 3) and (rgb == expected[..., None]).all(), (name, rgb[..., 0], expected)
    with pytest.raises(DatasetError, match=r'F image with values in \[-1, 1\], outside \[0, 1\]'):
        Image.fromarray(np.array([[-1.0, 1.0]], dtype=np.float32)).save(tmp_path / 'signed.tiff')
        datasets.load_rgb(str(tmp_path / 'signed.tiff'))


def test_images_smaller_than_the_crop_are_padded(tmp_path):
    data = make_image_folder(tmp_path / 'data', num_classes=2, train_per_class=8, val_per_class=2, size=8)
    out = tmp_path / 'run'
    code, stdout, err = run_main([*TINY, '--data-path', data, '--output_dir', out, '--epochs', 1, '--no-repeated-aug'])
    assert code == 0, err
    assert (out / 'checkpoint.pth').is_file() and 'Accuracy of the network on the 4 test images' in stdout
    crop = datasets.build_transform(True, type('Args', (), dict(
        input_size=32, color_jitter=0.4, aa='none', train_interpolation='bicubic', reprob=0.0, remode='pixel',
        recount=1))())
    assert tuple(crop(Image.new('RGB', (5, 3))).shape) == (3, 32, 32)


# ---------------------------------------------------------------------------------------------------------------
# prepare_imagenet.py
# ---------------------------------------------------------------------------------------------------------------

def load_prepare_imagenet():
    spec = importlib.util.spec_from_file_location('prepare_imagenet', ROOT / 'scripts' / 'prepare_imagenet.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_verify_only_counts_every_image_extension(tmp_path, capsys):
    prepare_imagenet = load_prepare_imagenet()
    for split, names in (('train', ('a.JPEG', 'b.jpg', 'c.png', 'd.webp')), ('val', ('e.jpeg', 'f.PNG'))):
        for wnid in ('n01', 'n02'):
            (tmp_path / split / wnid).mkdir(parents=True)
            for name in names + ('notes.txt',):
                (tmp_path / split / wnid / name).write_bytes(b'')
    assert prepare_imagenet.main(['--verify-only', '--output', str(tmp_path), '--expect-classes', '2',
                                  '--expect-train', '8', '--expect-val', '4']) == 0
    assert 'is complete: 2 classes, 8 train and 4 val images' in capsys.readouterr().out


def test_garbage_archives_are_one_line(tmp_path, capsys, monkeypatch):
    prepare_imagenet = load_prepare_imagenet()
    monkeypatch.setattr(prepare_imagenet.imagenet, 'ARCHIVE_META', prepare_imagenet.imagenet.ARCHIVE_META)
    archives = tmp_path / 'archives'
    archives.mkdir()
    for name in ('ILSVRC2012_devkit_t12.tar.gz', 'ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar'):
        (archives / name).write_bytes(b'this is not an archive\n' * 40)
    before = snapshot(archives)
    code = prepare_imagenet.main(['--archives', str(archives), '--output', str(tmp_path / 'out'), '--skip-md5'])
    err = capsys.readouterr().err
    line = assert_one_error(code, err, rf'{tmp_path}/out is incomplete: {archives}/ILSVRC2012_devkit_t12\.tar\.gz '
                                       r'cannot be read \(not a gzip file\); download it again; '
                                       rf'{archives}/ILSVRC2012_img_train\.tar cannot be read',
                            status=1, prefix='prepare_imagenet.py: error: ')
    assert 'train/ is missing' in line and snapshot(archives) == before
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == []  # nothing half-extracted
