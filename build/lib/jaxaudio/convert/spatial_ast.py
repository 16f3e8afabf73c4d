"""Key map: the original Spatial-AST state dict (`finetuned.pth`, `ckpt['model']`) -> ours."""
import numpy as np

from jaxaudio.convert.engine import Ignore, KeyMap, Rule, conv2d, identity, linear
from jaxaudio.features.mel import mel_filterbank
from jaxaudio.features.stft import dft_kernels
from jaxaudio.models.spatial_ast import SpatialAST


def _same_as(expected: np.ndarray, what: str):
    def check(x: np.ndarray) -> str | None:
        if x.shape != expected.shape:
            return f"{what} has shape {x.shape}, the config implies {expected.shape}"
        err = float(np.max(np.abs(x - expected)))
        # The frozen front end is recomputed from the config; a checkpoint whose copy
        # differs was made with another STFT/mel setting.
        if err > 1e-5:
            return f"{what} differs from the config's by {err:.3g}; check the front-end settings"
        return None
    return check


def _drop_cls_position(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`pos_embed [1, 1 + patches, embed]`: slot 0 (AudioMAE's CLS position) is never added."""
    return x[0, 1:].reshape(shape)


def audiomae_key_map(model: SpatialAST) -> KeyMap:
    """AudioMAE's self-supervised ViT-B (`pretrained.pth`), the original's starting point.

    As the original's `load_state_dict(strict=False)`: the patch embedding, position
    embedding and blocks transfer; the front end, stem, CLS tokens, norms and heads start
    fresh (`optional`); the MAE decoder, mask token, single CLS token and final norm are
    not part of Spatial-AST.
    """
    full = key_map(model)
    keep = ("params/patch_embed/", "params/pos_embed", r"params/blocks_")
    return KeyMap(
        rules=[r for r in full.rules if r.target.startswith(keep)],
        ignore=[Ignore(r"decoder_.*|mask_token", "MAE decoder, not used by the encoder"),
                Ignore(r"cls_token", "AudioMAE's single CLS token; Spatial-AST has 3 fresh ones"),
                Ignore(r"norm\.(weight|bias)", "final LayerNorm, deleted in Spatial-AST"),
                Ignore(r"fc_norm\.(weight|bias)|head\.(weight|bias)", "a fine-tuned AudioMAE's head")],
        optional=r"(batch_stats/.*|params/(stem_.*|cls_tokens|.*_norm/.*|.*head/.*))")


def key_map(model: SpatialAST) -> KeyMap:
    real, imag = dft_kernels(model.n_fft)
    mel = mel_filterbank(model.sample_rate, model.n_fft, model.n_mels, model.fmin, model.fmax)
    norm = r"(dis_norm|doa_norm|fc_norm)"
    heads = r"(head|distance_head|azimuth_head|elevation_head)"
    blk = r"blocks\.(\d+)\."
    return KeyMap(
        rules=[
            Rule(r"bn\.running_mean", "batch_stats/frontend/bn/mean"),
            Rule(r"bn\.running_var", "batch_stats/frontend/bn/var"),
            Rule(r"conv_downsample\.0\.weight", "params/stem_conv/kernel", conv2d),
            Rule(r"conv_downsample\.1\.weight", "params/stem_bn/scale"),
            Rule(r"conv_downsample\.1\.bias", "params/stem_bn/bias"),
            Rule(r"conv_downsample\.1\.running_mean", "batch_stats/stem_bn/mean"),
            Rule(r"conv_downsample\.1\.running_var", "batch_stats/stem_bn/var"),
            Rule(r"patch_embed\.proj\.weight", "params/patch_embed/kernel", conv2d),
            Rule(r"patch_embed\.proj\.bias", "params/patch_embed/bias"),
            Rule(r"cls_tokens", "params/cls_tokens"),
            Rule(r"pos_embed", "params/pos_embed", _drop_cls_position),
            Rule(blk + r"(norm1|norm2)\.weight", r"params/blocks_\1/\2/scale"),
            Rule(blk + r"(norm1|norm2)\.bias", r"params/blocks_\1/\2/bias"),
            Rule(blk + r"attn\.qkv\.weight", r"params/blocks_\1/attn/qkv/kernel", linear),
            Rule(blk + r"attn\.qkv\.bias", r"params/blocks_\1/attn/qkv/bias", identity),
            Rule(blk + r"attn\.proj\.weight", r"params/blocks_\1/attn/out/kernel", linear),
            Rule(blk + r"attn\.proj\.bias", r"params/blocks_\1/attn/out/bias"),
            Rule(blk + r"mlp\.(fc1|fc2)\.weight", r"params/blocks_\1/mlp/\2/kernel", linear),
            Rule(blk + r"mlp\.(fc1|fc2)\.bias", r"params/blocks_\1/mlp/\2/bias"),
            Rule(norm + r"\.weight", r"params/\1/scale"),
            Rule(norm + r"\.bias", r"params/\1/bias"),
            Rule(heads + r"\.weight", r"params/\1/kernel", linear),
            Rule(heads + r"\.bias", r"params/\1/bias"),
        ],
        ignore=[
            Ignore(r".*num_batches_tracked", "PyTorch's BatchNorm step counter; unused with a fixed momentum"),
            Ignore(r"spectrogram_extractor\.conv_real\.weight", "frozen DFT kernel, recomputed from n_fft",
                   _same_as(real.T[:, None, :], "conv_real")),
            Ignore(r"spectrogram_extractor\.conv_imag\.weight", "frozen DFT kernel, recomputed from n_fft",
                   _same_as(imag.T[:, None, :], "conv_imag")),
            Ignore(r"logmel_extractor\.melW", "frozen mel matrix, recomputed from the mel settings",
                   _same_as(mel, "melW")),
        ],
    )
