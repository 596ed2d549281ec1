"""A small HTTP client for the camscope Serve endpoint (``camscope serve``)."""

from __future__ import annotations

from typing import Any

import requests

TIMEOUT_S = 60.0


class ApiError(ValueError):
    """The API could not be reached or refused a request; the message is one line for the page."""


class ApiClient:
    """Calls ``/v1/*`` of a camscope endpoint at ``url`` (e.g. ``http://127.0.0.1:8000``), sending
    ``token`` as a bearer token when given (``camscope serve --token``)."""

    def __init__(self, url: str, timeout: float = TIMEOUT_S, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def get(self, path: str, **params: Any) -> Any:
        """GET ``path`` with query ``params``; the decoded JSON body."""
        return self._call("GET", path, params=params)

    def post(self, path: str, body: dict) -> Any:
        """POST a JSON ``body`` to ``path``; the decoded JSON body."""
        return self._call("POST", path, json=body)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as error:
            raise ApiError(f"API at {self.url} is not reachable ({type(error).__name__})") from error
        if response.status_code in (401, 403):
            raise ApiError(f"API at {self.url} refused the token ({response.status_code}): pass the right one "
                           "with --token or CAMSCOPE_TOKEN")
        if response.status_code >= 400:
            raise ApiError(f"API {method} {path} failed ({response.status_code}): {_detail(response)}")
        return response.json()


def _detail(response: requests.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    return " ".join(str(detail).split())[:300]
