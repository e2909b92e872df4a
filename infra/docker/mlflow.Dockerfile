# syntax=docker/dockerfile:1
# The team MLflow server: PostgreSQL backend store, artifacts proxied to S3-compatible storage, basic auth.
#   docker build -f infra/docker/mlflow.Dockerfile -t REGISTRY/sd3ray-mlflow:3.17.2 infra
# Checked against: MLflow 3.17.2, hadolint 2.15.
FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2
RUN pip install --no-cache-dir "mlflow[auth]==${MLFLOW_VERSION}" "psycopg2-binary==2.9.11" "boto3==1.43.11" \
    && useradd --create-home --uid 1000 mlflow

COPY --chmod=0755 mlflow/serve.sh /usr/local/bin/serve-mlflow
USER 1000
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["serve-mlflow"]
