"""Model registry: register a run's model (verified, with a model card), promote `champion`, list, show.

    version = register(run_id, "mrigen-vae", metric="val_ssim", value=0.81, greater_is_better=True)
    promote_if_better("mrigen-vae", version, metric="val_ssim", greater_is_better=True)   # -> bool
    rule = PromotionRule.parse({"metric": "val_fd_ratio", "require": {"val_memorised": "<= 0.05"}})
    register(run_id, name, metric=rule.metric, value=v, greater_is_better=rule.greater_is_better, require=rule.require)
    python -m mrigen.registry list | show NAME | promote NAME VERSION [--force]
"""

from mrigen.registry.artifacts import (PICKLE_SUFFIXES, RegistryError, describe_model_uri, find_logged_model,
                                       hash_tree, verify_downloaded)
from mrigen.registry.artifacts import verify_model_artifacts as _verify
from mrigen.registry.core import CHAMPION, champion, list_models, model_card, promote_if_better, register, show
from mrigen.registry.rule import DEFAULT_RULE, Condition, MissingMetricError, PromotionRule
from mrigen.tracking.client import make_client

__all__ = ["CHAMPION", "DEFAULT_RULE", "PICKLE_SUFFIXES", "Condition", "MissingMetricError", "PromotionRule",
           "RegistryError", "champion", "describe_model_uri", "find_logged_model",
           "hash_tree", "list_models", "model_card", "promote_if_better", "register", "show", "verify_downloaded",
           "verify_model_artifacts"]


def verify_model_artifacts(run_id: str, tracking_uri: str | None = None) -> dict[str, str]:
    """List and sha256 the files of the run's logged model; check it is complete and pickle-free.

    Returns:
        {relative path: sha256} of the logged model's files.

    Raises:
        RegistryError: unknown run, no logged model, missing files or pickle-format files.
    """
    client, uri = make_client(tracking_uri, announce=False)
    return _verify(run_id, client=client, tracking_uri=uri)[1]
