"""scripts/demo_report.py: the demo's per-epoch lines while main.py trains, and its val top-1 curves."""
import io
import json
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'scripts'))
import demo_report  # noqa: E402


def entry(epoch, loss, acc1):
    return json.dumps({'train_loss': loss, 'train_lr': 1e-3, 'test_acc1': acc1, 'test_acc5': 100.0, 'epoch': epoch,
                       'n_parameters': 1000}) + '\n'


def training_output(run, new_entries, clock, lines):
    """main.py's stdout as the demo pipes it, yielded lazily: each epoch's lines, 10 s on `clock`, and log.txt
    appended after the epoch's 'Max accuracy' line (as main.py does), so the reporter sees it at the next line.
    Every yielded line is also appended to `lines`."""
    for epoch, loss, acc1 in new_entries:
        for line in (f'Epoch: [{epoch}] [ 0/22]  eta: 0:00:05\n',
                     f'Accuracy of the network on the 360 test images: {acc1:.1f}%\n', 'Max accuracy: 0.00%\n'):
            lines.append(line)
            yield line
        clock[0] += 10.0
        with open(run / 'log.txt', 'a') as f:
            f.write(entry(epoch, loss, acc1))
    lines.append('Training time 0:00:30\n')
    yield lines[-1]


def test_follow_prints_one_line_per_new_epoch_and_keeps_the_full_output(tmp_path, monkeypatch):
    """A run resumed after 2 of 5 epochs: only epochs 3..5 are printed, each once, with its loss and accuracy;
    elapsed and ETA come from this invocation's time per epoch (a fake clock: 10 s per epoch)."""
    run = tmp_path / 'attnscale_tiny_12'
    run.mkdir()
    (run / 'log.txt').write_text(entry(0, 2.3, 10.0) + entry(1, 1.9, 30.0))
    clock, lines = [1000.0], []
    monkeypatch.setattr(demo_report.time, 'time', lambda: clock[0])
    out = io.StringIO()
    stream = training_output(run, [(2, 1.5, 50.0), (3, 1.2, 75.25), (4, 1.0, 90.0)], clock, lines)
    assert demo_report.follow(run, 5, stream, out) == 3
    assert out.getvalue().splitlines() == [
        'attnscale_tiny_12  epoch 3/5  train loss 1.500  val top-1  50.0%  elapsed 0:10  ETA 0:20',
        'attnscale_tiny_12  epoch 4/5  train loss 1.200  val top-1  75.2%  elapsed 0:20  ETA 0:10',
        'attnscale_tiny_12  epoch 5/5  train loss 1.000  val top-1  90.0%  elapsed 0:30  ETA 0:00']
    assert (run / 'train.out').read_text() == ''.join(lines) and len(lines) == 10


def test_follow_of_a_finished_run_prints_nothing(tmp_path):
    run = tmp_path / 'deit_tiny_12'
    run.mkdir()
    (run / 'log.txt').write_text(entry(0, 2.3, 10.0))
    out = io.StringIO()
    assert demo_report.follow(run, 1, iter(['Start training for 1 epochs\n']), out) == 0
    assert out.getvalue() == ''


def test_curves_one_per_model(tmp_path):
    runs = []
    for name, accs in (('deit_tiny_12', [20.0, 60.0, 80.0]), ('attnscale_tiny_12', [25.0, 65.0, 85.5])):
        run = tmp_path / name
        run.mkdir()
        (run / 'log.txt').write_text(''.join(entry(i, 1.0, a) for i, a in enumerate(accs)))
        runs.append(run)
    assert demo_report.curve_data(runs) == {'deit_tiny_12': ([1, 2, 3], [20.0, 60.0, 80.0]),
                                            'attnscale_tiny_12': ([1, 2, 3], [25.0, 65.0, 85.5])}
    path = demo_report.curves(runs, tmp_path / 'demo' / 'curves.png')
    assert path == tmp_path / 'demo' / 'curves.png'
    with Image.open(path) as img:
        assert img.format == 'PNG' and img.size == (720, 480)
