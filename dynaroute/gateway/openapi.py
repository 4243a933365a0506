"""The OpenAPI 3.1 document of the HTTP/REST port (KServe v2 / Open Inference Protocol).

Served at GET /v2/openapi.json and shipped as docs/openapi.json; a unit test checks that the
shipped file is this document and that it lists every route the server has. Regenerate the
file with `python -m dynaroute.gateway.openapi > docs/openapi.json`.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from dynaroute.gateway.open_inference import BUDGET_NUMBERS, BUDGET_STRINGS, DATATYPES, OUTPUTS


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    what = {
        400: "bad input: the message names the field and what was expected",
        401: "missing or wrong bearer token (servers started with --auth-token-file)",
        404: "no such model, version or endpoint, or the model is not loaded",
        413: "the body is larger than --max-message-bytes",
        429: "overloaded: the queues are full; retry after the Retry-After seconds",
        500: "internal error",
        503: "starting, draining, the model loading or unloading, or no expert can run the route",
        504: "the `timeout` parameter's deadline passed before the answer was ready",
    }
    return {str(s): _json(_ref("Error"), what[s]) for s in statuses}


PARAMETERS = {  # the budget names kserve.py accepts (a unit test holds them equal)
    "quality": "budget: trade-off in [0, 1] (1: the most accurate route)",
    "max_flops": "budget: the most FLOPs one row may cost",
    "target_accuracy": "budget: the accuracy to reach, through the bundle's calibration table",
    "subnet": "pin one subnet by name (e.g. w1-d6-p0)",
    "policy": "routing policy name (the bundle's calibrated policies)",
    "min_quality": "floor: under load the server may lower the budget to points of at least this quality "
                   "(default: never lowered)",
    "min_accuracy": "floor: under load the server may lower the budget to points of at least this expected "
                    "accuracy (default: never lowered)",
}


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The document, built once."""
    scalar = {"oneOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
    tensor_shape = {"type": "array", "items": {"type": "integer"}}
    model = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"},
               "description": "the model's version; dynaroute serves version 1"}
    request_params = {
        "type": "object",
        "description": "The budget (any other name is refused, 400), plus two transport parameters of Triton's.",
        "properties": {
            **{k: {"type": "number", "description": PARAMETERS[k]} for k in BUDGET_NUMBERS},
            **{k: {"type": "string", "description": PARAMETERS[k]} for k in BUDGET_STRINGS},
            "timeout": {"type": "integer", "minimum": 1,
                        "description": "the request's deadline in microseconds (504 when it passes)"},
            "binary_data_output": {"type": "boolean",
                                   "description": "send every output as binary data after the JSON header"},
        },
        "additionalProperties": False,
    }
    response_params = {
        "type": "object",
        "description": "The route and cost of the call.",
        "properties": {
            "route": {"type": "string", "description": "JSON list, one entry per row: subnets, weights, escalations, "
                      "exit_depths, fallbacks, policy, label_name, budget_out_of_reach, budget_asked, budget_got "
                      "(calibrated points: policy, quality, threshold, expected_accuracy, mean_flops, flops_ratio), "
                      "budget_lowered"},
            "cost": {"type": "string", "description": "JSON list, one entry per row: router_flops, expert_flops, "
                     "total_flops, full_flops, flops_ratio, queue_seconds, compute_seconds, total_seconds"},
            "total_flops": {"type": "integer"}, "full_flops": {"type": "integer"},
            "flops_ratio": {"type": "number"}, "rows": {"type": "integer"},
            "budget_out_of_reach": {"type": "boolean"},
            "budget_note": {"type": "string", "description": "what was used instead, when the budget was out of reach"},
            "rows_lowered": {"type": "integer",
                             "description": "rows served below their asked budget, to hold the latency objective"},
            "budget_asked_flops_ratio": {"type": "number",
                                         "description": "mean expected FLOPs ratio of the points asked"},
            "budget_got_flops_ratio": {"type": "number",
                                       "description": "mean expected FLOPs ratio of the points served"},
        },
        "additionalProperties": scalar,
    }
    schemas: dict[str, Any] = {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "ServerMetadata": {
            "type": "object", "required": ["name", "version", "extensions"],
            "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                           "extensions": {"type": "array", "items": {"type": "string"}}},
        },
        "TensorMetadata": {
            "type": "object", "required": ["name", "datatype", "shape"],
            "properties": {"name": {"type": "string"}, "datatype": {"type": "string", "enum": list(DATATYPES)},
                           "shape": tensor_shape},
        },
        "ModelMetadata": {
            "type": "object", "required": ["name", "platform", "inputs", "outputs"],
            "properties": {
                "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": _ref("TensorMetadata")},
                "outputs": {"type": "array", "items": _ref("TensorMetadata")},
            },
        },
        "RepositoryIndexRequest": {
            "type": "object", "description": "optional (an empty body lists every model)",
            "properties": {"ready": {"type": "boolean", "description": "list only the models that are ready"}},
            "additionalProperties": False,
        },
        "RepositoryModel": {
            "type": "object", "required": ["name", "state"],
            "properties": {"name": {"type": "string"},
                           "version": {"type": "string", "description": "1; absent for a folder that is not a bundle"},
                           "state": {"type": "string", "enum": ["READY", "LOADING", "UNLOADING", "UNAVAILABLE"]},
                           "reason": {"type": "string", "description": "why not ready (absent when ready)"}},
        },
        "RepositoryRequest": {
            "type": "object", "description": "optional; a bundle is loaded as it is in the repository folder",
            "properties": {"parameters": {
                "type": "object", "additionalProperties": scalar,
                "description": "load: none (Triton's config and file: overrides are refused, 400); unload: only "
                               "unload_dependents (dynaroute's models have none)",
            }},
            "additionalProperties": False,
        },
        "Empty": {"type": "object", "additionalProperties": False},
        "Ready": {"type": "object", "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}},
        "Live": {"type": "object", "properties": {"live": {"type": "boolean"}}},
        "RequestInput": {
            "type": "object", "required": ["name", "shape", "datatype"],
            "properties": {
                "name": {"type": "string", "description": "`input` for tensor models, `text` for text models"},
                "shape": {**tensor_shape, "description": "[N, ...example shape], or [N] / [N, 1] for BYTES text"},
                "datatype": {"type": "string", "enum": list(DATATYPES)},
                "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer"}},
                               "additionalProperties": False},
                "data": {"type": "array", "description": "row-major values, flat or nested; strings for BYTES"},
            },
            "additionalProperties": False,
        },
        "RequestOutput": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string", "enum": list(OUTPUTS)},
                           "parameters": {"type": "object", "properties": {
                               "binary_data": {"type": "boolean"},
                               "classification": {
                                   "type": "integer", "minimum": 1,
                                   "description": "logits only (Triton's classification extension): the top k "
                                                  "classes as BYTES \"value:index:label\" strings"}},
                               "additionalProperties": False}},
            "additionalProperties": False,
        },
        "InferenceRequest": {
            "type": "object", "required": ["inputs"],
            "properties": {"id": {"type": "string"}, "parameters": request_params,
                           "inputs": {"type": "array", "items": _ref("RequestInput"), "minItems": 1, "maxItems": 1},
                           "outputs": {"type": "array", "items": _ref("RequestOutput")}},
            "additionalProperties": False,
        },
        "ResponseOutput": {
            "type": "object", "required": ["name", "shape", "datatype"],
            "properties": {"name": {"type": "string"}, "shape": tensor_shape, "datatype": {"type": "string"},
                           "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer"}}},
                           "data": {"type": "array"}},
        },
        "InferenceResponse": {
            "type": "object", "required": ["model_name", "outputs"],
            "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"},
                           "id": {"type": "string"}, "parameters": response_params,
                           "outputs": {"type": "array", "items": _ref("ResponseOutput")}},
        },
    }
    binary = {"description": "with Triton's binary tensor data extension: the JSON header, then the raw tensors "
              "(Inference-Header-Content-Length: the header's length)", "schema": {"type": "string",
                                                                                   "format": "binary"}}
    infer = {
        "summary": "Infer: N rows, each routed under the budget",
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("InferenceRequest")},
                                                      "application/octet-stream": binary}},
        "responses": {
            "200": {"description": "outputs, route and cost",
                    "content": {"application/json": {"schema": _ref("InferenceResponse")},
                                "application/octet-stream": binary}},
            **_errors(400, 401, 404, 413, 429, 500, 503, 504),
        },
    }
    metadata = {"summary": "Model metadata: input and output tensors",
                "responses": {"200": _json(_ref("ModelMetadata"), "the model's tensors"), **_errors(401, 404, 503)}}
    ready = {"summary": "Model ready",
             "responses": {"200": _json(_ref("Ready"), "ready"), "503": _json(_ref("Ready"), "not ready"),
                           **_errors(401, 404)}}

    def with_params(op: dict[str, Any], params: list[dict[str, Any]]) -> dict[str, Any]:
        return {**op, "parameters": params}

    paths: dict[str, Any] = {
        "/v2/health/live": {"get": {"summary": "Server live (no token needed)", "security": [],
                                    "responses": {"200": _json(_ref("Live"), "live")}}},
        "/v2/health/ready": {"get": {"summary": "Server ready (no token needed)", "security": [],
                                     "responses": {"200": _json(_ref("Ready"), "ready"),
                                                   "503": _json(_ref("Ready"), "starting or draining")}}},
        "/v2": {"get": {"summary": "Server metadata",
                        "responses": {"200": _json(_ref("ServerMetadata"), "name, version, extensions"),
                                      **_errors(401)}}},
        "/v2/openapi.json": {"get": {"summary": "This document",
                                     "responses": {"200": {"description": "the OpenAPI document"}, **_errors(401)}}},
    }
    repository_body = {"required": False,
                       "content": {"application/json": {"schema": _ref("RepositoryRequest")}}}
    paths["/v2/repository/index"] = {"post": {
        "summary": "Repository index: every model of the folder and every loaded one, with its state",
        "requestBody": {"required": False,
                        "content": {"application/json": {"schema": _ref("RepositoryIndexRequest")}}},
        "responses": {"200": _json({"type": "array", "items": _ref("RepositoryModel")}, "the models"),
                      **_errors(400, 401, 413)},
    }}
    paths["/v2/repository/models/{model}/load"] = {"post": with_params({
        "summary": "Load the model from the repository folder, or replace it when loaded (the new version "
                   "starts first, the old one finishes its requests); answers once it serves",
        "requestBody": repository_body,
        "responses": {"200": _json(_ref("Empty"), "loaded"), **_errors(400, 401, 404, 413, 500, 503)},
    }, [model])}
    paths["/v2/repository/models/{model}/unload"] = {"post": with_params({
        "summary": "Unload the model: new requests are refused, in-flight ones finish, its experts stop",
        "requestBody": repository_body,
        "responses": {"200": _json(_ref("Empty"), "unloaded"), **_errors(400, 401, 404, 413, 500, 503)},
    }, [model])}
    for base, params in (("/v2/models/{model}", [model]), ("/v2/models/{model}/versions/{version}", [model, version])):
        paths[base] = {"get": with_params(metadata, params)}
        paths[f"{base}/ready"] = {"get": with_params(ready, params)}
        paths[f"{base}/infer"] = {"post": with_params(infer, params)}
    return {
        "openapi": "3.1.0",
        "info": {"title": "dynaroute KServe v2 REST API", "version": "1",
                 "description": "The KServe v2 / Open Inference Protocol over HTTP, as `dynaroute serve --http-port` "
                 "serves it: the same models, budgets, route and cost as the gRPC API, and Triton's "
                 "model-repository extension."},
        "servers": [{"url": "http://127.0.0.1:8000"}],
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "only on servers started with --auth-token-file"}},
        },
        "security": [{"bearer": []}, {}],
        "paths": paths,
    }


def main() -> None:
    print(json.dumps(openapi_document(), indent=2))


if __name__ == "__main__":
    main()
