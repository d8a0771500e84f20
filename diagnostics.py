"""Oversmoothing diagnostics: how fast the tokens of a ViT lose their high frequencies with depth.

Wang et al., "Anti-Oversmoothing in Deep Vision Transformers via the Fourier Domain Analysis:
From Theory to Practice", ICLR 2022. Self-attention is a low-pass filter; stacked, it drives the
tokens towards their DC component (the token mean). The metrics below measure that per layer:

- high-frequency energy of the tokens X_l and of the attention-branch outputs Y_l
  (`hf_ratio`), and the 1-D spectrum of X_l along the token axis (`token_spectrum`);
- patch uniformity: mean pairwise cosine similarity of the patch tokens (`patch_cosine_similarity`);
- attention collapse: cosine similarity of consecutive layers' attention maps (`attention_cosine`);
- the spectral response of each attention map, S = F A F^T (`attention_spectral_response`);
- the learned AttnScale / FeatScale gains (`addon_parameters`).

The metric functions are pure tensor functions. `probe` runs a model once with forward hooks and
returns the tensors they need; `measure` averages every metric over the images of a loader.

Layer numbering, used everywhere here: block l = 1..L produces X_l from X_{l-1}; X_0 is the
embedding output (the input of the first block); Y_l and A_l are block l's attention-branch output
and attention map. Only the self-attention stage `model.blocks` is probed (for CaiT, the patch-token
stage; its class-attention blocks are not part of the analysis).

Swin: the blocks of all stages, in order; X_l is block l's (B, H, W, C) map read as H*W tokens (N and C
change at each stage's patch merging). What needs the same N in every layer or the image-wide N x N map
is left out: the per-window attention maps (49 x 49 over a 7 x 7 window, whose tokens are another set of
patches in every window and, with the shift, every other block) are not the token mixing the spectral
metrics describe, and the window attention's output is per window too. So for Swin: the HF ratio and
patch cosine of X_l, and the learned gains. The other hierarchical families that take the add-ons (Swin V2,
MaxViT, CoAtNet, VOLO, PVT-v2, Twins, MViTv2, LeViT, PiT, CrossViT, MobileViT) are analysed as Swin is: the
blocks that carry the add-ons, in order, each one's output read as tokens.
"""
from collections import defaultdict

import torch
import torch.nn.functional as F
from timm.models.cait import Cait

from models import attnscale, dc_hf_split, set_fused_attn
from models.plugin import self_attention_blocks
from models.token_attention import NOT_TOKEN_ATTENTION

# first layer index of each per-layer metric of `batch_metrics` (see the numbering above)
FIRST_LAYER = {
    'hf_dc_features': 0, 'hf_total_features': 0, 'patch_cosine': 0, 'feature_spectrum_db': 0,
    'hf_dc_branch': 1, 'hf_total_branch': 1, 'attention_spectral_response': 1,
    'attention_cosine': 2,
}


def hf_ratio(x: torch.Tensor, relative_to: str = 'dc') -> torch.Tensor:
    """High-frequency energy of tokens x (..., N, C), one value per leading index (e.g. per image).

    With DC[x] the token mean broadcast to all N tokens and HF[x] = x - DC[x] (the split the
    add-ons use), returns ||HF|| / ||DC|| (`relative_to='dc'`, the paper's ratio) or ||HF|| / ||x||
    (`'total'`, in [0, 1]); Frobenius norms over tokens and channels. DC and HF are orthogonal, so
    ||x||^2 = ||DC||^2 + ||HF||^2. All tokens count, the class token included.
    """
    dc, hf = dc_hf_split(x.float())
    hf_norm = hf.flatten(-2).norm(dim=-1)
    if relative_to == 'dc':
        return hf_norm / (dc.flatten(-2).norm(dim=-1) * x.shape[-2] ** 0.5)
    if relative_to == 'total':
        return hf_norm / x.float().flatten(-2).norm(dim=-1)
    raise ValueError(f"relative_to must be 'dc' or 'total', got {relative_to!r}")


def token_frequencies(num_tokens: int) -> torch.Tensor:
    """The DFT frequencies (cycles per token, in [-0.5, 0.5)) over `num_tokens`, DC in the centre:
    the x axis of `token_spectrum` and `attention_spectral_response`."""
    return torch.fft.fftshift(torch.fft.fftfreq(num_tokens, dtype=torch.float64))


def token_spectrum(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Spectrum of tokens x (..., N, C) along the token axis, in dB relative to DC, DC in the centre.

    The DFT over the N tokens (in sequence order) of each channel, its magnitude averaged over the
    channels, then 20 log10(amplitude / amplitude at DC): 0 dB at DC, negative where a frequency
    carries less than the mean token. Returns (..., N), ordered as `token_frequencies(N)`.
    """
    amp = torch.fft.fft(x.float(), dim=-2).abs().mean(dim=-1)
    db = 20. * torch.log10(amp.clamp_min(eps) / amp[..., :1].clamp_min(eps))
    return torch.fft.fftshift(db, dim=-1)


def patch_cosine_similarity(x: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Mean cosine similarity over all pairs of distinct patch tokens of x (..., N, C).

    The first `num_prefix` tokens (class/register tokens) are left out. 1 when all patch tokens
    point the same way (patch uniformity). Uses sum_{i != j} u_i.u_j = ||sum_i u_i||^2 - sum_i ||u_i||^2
    for the unit tokens u_i, so no N x N matrix is built.
    """
    u = F.normalize(x[..., num_prefix:, :].double(), dim=-1)
    n = u.shape[-2]
    pairs = u.sum(dim=-2).square().sum(dim=-1) - u.square().sum(dim=(-2, -1))
    return (pairs / (n * (n - 1))).float()


def attention_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of attention maps a and b (..., H, N, N), each head's map flattened, then
    averaged over the H heads. 1 for identical maps; close to 1 between consecutive layers means
    attention collapse (deeper layers repeat the same map)."""
    return F.cosine_similarity(a.float().flatten(-2), b.float().flatten(-2), dim=-1).mean(dim=-1)


def attention_spectral_response(attn: torch.Tensor) -> torch.Tensor:
    """The 2-norm of each row of S = F A F^T for attention maps A = attn (..., N, N), DC in the centre.

    F is the unitary DFT over the N tokens, F[j, k] = exp(-2 pi i jk / N) / sqrt(N) (symmetric, so
    F A F^T = F A F is `fft2(A, norm='ortho')`). Row j says how strongly frequency j passes the
    map. Uniform attention (all 1/N) keeps only DC; the identity passes all frequencies equally
    (all rows have norm 1); AttnScale with gain lambda multiplies every non-DC row by (1 + lambda).
    Returns (..., N), ordered as `token_frequencies(N)`.
    """
    s = torch.fft.fft2(attn.float(), norm='ortho')
    return torch.fft.fftshift(torch.linalg.vector_norm(s, dim=-1), dim=-1)


def stage_prefix_tokens(model: torch.nn.Module) -> int:
    """How many prefix (class) tokens come before the patch tokens in what the analysed blocks see:
    none for CaiT (its self-attention stage holds patch tokens only; the class token joins in
    `blocks_token_only`) and the hierarchical families (Swin, ...), `model.num_prefix_tokens` for a ViT/DeiT."""
    if isinstance(model, Cait) or not image_wide(model):
        return 0
    return getattr(model, 'num_prefix_tokens', 0)


def analysed_blocks(model: torch.nn.Module) -> list:
    """The blocks l = 1..L the diagnostics follow: those that carry (or would carry) the add-ons, every stage's in
    order (`model.blocks` for a ViT, CaiT's self-attention stage, every Swin stage's blocks), or `model.blocks` of
    a model no adapter knows."""
    try:
        return self_attention_blocks(model)
    except ValueError:
        return list(model.blocks)


def image_wide(model: torch.nn.Module) -> bool:
    """Whether the analysed blocks are `model.blocks`, one stage whose attention maps span every token of the
    image (ViT, DeiT, CaiT, EVA, BEiT, ...): then branch outputs, maps and spectra are compared across layers.
    Otherwise (Swin, MaxViT, PVT-v2, ...: windows, pooled keys, stages of other sizes; XCiT: no token map at all)
    only the tokens are."""
    blocks = getattr(model, 'blocks', None)
    if not isinstance(blocks, torch.nn.Module) or [id(b) for b in blocks] != [id(b) for b in analysed_blocks(model)]:
        return False
    return not any(isinstance(getattr(b, 'attn', None), tuple(NOT_TOKEN_ATTENTION)) for b in blocks)


def _as_tokens(x, channels_first: bool = False) -> torch.Tensor:
    """A block's output as tokens (B, N, C): a map (B, H, W, C), or (B, C, H, W) if `channels_first`, gives its
    H*W tokens; MViTv2's (tokens, size) its tokens."""
    if isinstance(x, tuple):
        x = x[0]
    if x.dim() == 4:
        return x.flatten(2).transpose(1, 2) if channels_first else x.flatten(1, 2)
    return x


def probe(model: torch.nn.Module, images: torch.Tensor) -> dict:
    """Run `model` on `images` once (no grad) and collect, with forward hooks on `model.blocks`:

    - 'tokens': [X_0, ..., X_L], each (B, N, C): X_0 is the input of the first block (a forward
      pre-hook), X_l the output of block l;
    - 'branch': [Y_1, ..., Y_L], each (B, N, C): the output of `blocks[l-1].attn` (for FeatScale
      models this is before FeatScale re-weights it; its effect shows in X_l);
    - 'attn': [A_1, ..., A_L], each (B, H, N, N): the attention maps after AttnScale (each attention module's
      `attn_probe` sees the map A, to which its lamb is applied here);
    - 'logits': the model output.

    The fused attention kernels never form the maps, so `fused_attn` is switched off on every module
    that has it for this call and restored afterwards; the hooks are removed as well. Put the model
    in eval mode first (dropout and stochastic depth would change what is measured). For Swin and the other
    hierarchical families (not `image_wide`) only 'tokens' (each block's map as H*W tokens) and 'logits' are
    collected (see the module docstring).
    """
    blocks, swin = analysed_blocks(model), not image_wide(model)
    if not swin and not all(hasattr(blk.attn, 'attn_probe') for blk in blocks):
        raise ValueError(f'{type(model).__name__} has no attn_probe on its attention modules: '
                         'probe() works on the models of this repository only')
    found = {'tokens': [], 'branch': [], 'attn': []}
    fused = {}
    handles = []
    try:
        handles.append(blocks[0].register_forward_pre_hook(
            lambda m, args: found['tokens'].append(_as_tokens(args[0], getattr(m, 'channels_first', False)))))
        for blk in blocks:
            handles.append(blk.register_forward_hook(lambda m, args, out: found['tokens'].append(
                _as_tokens(out, getattr(m, 'channels_first', False)))))
            if not swin:
                handles.append(blk.attn.register_forward_hook(lambda m, args, out: found['branch'].append(out)))
                handles.append(blk.attn.attn_probe.register_forward_hook(  # the map A; the module applies AttnScale
                    lambda m, args, out, lamb=blk.attn.lamb: found['attn'].append(
                        out if lamb is None else attnscale(out, lamb))))
        fused = {} if swin else set_fused_attn(model, False)
        with torch.no_grad():
            found['logits'] = model(images)
    finally:
        for m, value in fused.items():
            m.fused_attn = value
        for h in handles:
            h.remove()
    return found


def batch_metrics(probed: dict, num_prefix: int) -> dict:
    """Every per-layer metric of one probed batch, per image: name -> (B, layers) or (B, layers, N).

    The layer axis starts at `FIRST_LAYER[name]`. Spectral responses are averaged over the heads. Metrics
    whose inputs the probe did not collect (Swin: branch and maps; the spectrum when N changes) are left out.
    """
    tokens, branch, attn = probed['tokens'], probed['branch'], probed['attn']

    def per_layer(fn, items):
        return torch.stack([fn(item) for item in items], dim=1)

    metrics = {
        'hf_dc_features': per_layer(lambda x: hf_ratio(x, 'dc'), tokens),
        'hf_total_features': per_layer(lambda x: hf_ratio(x, 'total'), tokens),
        'patch_cosine': per_layer(lambda x: patch_cosine_similarity(x, num_prefix), tokens),
    }
    if len({x.shape[-2] for x in tokens}) == 1:
        metrics['feature_spectrum_db'] = per_layer(token_spectrum, tokens)
    if branch:
        metrics['hf_dc_branch'] = per_layer(lambda y: hf_ratio(y, 'dc'), branch)
        metrics['hf_total_branch'] = per_layer(lambda y: hf_ratio(y, 'total'), branch)
    if attn:
        metrics['attention_cosine'] = per_layer(lambda pair: attention_cosine(*pair), zip(attn[1:], attn[:-1]))
        metrics['attention_spectral_response'] = per_layer(
            lambda a: attention_spectral_response(a).mean(dim=1), attn)
    return metrics


def measure(model: torch.nn.Module, loader, device: torch.device) -> dict:
    """Average every metric of `batch_metrics` over the images of `loader` (image, label batches).

    Puts `model` in eval mode. Returns num_images, num_tokens (N seen by the last block),
    num_prefix_tokens, frequencies (the x axis of the spectra; None without them) and metrics: name -> dict(layers=
    [layer numbers], values=[one mean per layer, a list of N values for the spectra]).
    """
    model.eval()
    num_prefix = stage_prefix_tokens(model)
    chunks, num_tokens = defaultdict(list), 0
    for images, _ in loader:
        probed = probe(model, images.to(device))
        num_tokens = probed['tokens'][-1].shape[-2]
        for name, value in batch_metrics(probed, num_prefix).items():
            chunks[name].append(value.cpu())
    if not chunks:
        raise ValueError('the loader gave no images')
    metrics = {}
    for name, parts in chunks.items():
        mean = torch.cat(parts).double().mean(dim=0)
        layers = list(range(FIRST_LAYER[name], FIRST_LAYER[name] + mean.shape[0]))
        metrics[name] = dict(layers=layers, values=mean.tolist())
    num_images = sum(part.shape[0] for part in chunks['patch_cosine'])
    frequencies = token_frequencies(num_tokens).tolist() if 'feature_spectrum_db' in metrics else None
    return dict(num_images=num_images, num_tokens=num_tokens, num_prefix_tokens=num_prefix,
                frequencies=frequencies, metrics=metrics)


def _stats(values: torch.Tensor) -> dict:
    """mean, std, min and max of a 1-D tensor as floats."""
    values = values.detach().double()
    return dict(mean=values.mean().item(), std=values.std(unbiased=False).item(),
                min=values.min().item(), max=values.max().item())


def addon_parameters(model: torch.nn.Module) -> dict:
    """The learned add-on gains of the analysed blocks (`analysed_blocks`), per layer (block numbers 1..L).

    'attnscale_lambda': dict(layers, values=[per-head lambdas of each layer]) or None without
    AttnScale; 'featscale_lambda1' / 'featscale_lambda2': dict(layers, mean, std, min, max: one
    value per layer, over the C channels) or None without FeatScale.
    """
    def collect(get):
        found = [(i, get(blk)) for i, blk in enumerate(analysed_blocks(model), start=1)]
        return [(i, p) for i, p in found if p is not None]

    attn = collect(lambda blk: getattr(blk.attn, 'lamb', None))
    result = {'attnscale_lambda': dict(layers=[i for i, _ in attn], values=[p.detach().tolist() for _, p in attn])
              if attn else None}
    for key in ('lamb1', 'lamb2'):
        feat = collect(lambda blk: getattr(blk, key, None))
        stats = [_stats(p) for _, p in feat]
        result[f'featscale_lambda{key[-1]}'] = dict(
            layers=[i for i, _ in feat], **{s: [row[s] for row in stats] for s in ('mean', 'std', 'min', 'max')}
        ) if feat else None
    return result
