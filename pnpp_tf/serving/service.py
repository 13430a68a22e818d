"""The HTTP search service over a catalogue index (`python -m pnpp_tf.serve`).

    app = make_app(Searcher("photos.index"))     # a Starlette/FastAPI app: uvicorn serves it

    POST /search          multipart (image, k) or the raw image bytes as the body with ?k=
    GET  /image/<item>    the indexed file of item <item> (?size=160: a thumbnail)
    GET  /api/info        the index: size, model, dtype, backend, labelled or not
    GET  /api/failures    leave-one-out queries of a labelled index, worst first (?limit=)
    GET  /                the page (pnpp_tf/serving/page.html): search by dropping an image; failures

An upload is bounded in bytes (refused with 413 as soon as it is known to be too long) and pixels
(the pixel budget, from the header, undecoded: 413), then decoded and cropped by the functions the
indexing pipeline decodes and crops files with (`pipeline.decode_image_bytes`,
`resize_and_center_crop`), in memory: one decode path. Only files of the catalogue
are served, by item number, and only if their real path is under the index's root.
"""

import io
import os
import pathlib
import time

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from pnpp_tf.data.image_header import DEFAULT_MAX_PIXELS
from pnpp_tf.serving import failures as failures_lib

PAGE = pathlib.Path(__file__).with_name("page.html")
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# What multipart framing (boundaries, part headers, the k field) may add to the image's bytes.
_MULTIPART_SLACK = 64 * 1024
THUMBNAIL_SIDES = (16, 1024)


class _TooLarge(Exception):
    pass


def make_app(searcher, max_upload_bytes=DEFAULT_MAX_UPLOAD_BYTES, max_pixels=DEFAULT_MAX_PIXELS, max_k=100,
             max_failure_queries=failures_lib.DEFAULT_MAX_QUERIES):
    """The service's app over `searcher` (a `pnpp_tf.search.Searcher`, opened once).

    Args:
        max_upload_bytes: the largest upload, in bytes.
        max_pixels: the largest width x height of an upload, read from its header.
        max_k: the most neighbours one search returns (also bounded by the index's size).
        max_failure_queries: items used as leave-one-out queries by /api/failures.
    """
    index = searcher.index
    root = os.path.realpath(index.manifest.get("images_root") or "/nonexistent")
    bound = min(len(index), max_k)
    failures = failures_lib.Failures(index, max_failure_queries)
    rescore = searcher.search_options
    app = FastAPI(title="pnpp_tf search", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.searcher = searcher

    def relative(item):
        return os.path.relpath(index.path(item), index.manifest.get("images_root") or "/")

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/api/info")
    def info():
        manifest = index.manifest
        backend = (index.resolve_backend(searcher.backend) if hasattr(index, "resolve_backend")
                   else {"auto": "exact", "tf": "exact"}.get(searcher.backend, searcher.backend))
        return {"images": len(index), "model": manifest.get("model"), "dtype": manifest.get("dtype", "float32"),
                "backend": backend,
                "embedding_dim": manifest.get("embedding_dim"), "image_size": manifest.get("image_size"),
                "labelled": failures.labelled, "classes": failures.num_classes, "max_k": bound,
                "max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels}

    @app.post("/search")
    async def search(request: Request):
        start = time.perf_counter()
        data, k, _ = await _read_upload(request, max_upload_bytes)
        k = _check_k(k, bound, len(index), max_k)
        return await run_in_threadpool(answer, data, k, start)

    embed = _upload_embedder(searcher.embedder, max_pixels)
    index.search(embed(_blank_png(searcher.embedder.image_size)), min(10, len(index)), backend=searcher.backend,
                 **rescore)  # traced now rather than by the first request

    def answer(data, k, start):
        embeddings = embed(data)
        distances, items, used = index.search(embeddings, k, backend=searcher.backend, **rescore)
        neighbours = [{"rank": rank, "item": int(item), "path": relative(int(item)), "distance": round(float(d), 6),
                       "url": f"/image/{int(item)}"}
                      for rank, (d, item) in enumerate(zip(distances[0], items[0]), start=1) if item >= 0]
        return {"k": k, "backend": used, "neighbours": neighbours,
                "seconds": round(time.perf_counter() - start, 4)}

    @app.get("/image/{item}")
    def image(item: str, size: int = 0):
        if not (item.isascii() and item.isdigit()) or int(item) >= len(index):
            raise HTTPException(404, f"No item {item!r}: items are numbered 0 to {len(index) - 1}.")
        path = os.path.realpath(index.path(int(item)))
        if os.path.commonpath([path, root]) != root:
            raise HTTPException(403, f"Item {item}'s file is outside the indexed folder: not served.")
        if not os.path.isfile(path):
            raise HTTPException(404, f"Item {item}'s file no longer exists.")
        if not size:
            return FileResponse(path)
        if not THUMBNAIL_SIDES[0] <= size <= THUMBNAIL_SIDES[1]:
            raise HTTPException(422, f"size={size} must be between {THUMBNAIL_SIDES[0]} and {THUMBNAIL_SIDES[1]}.")
        return Response(_thumbnail(path, size, max_pixels), media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/failures")
    def failure_list(limit: int = 20, neighbours: int = 5):
        if not failures.labelled:
            raise HTTPException(422, "The index is not of a labelled split (class = parent folder): no failures.")
        if not 1 <= limit <= 1000 or not 1 <= neighbours <= min(20, len(index) - 1):
            raise HTTPException(422, f"limit must be 1 to 1000 and neighbours 1 to {min(20, len(index) - 1)}.")
        return failures.report(limit, neighbours, relative)

    @app.exception_handler(_TooLarge)
    def too_large(request, error):
        return JSONResponse({"detail": str(error)}, status_code=413)

    return app


async def _read_upload(request, limit):
    """(image bytes, k as given or None, file name or None) of a multipart or raw-body upload.

    Raises:
        _TooLarge: the declared or received length is over `limit` (stops reading there).
        HTTPException: 422, no image in the request.
    """
    multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
    allowed = limit + (_MULTIPART_SLACK if multipart else 0)
    message = f"The upload is larger than max_upload_bytes={limit}."
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > allowed:
        raise _TooLarge(message)
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > allowed:
            raise _TooLarge(message)
        chunks.append(chunk)
    body = b"".join(chunks)
    if not multipart:
        if not body:
            raise HTTPException(422, "No image: send it as the body, or as the form field 'image'.")
        return body, request.query_params.get("k"), None

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=1, max_fields=4)
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise HTTPException(422, "No image: the form has no file field 'image'.")
    data = await upload.read()
    if len(data) > limit:
        raise _TooLarge(message)
    return data, form.get("k") or request.query_params.get("k"), upload.filename


def _upload_embedder(embedder, max_pixels):
    """bytes -> float32 embedding [1, D] of an upload, decoded and cropped as `ImageEmbedder.embed_files`
    decodes and crops a file (`pipeline.decode_image_bytes`, `pipeline.resize_and_center_crop`, the
    functions of `pipeline.eval_dataset`), in one `tf.function` traced once rather than a tf.data
    pipeline per request.

    Raises:
        HTTPException: 413 over the pixel budget (from the header, undecoded); 422 undecodable.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from pnpp_tf.data import pipeline  # pylint: disable=import-outside-toplevel
    from pnpp_tf.data.image_header import header_problem  # pylint: disable=import-outside-toplevel

    spec = [tf.TensorSpec([], tf.string)]
    check = tf.function(lambda contents: header_problem(contents, max_pixels), input_signature=spec)
    crop = tf.function(lambda contents: pipeline.resize_and_center_crop(
        pipeline.decode_image_bytes(contents, max_pixels, name="the upload"), embedder.image_size)[None],
        input_signature=spec)

    def embed(data):
        contents = tf.constant(data)
        refuse, too_large, reason = check(contents)
        if bool(refuse):
            raise HTTPException(413 if bool(too_large) else 422,
                                f"The upload cannot be searched with: {reason.numpy().decode()}")
        try:
            images = crop(contents)
        except tf.errors.InvalidArgumentError as error:
            raise HTTPException(422, f"The upload cannot be searched with: {error.message.splitlines()[0]}") from None
        return embedder.image_embedder(images)

    return embed


def _blank_png(side):
    from PIL import Image  # pylint: disable=import-outside-toplevel
    out = io.BytesIO()
    Image.new("RGB", (side, side)).save(out, "PNG")
    return out.getvalue()


def _check_k(k, bound, size, max_k):
    if k is None or k == "":
        return min(10, bound)
    try:
        k = int(k)
    except ValueError:
        raise HTTPException(422, f"k={k!r} is not a whole number.") from None
    if not 1 <= k <= bound:
        why = f"the index holds {size} images" if bound == size else f"max_k={max_k}"
        raise HTTPException(422, f"k={k} must be between 1 and {bound} ({why}).")
    return k


def _thumbnail(path, size, max_pixels):
    from PIL import Image  # pylint: disable=import-outside-toplevel
    try:
        with Image.open(path) as picture:
            if picture.width * picture.height > max_pixels:
                raise HTTPException(413, f"The image is {picture.width}x{picture.height}, over "
                                         f"max_pixels={max_pixels}.")
            picture.draft("RGB", (size, size))
            picture = picture.convert("RGB")
            picture.thumbnail((size, size))
            out = io.BytesIO()
            picture.save(out, "JPEG", quality=85)
            return out.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise HTTPException(422, f"Cannot make a thumbnail: {error}") from error

