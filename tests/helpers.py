"""Small generated datasets for the tests (learnable, tiny, written as real image files), free ports, and scripts
run in this process."""
import argparse
import contextlib
import fcntl
import io
import os
import random
import runpy
import signal
import socket
import sys
import tempfile
import warnings
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


# Below Linux's ephemeral range (32768-60999), so the kernel never hands one of these to a bind(0) or an outgoing
# connection (gloo's, another run's) between the choice and the launcher's bind; below 29500, torch's default
# master port and the fixed ports of the scripts.
PORT_RANGE = (20000, 29500)
_reserved = []  # lock files of the ports this test process holds, until it exits


def free_port() -> int:
    """A port for --master_port / MASTER_PORT that no other user of this function on the machine gets: each port is
    reserved by an exclusive lock on a file in the temp folder, held until this process exits (so also never
    handed out twice in one pytest run), and checked to be free of listeners when chosen."""
    folder = Path(tempfile.gettempdir()) / 'antioversmooth-test-ports'
    folder.mkdir(exist_ok=True)
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randrange(*PORT_RANGE)
        lock = open(folder / str(port), 'w')
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with socket.socket() as probe:
                probe.bind(('', port))
        except OSError:  # reserved by another test process, or in use
            lock.close()
            continue
        _reserved.append(lock)
        return port
    raise RuntimeError(f'no free port in {PORT_RANGE}')




def run_script(script, argv, env=None):
    """`python <script> <argv>` in this process, run as `__main__` (runpy): (exit status, stdout, stderr).

    As a new interpreter would end: `sys.exit('message')` prints the message on stderr and exits 1, and warnings
    are written to stderr under a fresh interpreter's filters. The variables of `env` are set meanwhile; sys.argv,
    sys.path, signal handlers and torch's thread count are restored afterwards. An exception other than SystemExit
    propagates (and fails the test): that is the traceback a user would see. It saves the seconds a new
    interpreter spends importing torch and timm; tests run one torch thread, as the processes they start do
    (OMP_NUM_THREADS=1), so the numbers are the same."""
    return _in_process(lambda: runpy.run_path(str(script), run_name='__main__'), [str(script), *map(str, argv)], env)


def _in_process(call, argv, env):
    import torch
    out, err = io.StringIO(), io.StringIO()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    threads, saved_argv, saved_path = torch.get_num_threads(), sys.argv, list(sys.path)
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    sys.argv = argv
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            fresh_interpreter_warnings(err)
            call()
    except SystemExit as e:
        if isinstance(e.code, str):
            err.write(e.code + '\n')
            code = 1
        else:
            code = e.code or 0
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return code, out.getvalue(), err.getvalue()


def fresh_interpreter_warnings(stream):
    """Inside `warnings.catch_warnings()`: the filters of a fresh interpreter (no -W, no PYTHONWARNINGS), and each
    warning written to `stream` when it is issued, instead of to pytest's record."""
    warnings.resetwarnings()
    for category in (ResourceWarning, ImportWarning, PendingDeprecationWarning, DeprecationWarning):
        warnings.simplefilter('ignore', category)  # each goes in front: DeprecationWarning's comes first
    warnings.filterwarnings('default', category=DeprecationWarning, module='__main__')
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: stream.write(
        warnings.formatwarning(message, category, filename, lineno, line))


def run_main(argv, env=None):
    """main.py's main() in this process, as run_script runs a script: (exit status, stdout, stderr)."""
    import main as trainer
    parser = argparse.ArgumentParser(parents=[trainer.get_args_parser()])
    argv = [str(a) for a in argv]
    main = getattr(trainer.main, '__wrapped__', trainer.main)  # @record's fault handler needs a real stderr
    return _in_process(lambda: main(parser.parse_args(argv)), ['main.py', *argv], env)


def assert_same_outputs_and_grads(fused, explicit, x):
    """Both copies of a model (fused and explicit attention) give the same training-mode outputs and parameter
    gradients (1e-5) on `x`."""
    import torch
    outs = []
    for model in (fused, explicit):
        model.train()  # attention dropout is 0, so the fused path is taken in training too
        out = model(x)
        out.square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for (n, p), q in zip(fused.named_parameters(), explicit.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=n)
