"""Quality metrics: reconstruction (SSIM, PSNR, MS-SSIM) and samples (FD, precision/recall, diversity).

`evaluate(model, store, split)` returns them all as one flat dict of floats, each sample metric beside its
real-vs-real baseline (`*_real`). See docs/METRICS.md for what the numbers mean and how to read them.
"""

from .evaluate import evaluate, real_halves
from .features import (FeatureNet, FeatureNetConfig, cache_path, extract_features, get_feature_net,
                       load_feature_net, save_feature_net, train_feature_net)
from .recon import image_metrics, ms_ssim_betas, ms_ssim_per_image, psnr_per_image, recon_metrics, ssim_per_image
from .samples import diversity, diversity_metric, frechet_distance, pair_indices, precision_recall

__all__ = [
    "FeatureNet",
    "FeatureNetConfig",
    "cache_path",
    "diversity",
    "diversity_metric",
    "evaluate",
    "extract_features",
    "frechet_distance",
    "get_feature_net",
    "image_metrics",
    "load_feature_net",
    "ms_ssim_betas",
    "ms_ssim_per_image",
    "pair_indices",
    "precision_recall",
    "psnr_per_image",
    "real_halves",
    "recon_metrics",
    "save_feature_net",
    "ssim_per_image",
    "train_feature_net",
]
