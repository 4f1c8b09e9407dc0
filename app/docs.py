"""``/docs`` (Swagger UI) and ``/redoc`` served from the installed ``fastapi-offline`` package's
own files, so the documentation works on a network that cannot reach a CDN.

FastAPI's defaults load both from jsDelivr; ``create_app`` turns them off (``docs_url=None``,
``redoc_url=None``) and calls ``mount_docs`` instead.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_URL = "/docs-static"
STATIC_DIR = files("fastapi_offline") / "static"  # swagger-ui-bundle.js, swagger-ui.css, ...


def mount_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve Swagger UI at ``docs_url`` and ReDoc at ``redoc_url`` from local files."""
    if app.docs_url is not None or app.redoc_url is not None:
        raise ValueError(
            f"create the app with docs_url=None and redoc_url=None, got {app.docs_url!r} "
            f"and {app.redoc_url!r}: FastAPI's own pages load their files from a CDN"
        )
    app.mount(STATIC_URL, StaticFiles(directory=str(STATIC_DIR)), name="docs-static")
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{oauth2_redirect_url}" if oauth2_redirect_url else None,
            swagger_js_url=f"{root}{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC_URL}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    if oauth2_redirect_url:

        @app.get(oauth2_redirect_url, include_in_schema=False)
        async def swagger_ui_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{STATIC_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{STATIC_URL}/favicon.png",
            with_google_fonts=False,
        )
