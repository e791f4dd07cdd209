"""The web layer of ``scaleprotoseg explore``: a small Starlette app over :class:`~.session.ExploreSession`.

Plain HTML/JS/CSS from ``explore/static/`` (package data, no build step, works offline) and a JSON/PNG API. Every
answer comes from the session; the only thing the server writes is an edit, through :func:`.edits.save_edit`, inside
the run's ``checkpoints/``. Uploads stay in memory. Errors a user can cause come back as ``{"error": message}`` with
status 400 and the page shows them.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import numpy as np

from scaleprotoseg.explore.decision import Ablation, ExploreError
from scaleprotoseg.explore.edits import list_edits, save_edit
from scaleprotoseg.explore.session import MAX_PIXELS, ExploreSession, ImageCatalog

__all__ = ["MAX_UPLOAD_BYTES", "create_app", "decode_upload", "encode_png"]

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 32 * 1024 * 1024


def encode_png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _heat(values: np.ndarray) -> tuple[bytes, float, float]:
    """A (h, w) map as a viridis PNG on its own range; returns (png, min, max)."""
    from matplotlib import colormaps

    lo, hi = float(np.min(values)), float(np.max(values))
    norm = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    rgb = (colormaps["viridis"](norm)[..., :3] * 255).astype(np.uint8)
    return encode_png(rgb), lo, hi


def decode_upload(data: bytes, name: str = "upload") -> np.ndarray:
    """Bytes of an uploaded file -> uint8 RGB, or an :class:`ExploreError` that says what is wrong."""
    import warnings

    from PIL import Image

    from scaleprotoseg.data.io import to_rgb_uint8

    if len(data) > MAX_UPLOAD_BYTES:
        raise ExploreError(f"{name}: {len(data) / 2**20:.1f} MB is too large; expected at most 32 MB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ExploreError(f"{name}: {h} x {w} pixels is too large; expected at most 16 megapixels")
            array = np.asarray(img.convert("RGB") if img.mode not in ("L", "I;16", "I", "F") else img)
    except ExploreError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ExploreError(f"{name}: the image is too large ({err}); expected at most 16 megapixels") from err
    except Exception as err:
        raise ExploreError(f"{name}: not an image ({type(err).__name__}); expected a PNG, JPEG or TIFF file") from err
    return to_rgb_uint8(array, source=name)


def create_app(session: ExploreSession, catalog: ImageCatalog | None = None) -> Any:
    """The Starlette application for ``session`` (``catalog``: the images offered; default: the validation split)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    catalog = catalog or ImageCatalog(session.cfg)
    lock = threading.Lock()  # one computation at a time: the cache and torch's threads are shared

    async def call(fn: Any, *args: Any) -> Any:
        def locked() -> Any:
            with lock:
                return fn(*args)

        return await run_in_threadpool(locked)

    def ablation_of(request: Request) -> Ablation:
        return Ablation.parse(request.query_params.get("without"), "without")

    def png(data: bytes, **headers: str) -> Response:
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-store", **headers})

    def opened(state: Any) -> dict[str, Any]:
        return {"key": state.key, "name": state.name, "size": list(state.size), "grid": list(state.grid)}

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def model(request: Request) -> Response:
        info = await call(session.describe)
        info["images"] = await call(catalog.entries)
        if catalog.problem:
            info["notes"] = [*info["notes"], catalog.problem]
        info["run"] = str(session.run_dir) if session.run_dir else None
        return JSONResponse(info)

    async def open_image(request: Request) -> Response:
        body = await request.json()
        source, name = str(body.get("source", "")), str(body.get("name", ""))

        def work() -> Any:
            return session.analyse(catalog.read(source, name), name)

        return JSONResponse(opened(await call(work)))

    async def upload(request: Request) -> Response:
        name = Path(request.query_params.get("name", "upload")).name or "upload"
        length = int(request.headers.get("content-length") or 0)
        if length > MAX_UPLOAD_BYTES:
            raise ExploreError(f"{name}: {length / 2**20:.1f} MB is too large; expected at most 32 MB")
        data = await request.body()
        return JSONResponse(opened(await call(lambda: session.analyse(decode_upload(data, name), name))))

    async def image_png(request: Request) -> Response:
        state = session.image(request.path_params["key"])
        return png(await call(encode_png, state.image))

    async def prediction_png(request: Request) -> Response:
        state = session.image(request.path_params["key"])
        ab = ablation_of(request)
        labels = await call(session.prediction, state, ab)
        pal = np.zeros((256, 3), np.uint8)
        pal[: len(session.meta.palette)] = session.meta.palette
        return png(await call(encode_png, pal[labels]))

    async def changes(request: Request) -> Response:
        state = session.image(request.path_params["key"])
        res = await call(session.changes, state, ablation_of(request))
        res.pop("mask")
        return JSONResponse(res)

    async def changes_png(request: Request) -> Response:
        state = session.image(request.path_params["key"])
        res = await call(session.changes, state, ablation_of(request))
        rgba = np.zeros((*res["mask"].shape, 4), np.uint8)
        rgba[res["mask"]] = (255, 255, 0, 255)
        return png(await call(encode_png, rgba))

    async def cell(request: Request) -> Response:
        state = session.image(request.path_params["key"])
        q = request.query_params
        try:
            y, x = int(q.get("y", "")), int(q.get("x", ""))
            classes = [int(c) for c in q.get("classes", "").split(",") if c.strip()]
        except ValueError as err:
            raise ExploreError(f"cell: {dict(q)} has a value that is not a number; expected y, x, classes") from err
        return JSONResponse(await call(session.cell, state, y, x, classes, ablation_of(request)))

    async def activation_map(request: Request) -> Response:
        state = session.image(request.path_params["key"])
        kind, index = request.path_params["kind"], int(request.path_params["index"])
        if kind == "prototype":
            values = await call(session.prototype_map, state, index)
        elif kind == "group":
            values = await call(session.group_map, state, index, ablation_of(request))
        else:
            raise ExploreError(f"map kind {kind!r} is not known; expected 'prototype' or 'group'")
        data, lo, hi = await call(_heat, values)
        return png(data, **{"X-Range": f"{lo:.6g},{hi:.6g}"})

    async def prototype(request: Request) -> Response:
        return JSONResponse(await call(session.prototype_info, int(request.path_params["index"])))

    async def prototype_patch(request: Request) -> Response:
        path = session.galleries()[0].path(int(request.path_params["index"]))
        if path is None:
            raise ExploreError("this prototype has no projected patch in the run (final/prototypes/)")
        return FileResponse(path)

    async def nearest_patch(request: Request) -> Response:
        p, file = int(request.path_params["index"]), request.path_params["file"]
        nearest = session.galleries()[1]
        allowed = {e.get(k) for e in nearest.patches(p) for k in ("patch", "overlay")}
        if file not in allowed or nearest.directory is None:  # only files the manifest lists for p
            raise ExploreError(f"{file!r} is not a nearest patch of prototype {p}")
        return FileResponse(nearest.directory / file)

    async def edits(request: Request) -> Response:
        if session.run_dir is None:
            return JSONResponse([])
        return JSONResponse([e.to_dict() for e in await call(list_edits, session.run_dir)])

    async def save(request: Request) -> Response:
        if session.run_dir is None:
            raise ExploreError("no run directory: edits cannot be saved")
        body = await request.json()
        ab = Ablation.parse(str(body.get("without", "")), "without")
        effect = None
        key = body.get("key")
        if key:
            res = await call(session.changes, session.image(str(key)), ab)
            effect = {"image": session.image(str(key)).name, "changed_fraction": res["fraction"]}

        def work() -> Any:
            return save_edit(
                session.run_dir,
                ab,
                author=str(body.get("author", "")),
                reason=str(body.get("reason", "")),
                base=session.stage,
                effect=effect,
            )

        return JSONResponse((await call(work)).to_dict())

    async def user_error(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=400)

    routes = [
        Route("/", index),
        Route("/api/model", model),
        Route("/api/open", open_image, methods=["POST"]),
        Route("/api/upload", upload, methods=["POST"]),
        Route("/api/image/{key}.png", image_png),
        Route("/api/prediction/{key}.png", prediction_png),
        Route("/api/changes/{key}.png", changes_png),
        Route("/api/changes/{key}", changes),
        Route("/api/cell/{key}", cell),
        Route("/api/map/{key}/{kind}/{index:int}.png", activation_map),
        Route("/api/prototype/{index:int}", prototype),
        Route("/api/patch/prototype/{index:int}.png", prototype_patch),
        Route("/api/patch/nearest/{index:int}/{file}", nearest_patch),
        Route("/api/edits", edits),
        Route("/api/edits", save, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={ExploreError: user_error, ValueError: user_error})
