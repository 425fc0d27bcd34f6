"""Quality metrics: reconstruction (SSIM, PSNR, MS-SSIM), samples (FD, precision/recall, diversity, sharpness),
copies.

`evaluate(model, store, split)` returns them all as one flat dict of floats, each sample metric beside its
real baseline (`*_real`: real slices of training subjects against the same held-out reference). See
docs/METRICS.md for what the numbers mean and how to read them.
"""

from .evaluate import BASELINE_SPLIT, EVAL_SAMPLES, evaluate, sample_metrics
from .features import (FeatureNet, FeatureNetConfig, cache_path, extract_features, get_feature_net,
                       load_feature_net, save_feature_net, train_feature_net)
from .memorisation import memorisation, nn_distances
from .pretext import DEGRADATIONS, degrade
from .recon import image_metrics, ms_ssim_betas, ms_ssim_per_image, psnr_per_image, recon_metrics, ssim_per_image
from .samples import diversity, diversity_metric, frechet_distance, pair_indices, precision_recall
from .spectrum import hf_power, hf_ratio

__all__ = [
    "BASELINE_SPLIT",
    "DEGRADATIONS",
    "EVAL_SAMPLES",
    "FeatureNet",
    "FeatureNetConfig",
    "cache_path",
    "degrade",
    "diversity",
    "diversity_metric",
    "evaluate",
    "extract_features",
    "frechet_distance",
    "get_feature_net",
    "hf_power",
    "hf_ratio",
    "image_metrics",
    "load_feature_net",
    "memorisation",
    "ms_ssim_betas",
    "ms_ssim_per_image",
    "nn_distances",
    "pair_indices",
    "precision_recall",
    "psnr_per_image",
    "recon_metrics",
    "sample_metrics",
    "save_feature_net",
    "ssim_per_image",
    "train_feature_net",
]
