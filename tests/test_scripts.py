"""The scripts in scripts/: reproduction launchers (their commands are the paper's), the ImageNet
preparation (on tiny fake ILSVRC2012 archives of the real structure) and the digits export."""
import importlib.util
import io
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image
from torchvision.datasets import imagenet

from helpers import run_script as run_python_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / 'scripts'

# The paper's reproduction commands, verbatim; {data} and {ckpt} are the paths given to the script. The
# evaluation takes the released weights with --pretrained where the paper passes --resume <file> (see below).
PAPER = {
    'train_attnscale_small_12.sh': 'python -m torch.distributed.launch --nproc_per_node=2 --master_port 29700 --use_env main.py --auto_reload --model attnscale_small_12 --batch-size 512 --data-path {data} --data-set IMNET --input-size 224 --output_dir ./logs/imnet1k_attnscale_small_12',
    'train_featscale_small_12.sh': 'python -m torch.distributed.launch --nproc_per_node=2 --master_port 29701 --use_env main.py --auto_reload --model featscale_small_12 --batch-size 512 --data-path {data} --data-set IMNET --input-size 224 --output_dir ./logs/imnet1k_featscale_small_12',
    'train_attnscale_small_24.sh': 'python -m torch.distributed.launch --nproc_per_node=2 --master_port 29702 --use_env main.py --auto_reload --model attnscale_small_24 --batch-size 256 --drop 0.2 --data-path {data} --data-set IMNET --input-size 224 --output_dir ./logs/imnet1k_attnscale_small_24',
    'train_featscale_small_24.sh': 'python -m torch.distributed.launch --nproc_per_node=2 --master_port 29703 --use_env main.py --auto_reload --model featscale_small_24 --batch-size 256 --drop 0.2 --data-path {data} --data-set IMNET --input-size 224 --output_dir ./logs/imnet1k_featscale_small_24',
    'finetune_attnscale_cait_S24_224.sh': 'python -m torch.distributed.launch --nproc_per_node=2 --master_port 29704 --use_env main.py --auto_reload --model attnscale_cait_S24_224 --batch-size 128 --epochs 60 --lr 5e-5 --weight-decay 5e-4 --min-lr 1e-6 --warmup-epochs 1 --decay-epochs 5 --data-path {data} --data-set IMNET --input-size 224 --output_dir ./logs/imnet1k_attnscale_cait_S24_224 --resume {ckpt}',
    'finetune_featscale_cait_S24_224.sh': 'python -m torch.distributed.launch --nproc_per_node=2 --master_port 29705 --use_env main.py --auto_reload --model featscale_cait_S24_224 --batch-size 128 --epochs 60 --lr 5e-5 --weight-decay 5e-4 --min-lr 1e-6 --warmup-epochs 1 --decay-epochs 5 --data-path {data} --data-set IMNET --input-size 224 --output_dir ./logs/imnet1k_featscale_cait_S24_224 --resume {ckpt}',
    'eval_released.sh': 'python -m torch.distributed.launch --nproc_per_node=2 --master_port 29701 --use_env main.py --model attnscale_small_12 --batch-size 256 --drop 0.2 --data-path {data} --data-set IMNET --input-size 224 --output_dir ./logs/eval_attnscale_small_12 --eval --pretrained',
}
NEEDS_CKPT = ('finetune_attnscale_cait_S24_224.sh', 'finetune_featscale_cait_S24_224.sh')
LAUNCH_ENV = ('DATA_PATH', 'CKPT', 'NPROC', 'MASTER_PORT', 'OUTPUT_DIR', 'PYTHON', 'MODEL')


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare_imagenet = load_script('prepare_imagenet')
export_digits = load_script('export_digits')


# ---------------------------------------------------------------- reproduction scripts

def run_script(script, *args, cwd=ROOT, **env):
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    return subprocess.run(['bash', str(SCRIPTS / script), *args], cwd=cwd, env={**clean, **env},
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def paths(tmp_path):
    """A data folder and a checkpoint folder holding the files the scripts are pointed at."""
    data, ckpts = tmp_path / 'imagenet', tmp_path / 'ckpts'
    data.mkdir()
    ckpts.mkdir()
    for name in ('S24_224.pth', 'attnscale_small_12.pth', 'featscale_cait_xxs24_224.pth'):
        (ckpts / name).touch()
    return data, ckpts


def ckpt_args(script, ckpts):
    return [str(ckpts / 'S24_224.pth')], ckpts / 'S24_224.pth'


@pytest.mark.parametrize('script', PAPER)
def test_dry_run_prints_the_papers_command(script, paths):
    data, ckpts = paths
    extra, ckpt = ckpt_args(script, ckpts) if script in NEEDS_CKPT else ([], None)
    result = run_script(script, '--dry-run', str(data), *extra)
    assert result.returncode == 0, result.stderr
    assert result.stdout == '+ ' + PAPER[script].format(data=data, ckpt=ckpt) + '\n'


@pytest.mark.parametrize('script', PAPER)
def test_environment_overrides_and_extra_args(script, paths, tmp_path):
    data, ckpts = paths
    extra, ckpt = ckpt_args(script, ckpts) if script in NEEDS_CKPT else ([], None)
    env = {'DATA_PATH': str(data), 'NPROC': '8', 'MASTER_PORT': '30000', 'OUTPUT_DIR': 'runs/x'}
    if extra:
        env['CKPT'] = extra[0]
    result = run_script(script, '--dry-run', '--', '--epochs', '3', cwd=tmp_path, **env)
    assert result.returncode == 0, result.stderr
    default = PAPER[script].format(data=data, ckpt=ckpt)
    port = default.split('--master_port ')[1].split()[0]
    out_dir = default.split('--output_dir ')[1].split()[0]
    expected = (default.replace(f'--nproc_per_node=2 --master_port {port}', '--nproc_per_node=8 --master_port 30000')
                .replace(f'--output_dir {out_dir}', f'--output_dir {tmp_path}/runs/x'))
    assert result.stdout == f'+ {expected} --epochs 3\n'


@pytest.mark.parametrize('script', PAPER)
def test_missing_data_path_is_a_usage_error(script, tmp_path):
    for args in ([], [str(tmp_path / 'absent')]):
        result = run_script(script, '--dry-run', *args)
        assert result.returncode == 2
        assert result.stdout == ''
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f'{script}: error: ') and 'usage: ' in lines[0]
        assert ('no data path given' if not args else 'is not a directory') in lines[0]


@pytest.mark.parametrize('script', NEEDS_CKPT)
def test_missing_checkpoint_is_a_usage_error(script, paths):
    data, ckpts = paths
    for args in ([], [str(ckpts / 'absent.pth')]):
        result = run_script(script, '--dry-run', str(data), *args)
        assert result.returncode == 2
        assert ('no checkpoint given' if not args else 'is not a file') in result.stderr


def test_eval_takes_a_released_model_name_and_optionally_a_checkpoint(paths):
    data, ckpts = paths
    cait = run_script('eval_released.sh', '--dry-run', str(data), 'featscale_cait_XXS24_224')
    assert cait.stdout.endswith(' --output_dir ./logs/eval_featscale_cait_XXS24_224 --eval --pretrained\n')
    assert ' --model featscale_cait_XXS24_224 ' in cait.stdout
    folder = run_script('eval_released.sh', '--dry-run', str(data), 'featscale_cait_XXS24_224', str(ckpts))
    assert folder.stdout.endswith(f' --eval --resume {ckpts}/featscale_cait_xxs24_224.pth\n')  # the Hub's file name
    file = ckpts / 'attnscale_small_12.pth'
    direct = run_script('eval_released.sh', '--dry-run', str(data), 'attnscale_small_12', str(file))
    paper = PAPER['eval_released.sh'].format(data=data).replace('--eval --pretrained', f'--eval --resume {file}')
    assert direct.stdout == f'+ {paper}\n'  # the paper's own command


def test_eval_refuses_other_models_and_missing_files(paths):
    data, ckpts = paths
    other = run_script('eval_released.sh', '--dry-run', str(data), 'featscale_small_24')
    assert other.returncode == 2 and other.stdout == ''
    assert other.stderr.startswith('eval_released.sh: error: featscale_small_24 has no released weights; MODEL is one '
                                   'of: attnscale_small_12, featscale_small_12, attnscale_cait_XXS24_224, '
                                   'featscale_cait_XXS24_224; usage: ')
    missing = run_script('eval_released.sh', '--dry-run', str(data), 'attnscale_cait_XXS24_224', str(ckpts))
    assert missing.returncode == 2 and 'attnscale_cait_xxs24_224.pth\' is not a file' in missing.stderr


def test_bad_options_are_usage_errors(paths):
    data, _ = paths
    assert run_script('train_attnscale_small_12.sh', '--bogus', str(data)).returncode == 2
    assert run_script('train_attnscale_small_12.sh', str(data), 'extra').returncode == 2
    assert run_script('train_attnscale_small_12.sh', str(data), NPROC='0').returncode == 2
    help_ = run_script('train_attnscale_small_12.sh', '--help')
    assert help_.returncode == 0 and help_.stdout.startswith('usage: train_attnscale_small_12.sh')


def test_runs_the_command_from_the_repo_root(paths, tmp_path):
    """Without --dry-run the printed command is executed, from the repository root."""
    data, _ = paths
    record = tmp_path / 'record.txt'
    fake_python = tmp_path / 'python'
    fake_python.write_text(f'#!/usr/bin/env bash\n{{ pwd; echo "$@"; }} > {record}\n')
    fake_python.chmod(0o755)
    result = run_script('train_featscale_small_24.sh', str(data), cwd=tmp_path, PYTHON=str(fake_python))
    assert result.returncode == 0, result.stderr
    cwd, args = record.read_text().splitlines()
    assert cwd == str(ROOT)
    assert result.stdout == f'+ {fake_python} {args}\n'
    assert args.startswith('-m torch.distributed.launch --nproc_per_node=2 --master_port 29703 --use_env main.py')



# The official Swin recipe (swin.md) in main.py flags; {lr} the warm-up and min lr scaled by NPROC * 128 / 512.
SWIN = ('python -m torch.distributed.launch --nproc_per_node={nproc} --master_port {port} --use_env main.py '
        '--auto_reload --model {addon}_swin_small_patch4_window7_224 --batch-size 128 --epochs 300 --warmup-epochs 20 '
        '--sched-on-updates --lr 5e-4 --warmup-lr {warmup_lr} --min-lr {min_lr} --weight-decay 0.05 --clip-grad 5.0 '
        '--drop-path 0.3 --no-model-ema --no-repeated-aug --data-path {data} --data-set IMNET --input-size 224 '
        '--output_dir ./logs/imnet1k_{addon}_swin_small_patch4_window7_224')


@pytest.mark.parametrize('addon,port', [('attnscale', 29706), ('featscale', 29707)])
@pytest.mark.parametrize('nproc,warmup_lr,min_lr', [(None, '1e-06', '1e-05'), ('2', '2.5e-07', '2.5e-06')])
def test_swin_scripts_print_the_official_swin_recipe(addon, port, nproc, warmup_lr, min_lr, paths):
    """8 x 128 images by default; the warm-up and min lr follow the total batch (main.py scales --lr)."""
    data, _ = paths
    result = run_script(f'train_{addon}_swin_small.sh', '--dry-run', str(data), **({'NPROC': nproc} if nproc else {}))
    assert result.returncode == 0, result.stderr
    expected = SWIN.format(nproc=nproc or 8, port=port, addon=addon, warmup_lr=warmup_lr, min_lr=min_lr, data=data)
    assert result.stdout == f'+ {expected}\n'


def test_swin_script_usage_errors(tmp_path):
    result = run_script('train_attnscale_swin_small.sh', '--dry-run', str(tmp_path / 'absent'))
    assert result.returncode == 2 and "data path '" in result.stderr and result.stderr.count('\n') == 1

# ---------------------------------------------------------------- prepare_imagenet.py

WNIDS = ('n01440764', 'n01443537', 'n01484850')
TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 2


def jpeg_bytes(seed):
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), seed % 256, np.uint8)).save(buffer, format='JPEG')
    return buffer.getvalue()


def add_file(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_fake_archives(folder: Path, wnids=WNIDS):
    """The three ILSVRC2012 archives in miniature, with the structure torchvision parses."""
    folder.mkdir(parents=True, exist_ok=True)
    # devkit: meta.mat's `synsets` (leaves have num_children == 0; ids are 1-based) + val labels.
    fields = ('ILSVRC2012_ID', 'WNID', 'words', 'gloss', 'num_children', 'children',
              'wordnet_height', 'num_train_images')
    synsets = [(i + 1, wnid, f'name {i}, alias {i}', 'gloss', 0, np.zeros(0), 0, TRAIN_PER_CLASS)
               for i, wnid in enumerate(wnids)]
    synsets.append((len(wnids) + 1, 'n00000001', 'parent', 'gloss', len(wnids), np.arange(1, len(wnids) + 1), 1, 0))
    mat = io.BytesIO()
    scipy.io.savemat(mat, {'synsets': np.array(synsets, dtype=[(f, 'O') for f in fields])})
    val_labels = [1 + i % len(wnids) for i in range(VAL_PER_CLASS * len(wnids))]
    with tarfile.open(folder / 'ILSVRC2012_devkit_t12.tar.gz', 'w:gz') as tar:
        add_file(tar, 'ILSVRC2012_devkit_t12/data/meta.mat', mat.getvalue())
        add_file(tar, 'ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt',
                 ''.join(f'{label}\n' for label in val_labels).encode())
    # train: one tar per class inside the outer tar.
    with tarfile.open(folder / 'ILSVRC2012_img_train.tar', 'w') as outer:
        for c, wnid in enumerate(wnids):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode='w') as tar:
                for i in range(TRAIN_PER_CLASS):
                    add_file(tar, f'{wnid}_{i}.JPEG', jpeg_bytes(c * 10 + i))
            add_file(outer, f'{wnid}.tar', inner.getvalue())
    # val: flat JPEGs, labelled by the devkit's ground truth in file-name order.
    with tarfile.open(folder / 'ILSVRC2012_img_val.tar', 'w') as tar:
        for i in range(len(val_labels)):
            add_file(tar, f'ILSVRC2012_val_{i + 1:08d}.JPEG', jpeg_bytes(100 + i))
    return val_labels


def prepare(archives, output, *extra, expect_classes=len(WNIDS)):
    return prepare_imagenet.main([
        '--archives', str(archives), '--output', str(output), '--skip-md5',
        '--expect-classes', str(expect_classes), '--expect-train', str(TRAIN_PER_CLASS * len(WNIDS)),
        '--expect-val', str(VAL_PER_CLASS * len(WNIDS)), *extra])


@pytest.fixture
def restore_torchvision(monkeypatch):
    """--skip-md5 rewrites torchvision's archive table; put the original back after the test."""
    monkeypatch.setattr(imagenet, 'ARCHIVE_META', imagenet.ARCHIVE_META)


def test_prepare_imagenet_layout_counts_and_idempotency(tmp_path, restore_torchvision, capsys):
    val_labels = make_fake_archives(tmp_path / 'archives')
    out = tmp_path / 'imagenet'
    assert prepare(tmp_path / 'archives', out) == 0
    for split, per_class in (('train', TRAIN_PER_CLASS), ('val', VAL_PER_CLASS)):
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(WNIDS)
        for wnid in WNIDS:
            assert len(list((out / split / wnid).glob('*.JPEG'))) == per_class
    for i, label in enumerate(val_labels):  # each validation image went to its labelled class
        assert (out / 'val' / WNIDS[label - 1] / f'ILSVRC2012_val_{i + 1:08d}.JPEG').is_file()
    wnid_to_classes, _ = imagenet.load_meta_file(str(out))
    assert wnid_to_classes[WNIDS[1]] == ('name 1', 'alias 1') and len(wnid_to_classes) == len(WNIDS)
    assert sorted(p.name for p in out.iterdir()) == ['meta.bin', 'train', 'val']
    assert 'is complete' in capsys.readouterr().out

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob('*')}
    assert prepare(tmp_path / 'archives', out) == 0
    assert 'already complete' in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob('*')} == stamps
    assert prepare_imagenet.main(['--verify-only', '--output', str(out), '--expect-classes', '3',
                                  '--expect-train', '9', '--expect-val', '6']) == 0


def test_prepare_imagenet_reports_what_is_missing(tmp_path, restore_torchvision, capsys):
    make_fake_archives(tmp_path / 'archives')
    (tmp_path / 'archives' / 'ILSVRC2012_img_train.tar').unlink()
    out = tmp_path / 'imagenet'
    assert prepare(tmp_path / 'archives', out) == 1
    err = capsys.readouterr().err
    assert f'missing archive {tmp_path}/archives/ILSVRC2012_img_train.tar (needed for train/)' in err
    assert 'train/ is missing' in err and 'val/' not in err  # val/ was extracted and verifies
    assert len(list((out / 'val').rglob('*.JPEG'))) == VAL_PER_CLASS * len(WNIDS)

    # A class lost from val/ and a wrong class count: every shortfall is named.
    make_fake_archives(tmp_path / 'archives')
    assert prepare(tmp_path / 'archives', out) == 0
    for image in (out / 'val' / WNIDS[2]).iterdir():
        image.unlink()
    (out / 'val' / WNIDS[2]).rmdir()
    assert prepare_imagenet.main(['--verify-only', '--output', str(out), '--expect-classes', '4',
                                  '--expect-train', '9', '--expect-val', '6']) == 1
    err = capsys.readouterr().err
    assert 'train/: found 3 classes, expected 4' in err
    assert 'val/: found 2 classes, expected 4' in err
    assert 'val/: found 4 images, expected 6 (from ILSVRC2012_img_val.tar)' in err
    assert f'classes only in train/: {WNIDS[2]}' in err


def test_prepare_imagenet_checks_md5_by_default(tmp_path, restore_torchvision, capsys):
    make_fake_archives(tmp_path / 'archives')
    out = tmp_path / 'imagenet'
    assert prepare_imagenet.main(['--archives', str(tmp_path / 'archives'), '--output', str(out)]) == 1
    err = capsys.readouterr().err
    for name in ('ILSVRC2012_devkit_t12.tar.gz', 'ILSVRC2012_img_train.tar'):
        assert f'{tmp_path}/archives/{name} fails its MD5 check' in err
    assert sorted(p.name for p in out.iterdir()) == []  # nothing half-extracted


def test_prepare_imagenet_command_line(tmp_path):
    code, _, err = run_python_script(SCRIPTS / 'prepare_imagenet.py', ['--verify-only', '--output', tmp_path])
    assert code == 1
    assert 'train/ is missing (from ILSVRC2012_img_train.tar)' in err
    assert 'val/ is missing (from ILSVRC2012_img_val.tar)' in err
    with pytest.raises(SystemExit) as usage:
        prepare_imagenet.main(['--output', str(tmp_path)])
    assert usage.value.code == 2


# ---------------------------------------------------------------- export_digits.py

def listing(folder: Path):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*.png'))


def test_export_digits(tmp_path, capsys):
    out = tmp_path / 'digits'
    export_digits.main(['--output', str(out)])
    assert '1437 train and 360 val images' in capsys.readouterr().out
    for split, count in (('train', 1437), ('val', 360)):
        assert sorted(p.name for p in (out / split).iterdir()) == [str(d) for d in range(10)]
        assert len(list((out / split).rglob('*.png'))) == count
    with Image.open(next((out / 'val' / '7').iterdir())) as img:
        assert img.size == (32, 32) and img.mode == 'RGB'
        assert set(np.unique(np.asarray(img))) <= {round(v * 255 / 16) for v in range(17)}

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob('*.png')}
    export_digits.main(['--output', str(out)])
    assert 'nothing rewritten' in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob('*.png')} == stamps

    files = listing(out)
    (out / files[0]).unlink()  # a partial export is written again, with the same split
    export_digits.main(['--output', str(out)])
    assert 'wrote' in capsys.readouterr().out and listing(out) == files

    export_digits.main(['--output', str(tmp_path / 'again'), '--size', '16'])
    assert listing(tmp_path / 'again') == files
    with Image.open(tmp_path / 'again' / files[0]) as img:
        assert img.size == (16, 16)
