"""Export the model of a checkpoint (or its EMA) in timm's Hugging Face Hub format: `model.safetensors` plus
`config.json` (architecture, num_classes, the model_args that rebuild it, pretrained_cfg), via timm's `save_for_hf`.

    python scripts/export_weights.py --checkpoint logs/run/checkpoint.pth --output exported/run [--ema]

The model name, add-on, input size and --model-kwargs come from the checkpoint's training arguments (the options
below override them; a released checkpoint needs --model) and the class count from its head. The weights are
loaded strictly first, so a checkpoint that does not fit the model fails with its key report and nothing is
written; --output must be a new or empty folder, so an earlier export is never overwritten. A model trained with
--addon is exported under its base name with `"addon"` in config.json; the checkpoint's class names, when it has
them, become `label_names`. Reload, after `import models` (which registers the architectures with timm):

    timm.create_model('local-dir:exported/run', pretrained=True)          # without an add-on
    timm.create_model(<name>, pretrained=True, pretrained_cfg_overlay=dict(file='exported/run/model.safetensors'),
                      <the model_args of config.json>)
    models.create_model(<name>, addon=<addon>, <model_args>) + load_state_dict(<model.safetensors>)   # with one

Exit status: 0 written, 2 bad input (one line on stderr).
"""
import argparse
import sys
from pathlib import Path

from timm.models import save_for_hf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import models  # noqa: E402  (registers our architectures)
from models.checkpoint import CheckpointError, load_checkpoint, load_state_dict, model_state  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser('export_weights.py', description='Export weights as model.safetensors + config.json')
    p.add_argument('--checkpoint', required=True, help='a training, released or fine-tuned checkpoint (.pth)')
    p.add_argument('--output', required=True, help='folder to write model.safetensors and config.json into')
    p.add_argument('--ema', action='store_true', help="export the checkpoint's EMA weights (model_ema)")
    p.add_argument('--model', default=None, help="model name (default: the checkpoint's --model)")
    p.add_argument('--addon', default=None, choices=models.ADDONS, help="add-on (default: the checkpoint's --addon)")
    p.add_argument('--input-size', type=int, default=None, help="image size (default: the checkpoint's, else 224)")
    p.add_argument('--model-kwargs', nargs='*', default=None, metavar='KEY=VALUE',
                   help="extra create_model arguments (default: the checkpoint's)")
    p.add_argument('--unsafe-load', action='store_true', help='allow checkpoints with arbitrary pickled objects')
    return p


def exported_weights(ckpt: dict, ema: bool, path: str) -> dict:
    """The model weights of `ckpt`, or its EMA weights with `ema`."""
    if not ema:
        return model_state(ckpt)
    if not ckpt.get('model_ema'):
        raise CheckpointError(f'{path} holds no EMA weights (model_ema); drop --ema to export its model weights')
    return model_state({'model': ckpt['model_ema']})


def build_model(args, ckpt: dict, state: dict):
    """The model the checkpoint was trained as (with its add-on), with the class count of its head."""
    train_args = ckpt.get('args') or {}
    name = args.model or train_args.get('model')
    if not name:
        raise CheckpointError(f'{args.checkpoint} stores no model name; pass --model')
    kwargs = models.parse_model_kwargs(train_args.get('model_kwargs') if args.model_kwargs is None
                                       else args.model_kwargs)
    kwargs.setdefault('img_size', args.input_size or train_args.get('input_size') or 224)
    if 'head.weight' in state:
        kwargs['num_classes'] = state['head.weight'].shape[0]
    return models.create_model(name, addon=addon_of(args, train_args), **kwargs)


def addon_of(args, train_args: dict):
    return args.addon or train_args.get('addon')


def check_output(out: Path):
    """--output is a new or empty folder: an earlier export is never overwritten."""
    if out.exists() and not out.is_dir():
        raise cli.ScriptError(f'--output {out} is a file; fix: pass a folder (new or empty)')
    if out.is_dir() and any(out.iterdir()):
        listing = ', '.join(sorted(p.name for p in out.iterdir())[:4])
        raise cli.ScriptError(f'--output {out} is not empty ({listing}); fix: pass a new folder, or delete this one '
                              'first')


@cli.one_line_errors('export_weights.py')
def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    out = Path(args.output)
    check_output(out)
    ckpt = load_checkpoint(args.checkpoint, allow_unsafe=args.unsafe_load)
    state = exported_weights(ckpt, args.ema, args.checkpoint)
    model = build_model(args, ckpt, state)
    load_state_dict(model, state, source=args.checkpoint)
    addon = addon_of(args, ckpt.get('args') or {})
    config = dict({'addon': addon} if addon else {}, **({'label_names': list(ckpt['classes'])}
                                                         if ckpt.get('classes') else {}))
    try:
        save_for_hf(model, out, model_config=config, safe_serialization=True)
    except OSError as e:
        raise cli.ScriptError(f'cannot write to --output {out} ({e.strerror or e}); pick another folder') from None
    print(f'wrote {out / "model.safetensors"} ({"EMA" if args.ema else "model"} weights, {len(state)} tensors) and '
          f'{out / "config.json"} ({model.pretrained_cfg["architecture"]}{f" with {addon}" if addon else ""}, '
          f'{model.num_classes} classes)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
