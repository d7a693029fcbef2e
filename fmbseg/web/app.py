"""The demo's HTTP side: one static page and a small JSON API over :class:`DemoService`.

An upload is the request body itself (no multipart form), so the page needs nothing beyond
FastAPI and uvicorn; the classes, model and file name travel as query parameters.
"""

from __future__ import annotations

import argparse
import logging
import socket
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from fmbseg.errors import ConfigError, FmbsegError
from fmbseg.web.service import MAX_UPLOAD_BYTES, DemoService

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
HOST = "127.0.0.1"  # the demo reads local model paths a visitor types: never serve it wider


def create_app(service: DemoService) -> FastAPI:
    app = FastAPI(title="fmbseg demo", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    def bad_request(exc: FmbsegError) -> HTTPException:
        return HTTPException(status_code=400, detail=str(exc))

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/api/config")
    def config() -> dict[str, Any]:
        return {
            "model": service.default_model,
            "samples": [
                {"name": s.name, "classes": list(s.classes), "url": f"/api/samples/{s.name}"}
                for s in service.samples().values()
            ],
        }

    @app.get("/api/samples/{name}")
    def sample_image(name: str) -> FileResponse:
        sample = service.samples().get(name)
        if sample is None:
            raise HTTPException(status_code=404, detail=f"sample {name!r}: not found")
        return FileResponse(sample.path, media_type="image/png")

    @app.post("/api/jobs", status_code=202)
    async def submit(
        request: Request,
        classes: Annotated[list[str], Query()],
        model: str,
        sample: str | None = None,
        filename: str = "upload",
    ) -> dict[str, Any]:
        declared = int(request.headers.get("content-length") or 0)
        body = await request.body() if sample is None and declared <= MAX_UPLOAD_BYTES else None
        if sample is None and (body is None or len(body) > MAX_UPLOAD_BYTES):
            raise HTTPException(
                status_code=413, detail=f"{filename}: larger than {MAX_UPLOAD_BYTES} bytes"
            )
        try:
            job = service.submit(classes, model, upload=body, filename=filename, sample=sample)
        except FmbsegError as exc:
            raise bad_request(exc) from None
        return job.snapshot()

    @app.get("/api/jobs/{job_id}")
    def job_state(job_id: str) -> dict[str, Any]:
        try:
            return service.job(job_id).snapshot()
        except FmbsegError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None

    @app.get("/api/jobs/{job_id}/{name}")
    def job_file(job_id: str, name: str) -> FileResponse:
        try:
            path = service.job_file(job_id, name)
        except FmbsegError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        return FileResponse(path, media_type="image/png")

    return app


def bind(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1 (port 0: any free one), or a one-line error."""
    try:
        return socket.create_server((HOST, port))
    except OSError as exc:
        raise ConfigError(
            f"--port {port}: cannot listen on {HOST} ({exc.strerror}); pass another port, "
            "or 0 for any free one"
        ) from None


def command(args: argparse.Namespace) -> int:
    """``fmbseg demo``: serve the page until interrupted."""
    import uvicorn

    from fmbseg.commands import params_from_args

    params = params_from_args(args)
    listener = bind(args.port)
    with tempfile.TemporaryDirectory(prefix="fmbseg-demo-") as workdir:
        service = DemoService(params, args.model, workdir)
        server = uvicorn.Server(
            uvicorn.Config(create_app(service), log_level="warning", access_log=False)
        )
        print(f"fmbseg demo: http://{HOST}:{listener.getsockname()[1]}/  (Ctrl-C stops it)")
        try:
            server.run(sockets=[listener])
        finally:
            service.close()
    return 0
