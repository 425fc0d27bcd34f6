-- Run once by the postgres image on an empty volume (docker-compose.yml mounts it into
-- /docker-entrypoint-initdb.d). POSTGRES_DB creates `mlflow`; MLflow's auth app and Optuna need their own
-- databases because MLflow and Optuna both keep an `alembic_version` table.
CREATE DATABASE mlflow_auth;
CREATE DATABASE optuna;
