"""The demo's reporting: one line per trained epoch while main.py runs, and the val top-1 curves at the end.

    main.py ... | python scripts/demo_report.py follow --run logs/demo/deit_tiny_12 --epochs 50
    python scripts/demo_report.py curves --output logs/demo/curves.png logs/demo/deit_tiny_12 logs/demo/...

`follow` copies main.py's output (read from stdin) to `<run>/train.out` and, whenever main.py has appended an
epoch to `<run>/log.txt` (one JSON object per epoch), prints
`<model>  epoch  k/N  train loss L  val top-1 A%  elapsed m:ss  ETA m:ss`, the model being the run folder's name.
Epochs already in log.txt when it starts (a resumed run) are not printed again; the ETA extrapolates the time per
epoch of this invocation. `curves` plots each run's val top-1 per epoch (one curve per run) and prints the path.
"""
import argparse
import json
import sys
import time
from pathlib import Path


def read_log(run: Path) -> list:
    """The epoch entries of `<run>/log.txt`, [] if there is none yet (complete lines only)."""
    try:
        text = (run / 'log.txt').read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith('\n') and line.strip()]


def clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f'{minutes}:{seconds:02d}'


def progress_line(model: str, entry: dict, epochs: int, elapsed: float, done: int) -> str:
    """The line for one finished epoch; `done` epochs took `elapsed` seconds in this invocation."""
    eta = elapsed / done * (epochs - entry['epoch'] - 1)
    return (f'{model}  epoch {entry["epoch"] + 1:>{len(str(epochs))}}/{epochs}  train loss {entry["train_loss"]:.3f}  '
            f'val top-1 {entry["test_acc1"]:5.1f}%  elapsed {clock(elapsed)}  ETA {clock(eta)}')


def follow(run: Path, epochs: int, stream, out=sys.stdout) -> int:
    """Copy `stream` to `<run>/train.out`, printing a progress line for each epoch logged meanwhile; returns the
    number of epochs printed."""
    start, printed = time.time(), 0
    last = max((e['epoch'] for e in read_log(run)), default=-1)

    def report():
        nonlocal last, printed
        for entry in read_log(run):
            if entry['epoch'] > last:
                last, printed = entry['epoch'], printed + 1
                print(progress_line(run.name, entry, epochs, time.time() - start, printed), file=out, flush=True)

    with open(run / 'train.out', 'w') as copy:
        for line in stream:
            copy.write(line)
            copy.flush()
            report()
    report()
    return printed


def curve_data(runs: list) -> dict:
    """{run folder name: ([epoch 1, 2, ...], [val top-1 after each])} from each run's log.txt."""
    return {run.name: ([e['epoch'] + 1 for e in read_log(run)], [e['test_acc1'] for e in read_log(run)])
            for run in runs}


def curves(runs: list, output: Path) -> Path:
    """Val top-1 per epoch of each run in `runs` (one curve each, labelled with the folder name), saved as PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, (epochs, acc1) in curve_data(runs).items():
        ax.plot(epochs, acc1, marker='.', label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel('epoch')
    ax.set_ylabel('val top-1 (%)')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('follow', help="copy main.py's output to <run>/train.out; one line per logged epoch")
    p.add_argument('--run', type=Path, required=True, help='the --output_dir of the training run')
    p.add_argument('--epochs', type=int, required=True, help='the --epochs of the training run')
    p = sub.add_parser('curves', help='plot val top-1 per epoch of each run')
    p.add_argument('--output', type=Path, required=True)
    p.add_argument('runs', type=Path, nargs='+')
    args = parser.parse_args(argv)
    if args.command == 'follow':
        follow(args.run, args.epochs, sys.stdin)
    else:
        print(f'curves: {curves(args.runs, args.output)}')


if __name__ == '__main__':
    main()
