#!/usr/bin/env bash
# The team MLflow server, on a VM or in a container: PostgreSQL (or any SQLAlchemy URI) as backend store,
# artifacts proxied to S3-compatible storage (clients upload through the server and need no S3 credentials),
# basic auth on, and only the named Host headers accepted. Checked against MLflow 3.17.2.
#
# Settings, from the environment (secrets never on the command line, where `ps` shows them):
#   MLFLOW_BACKEND_STORE_URI      required  e.g. postgresql+psycopg2://mlflow:PASSWORD@db.internal:5432/mlflow
#   MLFLOW_ARTIFACTS_DESTINATION  required  e.g. s3://team-bucket/mlflow (AWS_* / MLFLOW_S3_ENDPOINT_URL for S3)
#   MLFLOW_AUTH_ADMIN_PASSWORD    required  the admin's password, used when the user store is first created
#   MLFLOW_FLASK_SERVER_SECRET_KEY required  signs CSRF tokens; the same value on every replica
#   MLFLOW_AUTH_ADMIN_USERNAME    default admin
#   MLFLOW_AUTH_DATABASE_URI      default: the backend store (auth keeps its own tables and migration history)
#   MLFLOW_DEFAULT_PERMISSION     default READ: what users may do with runs they did not create
#   MLFLOW_HOST                   default 127.0.0.1 (0.0.0.0 in a container behind a Service)
#   MLFLOW_PORT                   default 5000
#   MLFLOW_ALLOWED_HOSTS          default "MLFLOW_HOST:PORT,localhost:PORT": Host headers the server answers
#   MLFLOW_WORKERS                default 2
#   MLFLOW_AUTH_CACHE_TTL_SECONDS default 60: how long a worker trusts a password it has checked. Uncached, MLflow
#                                 checks the password of every request with scrypt: ~0.4 CPU s a request, so a
#                                 training run's metric writes kept a core busy. The cost: a password changed or a
#                                 user deleted still works on the other workers for up to this long. 0: no cache.
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  default false: MLflow's job runners (GenAI scorers, prompt optimisation,
#                                 trace rollups), which sd3ray never queues. On, they are 8 more processes that
#                                 each import MLflow: 2.6 GB of RSS instead of 0.8 GB with the other defaults
#                                 here, over the 2Gi that infra/k8s/mlflow/server.yaml allows.
set -euo pipefail

require() {
    if [ -z "${!1:-}" ]; then
        echo "serve.sh: set $1 ($2)" >&2
        exit 2
    fi
}
require MLFLOW_BACKEND_STORE_URI "the backend store, e.g. postgresql+psycopg2://mlflow:PASSWORD@HOST:5432/mlflow"
require MLFLOW_ARTIFACTS_DESTINATION "where artifacts go, e.g. s3://bucket/mlflow"
require MLFLOW_AUTH_ADMIN_PASSWORD "the admin password for basic auth"
require MLFLOW_FLASK_SERVER_SECRET_KEY "a long random string, e.g. from: openssl rand -hex 32"

host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

# The auth app reads an ini file; it holds a database URI (and so, perhaps, a password): readable by us alone.
umask 077
auth_dir="$(mktemp -d)"
trap 'rm -rf "$auth_dir"' EXIT
cat > "$auth_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = ${MLFLOW_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI:-$MLFLOW_BACKEND_STORE_URI}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL_SECONDS:-60}
INI
export MLFLOW_AUTH_CONFIG_PATH="$auth_dir/basic_auth.ini"

# Not exec: the trap above removes the ini file when the server stops. Signals reach the server through `wait`.
mlflow server \
    --app-name basic-auth \
    --host "$host" --port "$port" --workers "${MLFLOW_WORKERS:-2}" \
    --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" --serve-artifacts \
    --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-$host:$port,localhost:$port}" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server"; rm -rf "$auth_dir"' TERM INT
wait "$server"
