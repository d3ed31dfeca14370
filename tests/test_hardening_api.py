"""Hardening of the HTTP edge (issue 14, item 5): /feedback limits and all-or-nothing lists, strict labels,
clients that leave mid-body, headers the server cannot read."""

import base64
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_png
from tests.servers import in_process_client, metric_value, running_server

pytestmark = pytest.mark.anyio

UNKNOWN_ID = "0" * 32


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def predicted_ids(client: httpx.AsyncClient, count: int) -> list[str]:
    files = [("files", (f"{i}.png", make_png(seed=i), "image/png")) for i in range(count)]
    response = await client.post("/predict", files=files)
    assert response.status_code == 200, response.text
    return [p["id"] for p in response.json()["predictions"]]


async def adapted_labels(client: httpx.AsyncClient) -> int:
    return (await client.get("/v1/status")).json()["prequential"]["adapted"]["labels"]


# Each list has two good items and one bad one, in the middle so that an item-by-item loop would score the first.
BAD_ITEM = {
    "unknown_id": (lambda ids: {"id": UNKNOWN_ID, "label": 1}, 404, "unknown_prediction"),
    "already_labelled": (lambda ids: {"id": ids[2], "label": 1}, 409, "already_labelled"),
    "label_out_of_range": (lambda ids: {"id": ids[3], "label": 10}, 422, "label_out_of_range"),
    "same_id_twice": (lambda ids: {"id": ids[0], "label": 2}, 422, "duplicate_id"),
}


@pytest.mark.parametrize("case", sorted(BAD_ITEM))
async def test_a_feedback_list_with_one_bad_item_applies_none_and_can_be_resent(case: str, model_path: Path) -> None:
    make_bad, status, code = BAD_ITEM[case]
    async with in_process_client(model=model_path, method="none") as (client, _):
        ids = await predicted_ids(client, 4)
        assert (await client.post("/feedback", json={"id": ids[2], "label": 0})).status_code == 200
        good = [{"id": ids[0], "label": 3}, {"id": ids[1], "label": 5}]
        refused = await client.post("/feedback", json=[good[0], make_bad(ids), good[1]])
        labels_after_refusal = await adapted_labels(client)
        resent = await client.post("/feedback", json=good)
        labels_after_resend = await adapted_labels(client)
    assert (refused.status_code, refused.json()["error"]) == (status, code), refused.text
    assert labels_after_refusal == 1, "a refused list must not score any of its items"
    assert resent.status_code == 200, resent.text  # it was 409 for the items the refused request had scored
    assert resent.json()["labelled"] == 2
    assert labels_after_resend == 3
    assert "none of these labels was applied" in refused.json()["detail"]


async def test_feedback_body_is_limited_and_parsed_like_predict(model_path: Path) -> None:
    big = b'[{"id": "' + b"0" * 2000 + b'", "label": 1}]'

    async def chunked():  # no Content-Length: the limit must hold while the body streams in
        for start in range(0, len(big), 256):
            yield big[start : start + 256]

    async with in_process_client(model=model_path, method="none", max_feedback_bytes=1000) as (client, _):
        json_headers = {"content-type": "application/json"}
        answers = {
            "declared_too_large": await client.post("/feedback", content=big, headers=json_headers),
            "streamed_too_large": await client.post("/feedback", content=chunked(), headers=json_headers),
            "feedback_invalid_json": await client.post("/feedback", content=b'{"id": ', headers=json_headers),
            "predict_invalid_json": await client.post("/predict", content=b'{"id": ', headers=json_headers),
            "feedback_wrong_shape": await client.post("/feedback", json={"id": UNKNOWN_ID}),
            "feedback_not_json": await client.post("/feedback", content=b"{}", headers={"content-type": "text/plain"}),
            "feedback_json_any_case": await client.post(
                "/feedback", json={"id": UNKNOWN_ID, "label": 1}, headers={"content-type": "Application/JSON"}
            ),
        }
        openapi = (await client.get("/openapi.json")).json()
    got = {name: (r.status_code, r.json()["error"]) for name, r in answers.items()}
    assert got == {
        "declared_too_large": (413, "request_too_large"),
        "streamed_too_large": (413, "request_too_large"),
        "feedback_invalid_json": (400, "invalid_json"),
        "predict_invalid_json": (400, "invalid_json"),
        "feedback_wrong_shape": (422, "invalid_fields"),
        "feedback_not_json": (415, "unsupported_media_type"),
        "feedback_json_any_case": (404, "unknown_prediction"),
    }
    assert "label" in answers["feedback_wrong_shape"].json()["detail"]
    feedback = openapi["paths"]["/feedback"]["post"]
    assert "All or nothing" in feedback["description"]
    assert set(feedback["requestBody"]["content"]) == {"application/json"}


@pytest.mark.parametrize("label", ["3", 3.0, True, None])
async def test_json_labels_must_be_json_integers(label: object, model_path: Path) -> None:
    image = base64.b64encode(make_png()).decode()
    async with in_process_client(model=model_path, method="none") as (client, _):
        ids = await predicted_ids(client, 1)
        on_predict = await client.post("/predict", json={"images": [image], "labels": [label]})
        on_feedback = await client.post("/feedback", json={"id": ids[0], "label": label})
        as_a_list = await client.post("/feedback", json=[{"id": ids[0], "label": label}])
        labels = await adapted_labels(client)
    for response in (on_predict, on_feedback, as_a_list):
        assert (response.status_code, response.json()["error"]) == (422, "invalid_fields"), response.text
    assert "label" in as_a_list.json()["detail"] and "0" in as_a_list.json()["detail"]  # where: "0.label"
    assert labels == 0


async def test_multipart_labels_are_ascii_digits(model_path: Path) -> None:
    # Spaces or tabs around a label are allowed ("3, 5" is how people write lists); nothing else int() would take.
    accepted = ["3", " 3 ", "\t3", "03"]
    refused = ["+3", "-1", "٣", "３", "3.0", "3_0", "0x3", "", "3,", "1" * 19, "3\n"]
    async with in_process_client(model=model_path, method="none") as (client, _):
        answers = {}
        for labels in accepted + refused:
            files = [("files", ("a.png", make_png(), "image/png"))]
            answers[labels] = await client.post("/predict", files=files, data={"labels": labels})
    got = {labels: (r.status_code, r.json().get("error")) for labels, r in answers.items()}
    assert got == {
        **{labels: (200, None) for labels in accepted},
        **{labels: (422, "invalid_labels") for labels in refused},
    }


async def test_admin_token_check_answers_a_non_ascii_header_with_400(model_path: Path) -> None:
    async with in_process_client(model=model_path, method="none", admin_token="s3cret") as (client, _):
        answers = {
            "none": await client.post("/reset"),
            "non_ascii": await client.post("/reset", headers={"authorization": b"Bearer s3cr\xe9t"}),
            "non_ascii_scheme": await client.post("/reset", headers={"authorization": b"B\xe9arer s3cret"}),
            "wrong": await client.post("/reset", headers={"authorization": "Bearer s3cre"}),
            "right": await client.post("/reset", headers={"authorization": "Bearer s3cret"}),
        }
    got = {name: (r.status_code, r.json().get("error")) for name, r in answers.items()}
    assert got == {
        "none": (401, "unauthorized"),
        "non_ascii": (400, "invalid_header"),
        "non_ascii_scheme": (400, "invalid_header"),
        "wrong": (403, "forbidden"),
        "right": (200, None),
    }


async def test_a_method_the_route_lacks_is_405_with_allow(model_path: Path) -> None:
    async with in_process_client(model=model_path, method="none") as (client, _):
        response = await client.delete("/feedback")
    assert (response.status_code, response.json()["error"]) == (405, "method_not_allowed")
    assert response.headers["allow"] == "POST"  # RFC 9110: a 405 lists the methods the resource has


def half_a_request(url: str, path: str, content_type: str) -> None:
    """Headers that announce 1000 bytes of body, 500 of them, then the connection closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\nContent-Length: 1000\r\n\r\n"
        connection.sendall(head.encode() + b"{" * 500)


def requests_by_status(url: str, route: str) -> dict[str, float]:
    exposition = httpx.get(f"{url}/metrics", timeout=10).text
    counts = {}
    for status in ("200", "400", "499", "500"):
        try:
            counts[status] = metric_value(exposition, "tta_requests_total", f'route="{route}",status="{status}"')
        except KeyError:
            continue
    return counts


def test_real_server_a_client_leaving_mid_body_is_a_499_in_one_log_line_and_a_bad_header_a_400(
    model_path: Path, tmp_path: Path
) -> None:
    """Real uvicorn, real sockets: the disconnect and the raw header bytes arrive as uvicorn delivers them."""
    log = tmp_path / "server.log"
    env = {"TTA_MODEL": str(model_path), "TTA_METHOD": "none", "TTA_ADMIN_TOKEN": "s3cret"}
    with running_server(env, log_level="info", log=log) as (url, _):
        half_a_request(url, "/predict", "application/json")
        half_a_request(url, "/feedback", "application/json")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            predict, feedback = requests_by_status(url, "/predict"), requests_by_status(url, "/feedback")
            if len(predict) + len(feedback) == 2:  # both requests have been counted, under some status
                break
            time.sleep(0.1)
        # A header with a byte that is not ASCII, sent raw over the wire (h11 passes obs-text through).
        header = httpx.post(f"{url}/reset", headers={"authorization": b"Bearer \xff\xfe"}, timeout=10)
        still_serving = httpx.post(f"{url}/predict", files=[("files", ("a.png", make_png()))], timeout=30)
    assert predict.get("499") == 1 and feedback.get("499") == 1, (predict, feedback)
    assert "500" not in predict and "500" not in feedback, (predict, feedback)
    assert (header.status_code, header.json()["error"]) == (400, "invalid_header")
    assert still_serving.status_code == 200
    text = log.read_text()
    disconnect_lines = [line for line in text.splitlines() if "disconnected" in line]
    assert len(disconnect_lines) == 2, text
    assert "Traceback" not in text and "Exception in ASGI" not in text, text
