"""Oversmoothing diagnostics of one or more models on a few validation images: a JSON file and plots.

    python analyze.py --model deit_small_24 attnscale_small_24 --resume a.pth b.pth \\
        --data-path /data/imagenet --output_dir output/diagnostics

Every model sees the same images (a seeded random subset of `<data-path>/val`, eval transform).
Writes `diagnostics.json` (every number: per model, per metric, per layer) and one PNG per metric,
one curve per model; see `diagnostics.py` for the metrics and the layer numbering.
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

import cli  # noqa: E402
import diagnostics  # noqa: E402
import models  # noqa: E402
from datasets import build_transform  # noqa: E402
from models.checkpoint import load_checkpoint, model_state  # noqa: E402

NO_CHECKPOINT = ('', 'none')  # a --resume entry that keeps a model at its random init


class AnalyzeError(cli.ScriptError):
    """A bad command line or input, reported as one line with exit code 2."""


def get_args_parser() -> argparse.ArgumentParser:
    """The command line; flag names and defaults follow main.py where both have them."""
    parser = argparse.ArgumentParser('Oversmoothing diagnostics (AttnScale / FeatScale)', add_help=True)
    parser.add_argument('--model', nargs='+', default=[], metavar='NAME',
                        help='models to analyse (default: the model stored in each --resume checkpoint)')
    parser.add_argument('--resume', nargs='+', default=[], metavar='CKPT',
                        help="checkpoints, matched to --model by position; 'none' (or fewer paths than models) "
                             'keeps a model at its random init')
    parser.add_argument('--data-path', required=True, help='dataset root holding val/<class>/<images>')
    parser.add_argument('--input-size', type=int, default=None,
                        help="image size (default: the checkpoint's training size, else 224)")
    parser.add_argument('--eval-crop-ratio', type=float, default=0.875, help='centre-crop ratio of the eval transform')
    parser.add_argument('--addon', default=None, choices=models.ADDONS,
                        help="install this add-on into every --model, as main.py --addon (default: the checkpoint's)")
    parser.add_argument('--model-kwargs', nargs='*', default=None, metavar='KEY=VALUE',
                        help="extra create_model arguments for every model (default: the checkpoint's)")
    parser.add_argument('--num-images', type=int, default=64, help='validation images to average over')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--output_dir', default='output/diagnostics', help='where the JSON and the plots go')
    parser.add_argument('--labels', nargs='+', default=None, help='legend names, one per model (default: model names)')
    parser.add_argument('--seed', type=int, default=0, help='seeds the image subset and every random init')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--unsafe-load', action='store_true',
                        help='allow checkpoints that need full unpickling (only for files you trust)')
    return parser


def check_data_path(data_path: str) -> Path:
    """The validation folder `<data_path>/val`, or an AnalyzeError saying what is missing."""
    root = Path(data_path)
    if not root.is_dir():
        raise AnalyzeError(f'--data-path {data_path} does not exist')
    if not (root / 'val').is_dir():
        raise AnalyzeError(f'--data-path {data_path} has no val/ folder (expected val/<class>/<images>)')
    return root / 'val'


def pair_runs(names: list, checkpoints: list) -> list:
    """(model name or None, checkpoint path or None) per model, matched by position."""
    if not names and not checkpoints:
        raise AnalyzeError('give --model, --resume, or both')
    if names and len(checkpoints) > len(names):
        raise AnalyzeError(f'{len(checkpoints)} --resume paths for {len(names)} --model names; '
                           "match them by position ('none' for a model without a checkpoint)")
    count = max(len(names), len(checkpoints))
    names = names + [None] * (count - len(names))
    checkpoints = [None if c.lower() in NO_CHECKPOINT else c for c in checkpoints] + [None] * (count - len(checkpoints))
    return list(zip(names, checkpoints))


def build_run(name, checkpoint, args) -> dict:
    """Create one model (weights loaded, or seeded random init) and the settings it is analysed with.

    Settings missing from the command line come from the checkpoint's training `args`.
    """
    state, train_args = {}, {}
    if checkpoint:
        ckpt = load_checkpoint(checkpoint, allow_unsafe=args.unsafe_load)
        state, train_args = model_state(ckpt), ckpt.get('args') or {}
    name = name or train_args.get('model')
    if not name:
        raise AnalyzeError(f'checkpoint {checkpoint} stores no model name: give --model')
    input_size = args.input_size or train_args.get('input_size') or 224
    try:
        model_kwargs = models.parse_model_kwargs(
            args.model_kwargs if args.model_kwargs is not None else train_args.get('model_kwargs'))
        kwargs = {'img_size': input_size, **model_kwargs}
        head = state.get('head.weight', state.get('head.fc.weight'))
        if head is not None:
            kwargs['num_classes'] = head.shape[0]
        torch.manual_seed(args.seed)
        model = models.create_model(name, addon=args.addon or train_args.get('addon'), **kwargs)
    except (ValueError, TypeError) as e:
        raise AnalyzeError(f'cannot build {name}: {e}') from None
    if checkpoint:
        models.load_state_dict(model, state, source=checkpoint)
    return dict(model=model, name=name, checkpoint=checkpoint, input_size=input_size, model_kwargs=model_kwargs)


def default_labels(runs: list) -> list:
    """Model names; a repeated name gets its checkpoint file (or 'random init'), then its position
    if that still repeats."""
    names = [run['name'] for run in runs]
    labels = [n if names.count(n) == 1 else f"{n} ({Path(r['checkpoint']).stem if r['checkpoint'] else 'random init'})"
              for n, r in zip(names, runs)]
    return [label if labels.count(label) == 1 else f'{label} #{i}' for i, label in enumerate(labels, start=1)]


def image_loader(val_dir: Path, input_size: int, args) -> DataLoader:
    """The same seeded subset of `--num-images` validation images for every model, eval transform."""
    transform = build_transform(False, argparse.Namespace(**{**vars(args), 'input_size': input_size}))
    try:
        dataset = ImageFolder(str(val_dir), transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise AnalyzeError(f'{val_dir}: {e}') from None
    generator = torch.Generator().manual_seed(args.seed)
    indices = torch.randperm(len(dataset), generator=generator)[:args.num_images].sort().values.tolist()
    return DataLoader(Subset(dataset, indices), batch_size=args.batch_size, shuffle=False)


def describe(run: dict, label: str, measured: dict) -> dict:
    """The JSON entry of one model: what it is, and every number measured on it."""
    model = run['model']
    return dict(
        label=label, model=run['name'], checkpoint=run['checkpoint'], random_init=run['checkpoint'] is None,
        input_size=run['input_size'], model_kwargs=run['model_kwargs'], num_classes=model.num_classes,
        num_params=sum(p.numel() for p in model.parameters()), depth=len(diagnostics.analysed_blocks(model)),
        num_heads=diagnostics.analysed_blocks(model)[0].attn.num_heads, **measured, addon_params=diagnostics.addon_parameters(model),
    )


def plot_layers(ax, results: list, key: str, **style) -> None:
    """One curve per model of the per-layer metric `key` against the layer number (models without it: none)."""
    for i, entry in enumerate(results):
        if key not in entry['metrics']:
            continue
        metric = entry['metrics'][key]
        ax.plot(metric['layers'], metric['values'], color=f'C{i}', marker='o', markersize=3,
                label=entry['label'], **style)
    ax.set_xlabel('layer')
    ax.grid(alpha=0.3)


def plot_last_layer(ax, results: list, key: str) -> None:
    """One curve per model of the last layer's spectrum `key` against frequency (cycles per token)."""
    for i, entry in enumerate(results):
        if key not in entry['metrics']:
            continue
        metric = entry['metrics'][key]
        ax.plot(entry['frequencies'], metric['values'][-1], color=f'C{i}',
                label=f"{entry['label']} (layer {metric['layers'][-1]})")
    ax.set_xlabel('frequency (cycles per token, DC at 0)')
    ax.grid(alpha=0.3)


def plot_lambdas(axes, results: list) -> None:
    """AttnScale lambda per layer (mean over heads, min-max band) and FeatScale lambda1/lambda2 means."""
    attn_ax, feat_ax = axes
    for i, entry in enumerate(results):
        params = entry['addon_params']
        if params['attnscale_lambda']:
            layers = params['attnscale_lambda']['layers']
            values = [torch.tensor(v) for v in params['attnscale_lambda']['values']]  # Swin: heads per stage differ
            attn_ax.plot(layers, [v.mean() for v in values], color=f'C{i}', marker='o', markersize=3,
                         label=entry['label'])
            attn_ax.fill_between(layers, [v.min() for v in values], [v.max() for v in values], color=f'C{i}', alpha=0.2)
        for key, style in (('featscale_lambda1', '-'), ('featscale_lambda2', '--')):
            if params[key]:
                feat_ax.plot(params[key]['layers'], params[key]['mean'], style, color=f'C{i}', marker='o',
                             markersize=3, label=f"{entry['label']} {key.split('_')[1]}")
    attn_ax.set_title('AttnScale lambda: mean over heads, band min-max', fontsize=10)
    feat_ax.set_title('FeatScale channel mean: lambda1 (solid), lambda2 (dashed)', fontsize=10)
    for ax in axes:
        ax.set_xlabel('layer')
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)


def save_figure(fig, path: Path) -> Path:
    """Write `fig` to `path` as a PNG and free it; returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(results: list, out: Path) -> list:
    """One PNG per metric that some model has (Swin has no attention-map metrics or token spectrum); the
    lambda plot only when some model has AttnScale or FeatScale."""
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    plot_layers(axes[0], results, 'hf_dc_features')
    plot_layers(axes[1], results, 'hf_dc_branch')
    axes[0].set(title='tokens X_l (0: embedding)', ylabel='||HF|| / ||DC||', yscale='log')
    axes[1].set(title='attention branch Y_l', ylabel='||HF|| / ||DC||', yscale='log')
    axes[0].legend(fontsize=7)
    written.append(save_figure(fig, out / 'hf_ratio.png'))

    for key, ylabel, title, name in (
            ('patch_cosine', 'mean pairwise cosine similarity', 'Patch uniformity', 'patch_cosine.png'),
            ('attention_cosine', 'cosine(A_l, A_{l-1})', 'Attention collapse', 'attention_cosine.png')):
        if not any(key in entry['metrics'] for entry in results):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        plot_layers(ax, results, key)
        ax.set(title=title, ylabel=ylabel)
        ax.legend(fontsize=7)
        written.append(save_figure(fig, out / name))

    for key, ylabel, title, name in (
            ('feature_spectrum_db', 'amplitude (dB relative to DC)', 'Token spectrum of the last layer X_L',
             'feature_spectrum.png'),
            ('attention_spectral_response', 'row 2-norm of F A F^T', 'Spectral response of the last attention map',
             'attention_spectrum.png')):
        if not any(key in entry['metrics'] for entry in results):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        plot_last_layer(ax, results, key)
        ax.set(title=title, ylabel=ylabel)
        ax.legend(fontsize=7)
        written.append(save_figure(fig, out / name))

    if any(v for entry in results for v in entry['addon_params'].values()):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        plot_lambdas(axes, results)
        written.append(save_figure(fig, out / 'lambda.png'))
    return written


def print_table(results: list) -> None:
    """Final-layer HF/DC ratio and patch cosine similarity, and the last attention cosine, per model."""
    width = max(len('model'), *(len(e['label']) for e in results))
    print(f"{'model':<{width}}  {'HF/DC (X_L)':>11}  {'patch cos (X_L)':>15}  {'attn cos (A_L, A_L-1)':>21}")
    for e in results:
        m = e['metrics']
        attn = f"{m['attention_cosine']['values'][-1]:>21.4f}" if 'attention_cosine' in m else f"{'n/a':>21}"
        print(f"{e['label']:<{width}}  {m['hf_dc_features']['values'][-1]:>11.4f}  "
              f"{m['patch_cosine']['values'][-1]:>15.4f}  {attn}")


def analyze(args) -> None:
    """Build every model first (so a bad name or checkpoint fails before any work), measure each on
    the same images, then write the JSON and the plots and print the summary table."""
    if args.num_images < 1 or args.batch_size < 1:
        raise AnalyzeError('--num-images and --batch-size must be at least 1')
    val_dir = check_data_path(args.data_path)
    runs = [build_run(name, checkpoint, args) for name, checkpoint in pair_runs(args.model, args.resume)]
    labels = args.labels or default_labels(runs)
    if len(labels) != len(runs):
        raise AnalyzeError(f'{len(labels)} --labels for {len(runs)} models')
    device = torch.device(args.device)
    loaders, results = {}, []
    for run, label in zip(runs, labels):
        if run['checkpoint'] is None:
            print(f'{label}: no checkpoint, analysing the random initialisation (seed {args.seed})')
        size = run['input_size']
        loaders[size] = loaders.get(size) or image_loader(val_dir, size, args)
        measured = diagnostics.measure(run['model'].to(device), loaders[size], device)
        results.append(describe(run, label, measured))
        run['model'].cpu()

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(data_path=args.data_path, split='val', num_images=results[0]['num_images'], seed=args.seed,
                  eval_crop_ratio=args.eval_crop_ratio,
                  notes=dict(layers='X_0 is the embedding output; block l = 1..L gives X_l, Y_l, A_l; '
                                    'attention_cosine at l compares A_l with A_{l-1}',
                             feature_spectrum_db='20 log10(|DFT over tokens| / |DFT at DC|), channel mean, '
                                                 'per image then averaged; DC-centred, x axis: frequencies',
                             attention_spectral_response='2-norm of each row of F A F^T (unitary DFT), '
                                                         'mean over heads and images; DC-centred'),
                  models=results)
    json_path = out / 'diagnostics.json'
    json_path.write_text(json.dumps(report, indent=1))
    for path in [json_path] + write_plots(results, out):
        print(f'wrote {path}')
    print_table(results)


@cli.one_line_errors('analyze.py')
def main(argv=None) -> int:
    analyze(get_args_parser().parse_args(argv))
    return 0


if __name__ == '__main__':
    sys.exit(main())
