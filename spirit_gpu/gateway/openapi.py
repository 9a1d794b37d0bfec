"""The OpenAPI document of the public API, served at GET /openapi.json."""

from __future__ import annotations

from typing import Any

_ERROR = {"type": "object", "required": ["error"],
          "properties": {"error": {"type": "string"}}}
_SID = {"name": "sid", "in": "path", "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.\\-]{0,127}$"},
        "description": "Serverless id (the worker's EASE_AGENT_URL ends in /agent/<sid>)"}
_STATUS = {
    "type": "object",
    "required": ["statusCode", "serverlessID", "requestID", "status", "message", "result"],
    "properties": {
        "statusCode": {"type": "integer", "description": "0 until the request is finished"},
        "serverlessID": {"type": "string"},
        "requestID": {"type": "string"},
        "status": {"type": "string", "enum": ["queueing", "executing", "succeed", "failed",
                                              "cancelled", "notFound"]},
        "message": {"type": "string"},
        "result": {"type": ["string", "null"], "description": "base64 of the result bytes"},
    },
}
_BODY = {
    "type": "object", "required": ["input"],
    "properties": {
        "input": {"description": "Passed to the handler as request['input']"},
        "webhook": {"type": "string", "description": "Async: where the worker POSTs the result"},
        "policy": {"type": "object",
                   "properties": {"ttl": {"type": "integer", "minimum": 1,
                                          "description": "Queueing TTL in ms"}}},
    },
}


def _err(text: str) -> dict[str, Any]:
    return {"description": text,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _ok(text: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": text, "content": {"application/json": {"schema": schema}}}


_COMMON = {"401": _err("Missing or wrong API key"),
           "400": _err("Invalid serverless id or arguments")}
_REQUEST_ID = {"name": "requestID", "in": "query", "required": False,
               "schema": {"type": "string"}}


def document() -> dict[str, Any]:
    body = {"required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Body"}}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "spirit-gpu gateway", "version": "1",
                 "description": "Self-hosted serverless API (sync, async, status, cancel, "
                                "stream). Authenticate with 'Authorization: Bearer <api-key>'."},
        "components": {
            "schemas": {"Error": _ERROR, "Status": _STATUS, "Body": _BODY},
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"apiKey": []}],
        "paths": {
            "/v1/{sid}/sync": {"post": {
                "summary": "Run a request and wait (at most 3 minutes) for its result",
                "parameters": [_SID], "requestBody": body,
                "responses": {"200": {"description": "The handler's result (JSON or bytes); "
                                      "other codes are the worker's status code"},
                              "408": _err("Request timeout"),
                              "503": _err("not enough gpu now: no worker connected"),
                              **_COMMON}}},
            "/v1/{sid}/async": {
                "post": {"summary": "Queue a request; the worker POSTs the result to webhook",
                         "parameters": [_SID], "requestBody": body,
                         "responses": {"200": _ok("Accepted", {
                             "type": "object", "required": ["id", "sequence"],
                             "properties": {"id": {"type": "string"},
                                            "sequence": {"type": "integer"}}}),
                             **_COMMON}},
                "delete": {"summary": "Cancel one request (queued or running), or with no "
                                      "requestID clean all queued async requests",
                           "parameters": [_SID, _REQUEST_ID,
                                          {"name": "sequence", "in": "query", "required": False,
                                           "schema": {"type": "integer"}}],
                           "responses": {"200": _ok("Cancelled / cleaned", {
                               "type": "object", "required": ["id"],
                               "properties": {"id": {"type": "string"},
                                              "cleaned": {"type": "array",
                                                          "items": {"type": "string"}}}}),
                               "404": _err("Request not found"), **_COMMON}}},
            "/v1/{sid}/status": {
                "get": {"summary": "Queue length, or one request's status with requestID",
                        "parameters": [_SID, _REQUEST_ID],
                        "responses": {"200": _ok("Queue length or status", {"oneOf": [
                            {"type": "object", "required": ["queueingCount"],
                             "properties": {"queueingCount": {"type": "integer"}}},
                            {"$ref": "#/components/schemas/Status"}]}),
                            "404": _err("Request not found"), **_COMMON}},
                "post": {"summary": "Statuses of many requests",
                         "parameters": [_SID],
                         "requestBody": {"required": True, "content": {"application/json": {
                             "schema": {"type": "object", "required": ["requestIDs"],
                                        "properties": {"requestIDs": {
                                            "type": "array", "maxItems": 1000,
                                            "items": {"type": "string"}}}}}}},
                         "responses": {"200": _ok("Statuses", {
                             "type": "object", "required": ["statuses"],
                             "properties": {"statuses": {
                                 "type": "array",
                                 "items": {"$ref": "#/components/schemas/Status"}}}}),
                             **_COMMON}}},
            "/v1/{sid}/stream": {"get": {
                "summary": "Server-Sent Events: one data event per generator chunk, then "
                           "'event: end' with {statusCode, status}",
                "parameters": [_SID, {**_REQUEST_ID, "required": True}],
                "responses": {"200": {"description": "text/event-stream",
                                      "content": {"text/event-stream": {
                                          "schema": {"type": "string"}}}},
                              "404": _err("Request not found"), **_COMMON}}},
            "/healthz": {"get": {"summary": "Liveness", "security": [],
                                 "responses": {"200": _ok("ok", {"type": "object"})}}},
            "/readyz": {"get": {"summary": "Readiness", "security": [],
                                "responses": {"200": _ok("ready", {"type": "object"})}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": [],
                                 "responses": {"200": {"description": "text exposition",
                                                       "content": {"text/plain": {
                                                           "schema": {"type": "string"}}}}}}},
        },
    }
