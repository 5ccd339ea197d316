"""The OpenAPI 3.1 document served at /openapi.json.

Request schemas come from the msgspec types the gateway decodes with, so they cannot
drift from what is accepted; response schemas are written here, and tests check real
responses against them and check that every route is documented and every documented
route exists.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from gateway.problems import PROBLEM_TYPES
from gateway.schemas import (
    AccountCreate,
    StepUpConfirm,
    TransferCreate,
    TransferGroupCreate,
    TransferPost,
    TransferVoid,
)

_REQUEST_TYPES: Final = (
    AccountCreate,
    TransferCreate,
    TransferGroupCreate,
    TransferPost,
    TransferVoid,
    StepUpConfirm,
)

_ID: Final = {"type": "string", "pattern": r"^[1-9][0-9]{0,18}$"}
_NULLABLE_ID: Final = {"anyOf": [_ID, {"type": "null"}]}
_INT64: Final = {"type": "integer", "format": "int64"}
_TIME: Final = {"type": "string", "format": "date-time"}
_NULLABLE_TIME: Final = {"anyOf": [_TIME, {"type": "null"}]}
_METADATA: Final = {"type": "object", "additionalProperties": {"type": "string"}}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": sorted(properties)}


_RESPONSE_SCHEMAS: Final[dict[str, Any]] = {
    "Account": _object(
        {
            "object": {"const": "account"},
            "id": _ID,
            "currency": {"type": "string"},
            "kind": {"enum": ["user", "merchant", "system"]},
            "overdraft_allowed": {"type": "boolean"},
            "balance": _object(
                {"posted_minor": _INT64, "pending_minor": _INT64, "available_minor": _INT64}
            ),
            "debits_posted_minor": _INT64,
            "credits_posted_minor": _INT64,
            "debits_pending_minor": _INT64,
            "credits_pending_minor": _INT64,
            "metadata": _METADATA,
            "created_at": _TIME,
        }
    ),
    "Transfer": _object(
        {
            "object": {"const": "transfer"},
            "id": _ID,
            "debit_account_id": _ID,
            "credit_account_id": _ID,
            "currency": {"type": "string"},
            "amount_minor": _INT64,
            "posted_amount_minor": _INT64,
            "status": {"enum": ["pending", "posted", "voided", "expired"]},
            "pending": {"type": "boolean"},
            "group_id": _NULLABLE_ID,
            "metadata": _METADATA,
            "expires_at": _NULLABLE_TIME,
            "created_at": _TIME,
            "resolved_at": _NULLABLE_TIME,
        }
    ),
    "TransferGroup": _object(
        {
            "object": {"const": "transfer_group"},
            "id": _NULLABLE_ID,
            "transfers": {"type": "array", "items": {"$ref": "#/components/schemas/Transfer"}},
        }
    ),
    "Entry": _object(
        {
            "object": {"const": "entry"},
            "id": _ID,
            "account_id": _ID,
            "transfer_id": _ID,
            "kind": {"enum": ["transfer", "hold", "post", "void", "expire"]},
            "posted_delta_minor": _INT64,
            "pending_delta_minor": _INT64,
            "posted_after_minor": _INT64,
            "pending_after_minor": _INT64,
            "created_at": _TIME,
        }
    ),
    "EntryList": _object(
        {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/Entry"}},
            "has_more": {"type": "boolean"},
        }
    ),
    "StepUp": {
        **_object(
            {
                "object": {"const": "step_up"},
                "id": _ID,
                "status": {"const": "pending"},
                "account_id": _ID,
                "expires_at": _TIME,
                "attempts_max": {"type": "integer"},
                "confirm_url": {"type": "string"},
            }
        ),
        "description": "The transfer is above the payer's step-up threshold: nothing moved. "
        "A one-time code was sent to the payer; POST it to confirm_url to run the transfer.",
    },
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details",
        "properties": {
            "type": {"type": "string", "format": "uri-reference"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "instance": {"type": "string"},
            "code": {"enum": sorted(PROBLEM_TYPES)},
            "failed_index": {"type": "integer"},
            "retry_after_s": {
                "type": "integer",
                "description": "Risk limits: seconds until a new request (new key) may pass",
            },
            "attempts_left": {
                "type": "integer",
                "description": "A wrong step-up code: tries left before the step-up dies",
            },
            "errors": {"type": "array", "items": {"type": "object"}},
        },
        "required": ["type", "title", "status", "code"],
    },
}

_IDEMPOTENCY_KEY: Final = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": True,
    "description": "Unique per operation; a retry with the same key returns the first answer",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


_STEP_UP_ACCEPTED: Final = {
    "description": "Waiting for the payer's one-time code; nothing moved yet",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/StepUp"}}},
}

_PROBLEM: Final = {
    "description": "A problem (RFC 9457)",
    "content": {"application/problem+json": {"schema": _ref("Problem")}},
}


def _path_id(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": _ID}


def _command(summary: str, request: str, response: str, status: int, **extra: Any) -> Any:
    return {
        "summary": summary,
        "parameters": [_IDEMPOTENCY_KEY, *extra.get("parameters", [])],
        "requestBody": {
            "required": request not in ("TransferPost", "TransferVoid"),
            "content": {"application/json": {"schema": _ref(request)}},
        },
        "responses": {
            str(status): _json(response, summary),
            **({"202": extra["accepted"]} if "accepted" in extra else {}),
            "default": _PROBLEM,
        },
    }


def _read(summary: str, response: str, parameters: list[Any]) -> Any:
    return {
        "summary": summary,
        "parameters": parameters,
        "responses": {"200": _json(response, summary), "default": _PROBLEM},
    }


def _plain(summary: str, content_type: str) -> Any:
    return {
        "summary": summary,
        "responses": {
            "200": {"description": summary, "content": {content_type: {"schema": {}}}},
            "default": _PROBLEM,
        },
    }


_PAGE_PARAMETERS: Final = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
    {"name": "starting_after", "in": "query", "schema": _ID},
]

PATHS: Final[dict[str, dict[str, Any]]] = {
    "/v1/accounts": {"post": _command("Open an account", "AccountCreate", "Account", 201)},
    "/v1/accounts/{account_id}": {
        "get": _read("Read an account and its balance", "Account", [_path_id("account_id")])
    },
    "/v1/accounts/{account_id}/entries": {
        "get": _read(
            "List an account's entries, newest first",
            "EntryList",
            [_path_id("account_id"), *_PAGE_PARAMETERS],
        )
    },
    "/v1/transfers": {
        "post": _command(
            "Move money, or hold it (pending)",
            "TransferCreate",
            "Transfer",
            201,
            accepted=_STEP_UP_ACCEPTED,
        )
    },
    "/v1/transfers/{transfer_id}": {
        "get": _read("Read a transfer", "Transfer", [_path_id("transfer_id")])
    },
    "/v1/transfers/{transfer_id}/post": {
        "post": _command(
            "Post a hold, in full or in part",
            "TransferPost",
            "Transfer",
            200,
            parameters=[_path_id("transfer_id")],
        )
    },
    "/v1/transfers/{transfer_id}/void": {
        "post": _command(
            "Void a hold", "TransferVoid", "Transfer", 200, parameters=[_path_id("transfer_id")]
        )
    },
    "/v1/transfer_groups": {
        "post": _command(
            "Linked transfers: all succeed or none",
            "TransferGroupCreate",
            "TransferGroup",
            201,
            accepted=_STEP_UP_ACCEPTED,
        )
    },
    "/v1/step-ups/{step_up_id}/confirm": {
        "post": {
            **_command(
                "Confirm a step-up with the payer's code: the transfer (or group) runs once",
                "StepUpConfirm",
                "Transfer",
                201,
                parameters=[_path_id("step_up_id")],
            ),
            "responses": {
                "201": {
                    "description": "The transfer, or the linked group, that the step-up held",
                    "content": {
                        "application/json": {
                            "schema": {"oneOf": [_ref("Transfer"), _ref("TransferGroup")]}
                        }
                    },
                },
                "default": _PROBLEM,
            },
        }
    },
    "/healthz": {"get": _plain("The process is alive", "application/json")},
    "/readyz": {"get": _plain("The database answers: ready for traffic", "application/json")},
    "/metrics": {"get": _plain("Prometheus metrics", "text/plain")},
    "/openapi.json": {"get": _plain("This document", "application/json")},
    "/problems/{code}": {
        "get": {
            "summary": "Describe a problem type",
            "parameters": [
                {"name": "code", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {"200": _plain("", "text/plain")["responses"]["200"], "default": _PROBLEM},
        }
    },
}


def document() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        _REQUEST_TYPES, ref_template="#/components/schemas/{name}"
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "txengine",
            "version": "1",
            "description": "A double-entry transaction engine. Amounts are integers in "
            "minor units; ids are decimal strings.",
        },
        "paths": PATHS,
        "components": {"schemas": {**components, **_RESPONSE_SCHEMAS}},
    }
