"""PostgreSQL + SeaweedFS S3 + MLflow tracking server on loopback, without Docker.

`python -m mrigen.stack up|down|status [--dir DIR]`, or from Python:

    from mrigen.stack import Stack, StackConfig
    stack = Stack(StackConfig(directory=tmp_dir))
    info = stack.up()            # StackInfo: tracking_uri, postgres_url (Optuna), s3_endpoint, bucket, keys ...
    stack.down()

The MLflow server runs through `mrigen.stack.mlflow_entry`, the same entrypoint as the `mlflow_server/` image.
"""

from mrigen.stack.core import SERVICES, ServiceStatus, Stack, StackConfig, StackInfo
from mrigen.stack.procs import StackError

__all__ = ["SERVICES", "ServiceStatus", "Stack", "StackConfig", "StackError", "StackInfo"]
