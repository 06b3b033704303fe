"""Loading the Serve config file (Ray Serve's own schema, as `serve deploy` reads it)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "serve_config.yaml"
SERVICER_FUNCTION = "deployment.grpc_service.add_OrthrusServicer_to_server"
# The generated registration parses requests where a malformed one cannot be answered
# with INVALID_ARGUMENT (see deployment/grpc_service.py); configs naming it get ours.
GENERATED_SERVICER_FUNCTION = "orthrus_runtime.proto.orthrus_pb2_grpc.add_OrthrusServicer_to_server"


def load_config(
    path: Optional[str | Path] = None,
    *,
    http_port: Optional[int] = None,
    grpc_port: Optional[int] = None,
):
    """Read, override and validate a config; returns a ray.serve.schema.ServeDeploySchema."""
    from ray.serve.schema import ServeDeploySchema

    path = Path(path) if path is not None else DEFAULT_CONFIG
    with open(path, encoding="utf-8") as f:
        raw: Any = yaml.safe_load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a Serve config must be a YAML mapping")
    if http_port is not None:
        raw.setdefault("http_options", {})["port"] = http_port
    if grpc_port is not None:
        raw.setdefault("grpc_options", {})["port"] = grpc_port
    grpc = raw.setdefault("grpc_options", {})
    funcs = [f for f in grpc.setdefault("grpc_servicer_functions", []) if f != GENERATED_SERVICER_FUNCTION]
    grpc["grpc_servicer_functions"] = funcs
    if SERVICER_FUNCTION not in funcs:
        # Without it Serve's gRPC proxy does not know the orthrus.v1 service.
        funcs.append(SERVICER_FUNCTION)
    return ServeDeploySchema.model_validate(raw)
