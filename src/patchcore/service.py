"""The HTTP service: every model of a folder behind one FastAPI app, a web page to try them, Prometheus metrics.

``patchcore serve MODELS_DIR`` runs :func:`serve`; tests and embedders call :func:`create_app`. Per image it
calls the same library functions as ``patchcore predict`` (:mod:`patchcore.inference`), so both give the same
numbers for the same file.

Order of refusals for a prediction, cheapest first, so abuse costs little: wrong API key 401, unknown model
404, declared body over the limit 413 (nothing read), scorers busy and queue full 503 with Retry-After
(nothing read), body over the limit while reading 413, image header with too many or too few pixels 422
(nothing decoded), undecodable image 422. Only then is the image decoded and scored, by one of ``concurrency``
scorer threads (:class:`Batcher`), so the event loop keeps answering health checks and refusals; requests
for one model that wait together are scored in one batch, as the library scores a folder, which is what lets
several clients get the library's batch throughput. The memory held is bounded by
``(concurrency + queue) * max_upload`` for bodies plus ``concurrency * max_batch`` images being scored, plus
the recent uploads held for the operator's verdict (``feedback_images``, at most 256 MB: :mod:`.feedback`).

Living models: each answer has an ``id``; ``:feedback`` files the operator's verdict on it, ``:apply-feedback``
adds the images called good to the model and serves the update at once; every model taken into service is kept
as a version (:mod:`.versions`); each model's recent scores are checked for drift against its calibration
(:mod:`.core.drift`), in the listing, on the page and in /metrics.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import math
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from . import __version__, versions
from .core.imagefiles import check_image_bytes, read_image_bytes
from .errors import ImageError, PatchCoreError
from .feedback import FeedbackStore, Held, Recent
from .inference import Thresholds, result_of, thresholds_in_force
from .registry import ModelEntry, ModelRegistry, kind_of
from .visualize import png_bytes

__all__ = ["ServiceSettings", "create_app", "serve", "API_KEY_ENV"]

log = logging.getLogger("patchcore.service")

API_KEY_ENV = "PATCHCORE_API_KEY"
MB = 1024 * 1024


@dataclass(frozen=True)
class ServiceSettings:
    """What ``patchcore serve`` is told; every limit has a default fit for a line computer."""

    models_dir: Path
    api_key: str | None = None  # None: no key needed
    max_upload_bytes: int = 20 * MB
    max_pixels: int = 25_000_000  # more is refused from the header, before decoding (scoring holds ~80 B/pixel)
    concurrency: int = 1  # images scored at the same time (threads); more rarely helps on a CPU
    queue_size: int = 8  # requests that may wait for a scorer; the rest get 503 with Retry-After
    max_batch: int = 8  # requests for one model waiting together are scored in one batch of at most this many
    reload_interval: float = 2.0  # seconds between scans of models_dir (a new file serves after 1-2 of them)
    device: str = "auto"
    feedback_images: int = 256  # recent uploads held for the operator's verdict (and at most 256 MB of them)
    keep_versions: int = versions.KEEP  # versions kept of each model served (0: none; no rollback then)

    def check(self) -> None:
        if not self.models_dir.is_dir():
            raise PatchCoreError(f"{self.models_dir}: no such folder (the folder of model files to serve)")
        for name, value, low in (("concurrency", self.concurrency, 1), ("queue size", self.queue_size, 0),
                                 ("batch size", self.max_batch, 1), ("feedback images", self.feedback_images, 0),
                                 ("versions kept", self.keep_versions, 0),
                                 ("upload limit", self.max_upload_bytes, 1), ("pixel limit", self.max_pixels, 1)):
            if value < low:
                raise PatchCoreError(f"the {name} must be at least {low}, got {value}")
        if not self.reload_interval > 0:
            raise PatchCoreError(f"the reload interval must be positive, got {self.reload_interval}")
        from .devices import check_device

        check_device(self.device, "--device")  # before the first model load, which would fail for every model


# ----------------------------------------------------------------------------------------------- schemas
class ErrorResponse(BaseModel):
    detail: str = Field(description="What was wrong, in one line.")


class MapView(BaseModel):
    """The anomaly map for viewers that show other thresholds without scoring again."""

    png: str = Field(description="8-bit grey PNG, base64; map value = png / 255 * scale.")
    scale: float
    peak_level: float = Field(description="For an anomalous verdict the mask always holds pixels at or above "
                                          "this level (the region around the map's peak).")
    pixel_ratio: float = Field(description="pixel threshold / image threshold: at an image threshold t the "
                                           "mask is value >= min(t * pixel_ratio, peak_level) when score >= t.")


class PredictResponse(BaseModel):
    id: str = Field(description="This prediction's id: send it back with the true label to "
                                ":feedback (the image is held for that while it is among the recent ones).")
    model: str
    model_version: int | None = Field(None, description="The served model's version (patchcore versions).")
    score: float = Field(description="Anomaly score (Prediction.score).")
    normalized_score: float = Field(description="score / threshold: the threshold is 1.0.")
    is_anomalous: bool = Field(description="score >= threshold.")
    verdict: Literal["good", "anomalous"]
    threshold: float = Field(description="The image threshold the verdict was made at.")
    pixel_threshold: float = Field(description="The map level of the defect mask (scaled with the threshold).")
    threshold_source: str
    width: int
    height: int
    defect_area_fraction: float = Field(description="Share of the image's pixels in the defect mask.")
    seconds: float = Field(description="Time spent decoding and scoring on the server.")
    overlay_png: str | None = Field(None, description="Heat map blended on the image (PNG, base64); with "
                                                      "outline=true, the defect mask outlined in white.")
    mask_png: str | None = Field(None, description="Defect mask, 255 = defect (PNG, base64).")
    polygons: list[list[list[float]]] | None = Field(
        None, description="Outlines of the defect mask's regions: lists of [x, y] pixel coordinates.")
    map: MapView | None = None


class Calibration(BaseModel):
    method: str | None = None
    rule: str | None = None
    target_far: float | None = None
    n: int | None = Field(None, description="Good images the threshold was calibrated on.")
    source: str | None = None
    statement: str | None = Field(None, description="What the threshold guarantees, in one sentence.")
    guaranteed_far: float | None = None


class Drift(BaseModel):
    """The recent scores against the calibration's (patchcore.core.drift): more alarms than the calibrated
    false-alarm rate allows, and a shift of the score distribution."""

    tested: bool = Field(description="Enough recent images to test (30).")
    drifting: bool
    excess_alarms: bool
    shifted: bool
    n: int = Field(description="Recent images in the window (at most 200).")
    images_seen: int
    alarms: int = Field(description="Recent images at or above the threshold.")
    expected_alarms: float
    allowed_far: float
    alarm_p: float = Field(description="Binomial tail of the alarms at the allowed rate.")
    shift_ks: float = Field(description="Kolmogorov-Smirnov statistic, recent scores vs calibration scores.")
    shift_p: float
    alpha: float
    in_words: str


class ModelInfo(BaseModel):
    name: str
    version: int | None = Field(None, description="Its number among the kept versions (patchcore versions).")
    kind: Literal["model file", "export"] = Field(
        description="A model file (scored with PyTorch) or an export folder (the torch-free runtime).")
    file: str
    file_bytes: int
    loaded_at: datetime
    backbone: str
    image_size: list[int]
    bank_size: int | None = None
    threshold: float
    pixel_threshold: float
    threshold_source: str
    calibration: Calibration
    drift: Drift | None = Field(None, description="None for a model without calibration scores.")
    feedback: dict[str, int] = Field(default_factory=dict, description="Operator verdicts held, by label.")


class FeedbackRequest(BaseModel):
    id: str = Field(description="The prediction's id.")
    label: Literal["good", "defect"] = Field(description="What the part really is.")
    note: str | None = Field(None, max_length=500)


class FeedbackResponse(BaseModel):
    id: str
    label: str
    overrules: bool = Field(description="The label contradicts the model's verdict (a false alarm overruled, or "
                                        "a defect the model passed).")
    file: str = Field(description="Where the image is kept, under the models folder's .feedback/NAME/.")
    held: dict[str, int]


class ApplyResponse(BaseModel):
    model: str
    images: int = Field(description="Good images from the feedback added to the model.")
    bank_added: int
    threshold_before: float | None
    threshold_after: float | None
    previous_version: int | None
    seconds: float
    detail: str


class ModelFailure(BaseModel):
    name: str
    file: str
    detail: str = Field(description="Why the file was not loaded (the version loaded before, if any, serves).")
    since: datetime


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    failures: list[ModelFailure]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str = __version__


class Readiness(BaseModel):
    ready: bool
    models: int
    failures: int


# ----------------------------------------------------------------------------------------------- metrics
class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps in one process do not collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("patchcore_http_requests_total", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("patchcore_http_request_seconds", "HTTP request latency by route",
                                 ["method", "route"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.verdicts = Counter("patchcore_predictions_total", "Images scored, by model and verdict",
                                ["model", "verdict"], registry=self.registry)
        self.scoring = Histogram("patchcore_scoring_seconds", "Decoding and scoring time per image, by model",
                                 ["model"], registry=self.registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.rejected = Counter("patchcore_rejected_total", "Predictions refused before scoring, by reason",
                                ["reason"], registry=self.registry)
        self.admitted = Gauge("patchcore_requests_admitted", "Predictions being scored or waiting for a scorer",
                              registry=self.registry)
        self.models = Gauge("patchcore_models_loaded", "Models in service", registry=self.registry)
        self.batches = Histogram("patchcore_batch_images", "Images scored together in one batch, by model",
                                 ["model"], registry=self.registry, buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
        self.model_events = Counter("patchcore_model_events_total", "Model files loaded, failed or removed",
                                    ["model", "event"], registry=self.registry)
        self.drift = Gauge("patchcore_drift", "Recent scores against the calibration, by model: drifting (0/1), "
                           "alarms and expected_alarms in the window, alarm_p, shift_ks, shift_p",
                           ["model", "value"], registry=self.registry)
        self.feedback = Counter("patchcore_feedback_total", "Operator verdicts, by model, label and whether they "
                                "overrule the model", ["model", "label", "overrules"], registry=self.registry)

    def observe_drift(self, entries: list[ModelEntry]) -> None:
        self.drift.clear()
        for e in entries:
            if e.drift is None:
                continue
            st = e.drift.state()
            for key, value in (("drifting", float(st.drifting)), ("alarms", st.alarms),
                               ("expected_alarms", st.expected_alarms), ("alarm_p", st.alarm_p),
                               ("shift_ks", st.shift_ks), ("shift_p", st.shift_p), ("window", st.n)):
                self.drift.labels(e.name, key).set(float(value))


class _MetricsMiddleware:
    """Counts and times every HTTP request, labelled by its route template (never the raw path)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "other"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ admission
class Admission:
    """At most ``concurrency + queue_size`` predictions in the building; the rest are turned away at once.

    Used from the event loop only, so plain counters suffice.
    """

    def __init__(self, concurrency: int, queue_size: int) -> None:
        self.concurrency, self.capacity = concurrency, concurrency + queue_size
        self.admitted = 0
        self._mean = 0.5  # running mean of scoring seconds, for Retry-After

    def enter(self) -> bool:
        if self.admitted >= self.capacity:
            return False
        self.admitted += 1
        return True

    def leave(self) -> None:
        self.admitted -= 1

    def observe(self, seconds: float) -> None:
        self._mean = 0.9 * self._mean + 0.1 * seconds

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained (at least 1)."""
        return max(1, min(60, math.ceil(self.admitted * self._mean / self.concurrency)))


# ---------------------------------------------------------------------------------------------------- app
IMAGE_BODY: dict[str, Any] = {"requestBody": {"required": True, "description": (
    "The image (PNG, JPEG, BMP, TIFF, WebP): the multipart form field `image`, or the raw bytes as the body."),
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                           "properties": {"image": {"type": "string", "format": "binary"}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "image/*": {"schema": {"type": "string", "format": "binary"}}}}}

ERRORS = {code: {"model": ErrorResponse, "description": text} for code, text in (
    (401, "Missing or wrong API key."), (404, "No such model."), (413, "Upload larger than the limit."),
    (409, "The model cannot take this now (an export, no feedback waiting, an update running)."),
    (422, "Not a readable image, too many or too few pixels, or a bad parameter."),
    (503, "All scorers busy and the queue full: retry after the Retry-After header's seconds."))}


def _web_file(name: str) -> bytes:
    return (resources.files("patchcore") / "web" / name).read_bytes()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _when(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def _model_info(e: ModelEntry, store: FeedbackStore | None = None) -> ModelInfo:
    m = e.model
    cal = dict(m.calibration_ or {})
    params = m.get_params()
    info = m.fit_info_ if hasattr(m, "fit_info_") else {}
    kind = kind_of(e.path)
    size = sum(f.stat().st_size for f in e.path.iterdir() if f.is_file()) if kind == "export" else e.signature[0]
    return ModelInfo(
        name=e.name, kind=kind, file=e.path.name, file_bytes=size, loaded_at=_when(e.loaded_at),
        backbone=str(params.get("backbone")), image_size=list(m.preprocessing.input_size),
        bank_size=info.get("bank_size"), threshold=e.thresholds.image, pixel_threshold=e.thresholds.pixel,
        threshold_source=e.thresholds.source, version=e.version,
        calibration=Calibration(**{k: cal.get(k) for k in Calibration.model_fields}),
        drift=None if e.drift is None else Drift(**{**(st := e.drift.state()).to_dict(), "in_words": st.in_words()}),
        feedback=store.counts(e.name) if store is not None else {})


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 once it passes ``limit``. The rest of an oversized body is read and dropped (up to
    another ``limit``), so that clients that send everything before reading get the 413, not a reset."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                chunks = []
                if size > 2 * limit:
                    break
                continue
            chunks.append(chunk)
    except ClientDisconnect:
        raise HTTPException(400, "the client went away before the upload was complete") from None
    if size > limit:
        raise HTTPException(413, f"the upload is larger than the limit of {limit / MB:g} MB",
                            headers={"Connection": "close"})
    return b"".join(chunks)


async def _image_bytes(request: Request, body: bytes) -> bytes:
    """The image of a multipart form (field ``image``) or the raw body."""
    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
        except HTTPException as e:
            raise HTTPException(422, f"malformed multipart body: {e.detail}") from None
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise HTTPException(422, "no image: send it as the multipart form field 'image' (a file), or as the "
                                     "raw request body")
        data = await upload.read()
        await form.close()
    else:
        data = body
    if not data:
        raise HTTPException(422, "no image: the request body is empty (send the image as the body or as the "
                                 "multipart form field 'image')")
    return data


def create_app(settings: ServiceSettings, registry: ModelRegistry | None = None) -> FastAPI:
    """The app serving ``settings.models_dir``; it starts watching the folder when it starts up."""
    from fastapi_offline import FastAPIOffline  # Swagger UI / ReDoc from the package, not a CDN

    settings.check()
    metrics = Metrics()

    def on_event(kind: str, name: str, detail: str) -> None:
        metrics.model_events.labels(name, kind).inc()
        metrics.models.set(len(models.entries()))

    models = registry or ModelRegistry(settings.models_dir, device=settings.device, on_event=on_event,
                                       keep_versions=settings.keep_versions)
    admission = Admission(settings.concurrency, settings.queue_size)
    recent = Recent(settings.feedback_images)
    store = FeedbackStore(settings.models_dir)
    applying = threading.Lock()
    pool: dict[str, Batcher] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        pool["scorers"] = Batcher(settings.concurrency, settings.max_batch, metrics)
        models.start(settings.reload_interval)
        try:
            yield
        finally:
            models.stop()
            pool.pop("scorers").shutdown()

    app = FastAPIOffline(
        title="patchcore", version=__version__, lifespan=lifespan,
        description="Visual anomaly detection (PatchCore): one model per product, named by its file stem. "
                    "Send an image, get the verdict, the score against the calibrated threshold and where the "
                    "defect is. The web page at / tries it by hand.")
    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    app.state.settings, app.state.registry, app.state.metrics, app.state.admission = (
        settings, models, metrics, admission)

    key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The service's API key.")
    bearer = HTTPBearer(auto_error=False, description="The API key as a bearer token.")

    def require_key(key: str | None = Security(key_header),
                    cred: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        if settings.api_key is None:
            return
        given = key or (cred.credentials if cred is not None else None)
        if given is None or not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send it in the X-API-Key header "
                                     "(or as Authorization: Bearer KEY)", headers={"WWW-Authenticate": "Bearer"})

    protected = [Depends(require_key)]

    # ------------------------------------------------------------------------------------ errors as JSON
    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = " ".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        msg = f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid request")
        return JSONResponse({"detail": " ".join(msg.split())}, status_code=422)

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server log"},
                            status_code=500)

    # -------------------------------------------------------------------------------------------- health
    @app.get("/healthz", response_model=Health, tags=["health"], summary="The process answers")
    async def healthz() -> Health:
        return Health()

    @app.get("/readyz", response_model=Readiness, tags=["health"], summary="At least one model serves",
             responses={503: {"model": Readiness, "description": "No model serves yet."}})
    async def readyz() -> JSONResponse:
        r = Readiness(ready=models.ready, models=len(models.entries()), failures=len(models.failures()))
        return JSONResponse(r.model_dump(), status_code=200 if r.ready else 503)

    # -------------------------------------------------------------------------------------------- models
    @app.get("/v1/models", response_model=ModelsResponse, tags=["models"], dependencies=protected,
             summary="Models in service, and model files that failed to load", responses={401: ERRORS[401]})
    async def list_models() -> ModelsResponse:
        return ModelsResponse(models=[_model_info(e, store) for e in models.entries()],
                              failures=[ModelFailure(name=f.name, file=f.path.name, detail=f.detail,
                                                     since=_when(f.at)) for f in models.failures()])

    def _entry(name: str) -> ModelEntry:
        entry = models.get(name)
        if entry is None:
            known = ", ".join(e.name for e in models.entries()) or "none yet"
            raise HTTPException(404, f"no model named {name!r} (serving: {known})")
        return entry

    @app.get("/v1/models/{name}", response_model=ModelInfo, tags=["models"], dependencies=protected,
             summary="One model's settings and calibration", responses={k: ERRORS[k] for k in (401, 404)})
    async def get_model(name: str) -> ModelInfo:
        if name.endswith(":predict"):  # GET on the predict URL: the URL is right, the method is not
            raise HTTPException(405, "predict takes POST (multipart field 'image', or the raw image as the body)",
                                headers={"Allow": "POST"})
        if name.endswith((":feedback", ":apply-feedback")):
            raise HTTPException(405, f"{name.rsplit(':', 1)[1]} takes POST", headers={"Allow": "POST"})
        return _model_info(_entry(name), store)

    @app.post("/v1/models/{name}:predict", response_model=PredictResponse, response_model_exclude_none=True,
              tags=["models"], dependencies=protected, openapi_extra=IMAGE_BODY, responses=ERRORS,
              summary="Score an image: verdict, score against the threshold, and on request where the defect is")
    async def predict(
        name: str, request: Request,
        overlay: bool = Query(False, description="Add overlay_png: the heat map on the image."),
        outline: bool = Query(True, description="Outline the defect mask on the overlay."),
        mask: bool = Query(False, description="Add mask_png: the defect mask."),
        polygons: bool = Query(False, description="Add polygons: the defect mask's outlines."),
        map: bool = Query(False, description="Add map: the anomaly map for viewers (other thresholds)."),
        threshold: float | None = Query(None, gt=0, description="Judge at this image threshold instead of the "
                                                                 "model's (the pixel threshold scales with it)."),
    ) -> JSONResponse:
        entry = _entry(name)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_upload_bytes:
            metrics.rejected.labels("too_large").inc()
            raise HTTPException(413, f"the upload ({int(declared) / MB:.1f} MB) is larger than the limit of "
                                     f"{settings.max_upload_bytes / MB:g} MB", headers={"Connection": "close"})
        if not admission.enter():
            metrics.rejected.labels("busy").inc()
            raise HTTPException(503, f"busy: {admission.capacity} requests are being scored or waiting; retry "
                                     f"later", headers={"Retry-After": str(admission.retry_after())})
        metrics.admitted.set(admission.admitted)
        try:
            try:
                body = await _read_body(request, settings.max_upload_bytes)
            except HTTPException:
                metrics.rejected.labels("too_large").inc()
                raise
            data = await _image_bytes(request, body)
            del body
            try:
                check_image_bytes(data, name="the image", max_pixels=settings.max_pixels)
            except ImageError as e:
                metrics.rejected.labels("bad_image").inc()
                raise HTTPException(422, str(e)) from None
            options = dict(overlay=overlay, outline=outline, mask=mask, polygons=polygons, map=map,
                           threshold=threshold)
            try:
                result = await asyncio.wrap_future(pool["scorers"].submit(entry, data, options))
            except ImageError as e:
                metrics.rejected.labels("bad_image").inc()
                raise HTTPException(422, str(e)) from None
            except PatchCoreError as e:
                raise HTTPException(422, str(e)) from None
            except MemoryError:
                raise HTTPException(503, "out of memory scoring this image; retry later or send a smaller "
                                         "image", headers={"Retry-After": "10"}) from None
            admission.observe(result["seconds"])
            metrics.scoring.labels(name).observe(result["seconds"])
            metrics.verdicts.labels(name, result["verdict"]).inc()
            result["id"], result["model_version"] = uuid.uuid4().hex, entry.version
            if entry.drift is not None:
                entry.drift.add(result["score"])
            # Held for the operator's verdict, judged at the model's own threshold whatever the request asked.
            recent.add(Held(result["id"], name, entry.version, float(result["score"]),
                            "anomalous" if result["score"] >= entry.thresholds.image else "good",
                            entry.thresholds.image, data, time.time()))
            return JSONResponse(PredictResponse(**result).model_dump(exclude_none=True))
        finally:
            admission.leave()
            metrics.admitted.set(admission.admitted)

    # ------------------------------------------------------------------------------------------ feedback
    @app.post("/v1/models/{name}:feedback", response_model=FeedbackResponse, tags=["feedback"],
              dependencies=protected, responses={k: ERRORS[k] for k in (401, 404, 422)},
              summary="The operator's verdict on a recent prediction: its image is kept with the true label")
    async def feedback(name: str, body: FeedbackRequest) -> FeedbackResponse:
        _entry(name)
        held = recent.get(body.id)
        if held is None:
            raise HTTPException(404, f"no recent prediction with id {body.id!r}: the service holds the images of "
                                     f"its last {settings.feedback_images} predictions")
        if held.model != name:
            raise HTTPException(422, f"prediction {body.id} was made by model {held.model!r}, not {name!r}")
        line = await asyncio.to_thread(store.add, held, body.label, body.note)
        metrics.feedback.labels(name, body.label, str(line["overrules"]).lower()).inc()
        return FeedbackResponse(id=held.id, label=body.label, overrules=line["overrules"], file=line["file"],
                                held=store.counts(name))

    @app.post("/v1/models/{name}:apply-feedback", response_model=ApplyResponse, tags=["feedback"],
              dependencies=protected, responses={k: ERRORS[k] for k in (401, 404, 409)},
              summary="Add the images the operator called good to the model, and serve the updated model")
    async def apply_feedback(name: str) -> ApplyResponse:
        entry = _entry(name)
        if kind_of(entry.path) == "export":
            raise HTTPException(409, f"{name} is an export, which cannot learn: update the model file it was "
                                     f"exported from (patchcore update) and export it again")
        goods = store.good_images(name)
        if not goods:
            raise HTTPException(409, f"no images called good by the operator wait for {name} (POST :feedback)")
        if not applying.acquire(blocking=False):
            raise HTTPException(409, "another update is being applied; try again when it is done")
        try:
            return await asyncio.to_thread(_apply, entry, goods)
        except PatchCoreError as e:
            raise HTTPException(409, str(e)) from None
        finally:
            applying.release()

    def _apply(entry: ModelEntry, goods: list[Path]) -> ApplyResponse:
        """Update a fresh copy of the served model (the served one keeps scoring), put it in place by an
        atomic rename (the file in place is a kept version already) and take it into service now."""
        try:
            from .model import PatchCore
        except ImportError:
            raise PatchCoreError('applying feedback updates the model with PyTorch: pip install '
                                 '"patchcore[full]"') from None
        t0 = time.perf_counter()
        model = PatchCore.load(entry.path, device=settings.device)
        before = model.threshold_
        model.update(goods, skip_unreadable=True)
        step = model.fit_info_["updates"][-1]
        model.save(entry.path, overwrite=True)
        store.mark_applied(entry.name, goods, entry.version)
        models.take(entry.name)
        now = models.get(entry.name)
        return ApplyResponse(model=entry.name, images=int(step["images"]), bank_added=int(step["bank_added"]),
                             threshold_before=before, threshold_after=model.threshold_,
                             previous_version=entry.version, seconds=time.perf_counter() - t0,
                             detail=f"serving version {now.version if now else '?'}; `patchcore rollback "
                                    f"MODELS_DIR {entry.name}` goes back to version {entry.version}")

    # ------------------------------------------------------------------------------------------- metrics
    @app.get("/metrics", tags=["health"], dependencies=protected, summary="Prometheus metrics",
             response_class=Response, responses={401: ERRORS[401]})
    async def prometheus() -> Response:
        metrics.models.set(len(models.entries()))
        metrics.observe_drift(models.entries())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------------------------------ web page
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_web_file("index.html"))

    app.mount("/ui", StaticFiles(packages=[("patchcore", "web")]), name="ui")
    return app


@dataclass
class _Job:
    entry: ModelEntry
    data: bytes
    options: dict[str, Any]
    future: Future


class Batcher:
    """The scorer threads: each takes the oldest waiting request and every other one waiting for the same model
    (up to ``max_batch``, in arrival order) and scores them in one ``predict`` call, as the library scores a
    folder in batches. A request that arrives alone is scored at once, alone: nothing waits for company.
    Decoding, thresholds and pictures stay per request; a batch that fails is scored again one by one, so one
    bad image fails only its own request."""

    def __init__(self, workers: int, max_batch: int, metrics: Metrics) -> None:
        self.max_batch, self.metrics = int(max_batch), metrics
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._stop = False
        self._threads = [threading.Thread(target=self._run, name=f"patchcore-score-{i}", daemon=True)
                         for i in range(int(workers))]
        for t in self._threads:
            t.start()

    def submit(self, entry: ModelEntry, data: bytes, options: dict[str, Any]) -> Future:
        """Queue one request; its future gets the response's fields (or the error)."""
        job = _Job(entry, data, options, Future())
        with self._cond:
            if self._stop:
                raise RuntimeError("the service is shutting down")
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def shutdown(self) -> None:
        """Cancel what waits, let the batches being scored finish, stop the threads."""
        with self._cond:
            self._stop = True
            for job in self._queue:
                job.future.cancel()
            self._queue.clear()
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=60)

    def _take(self) -> list[_Job]:
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait()
            if self._stop:
                return []
            first = self._queue.popleft()
            batch, others = [first], deque()
            while self._queue and len(batch) < self.max_batch:
                job = self._queue.popleft()
                (batch if job.entry.model is first.entry.model else others).append(job)
            self._queue.extendleft(reversed(others))
            return [j for j in batch if j.future.set_running_or_notify_cancel()]  # a gone client's is dropped

    def _run(self) -> None:
        while True:
            batch = self._take()  # empty when stopping, or when every request taken was given up
            if batch:
                self._score(batch)  # a batch taken is always answered, even while stopping
            elif self._stop:
                return

    def _score(self, batch: list[_Job]) -> None:
        t0 = time.perf_counter()
        ready: list[tuple[_Job, Any, Thresholds]] = []
        for job in batch:
            try:
                # Checked here, not in the batch: an image of the wrong kind fails its own request only.
                image = job.entry.model.preprocessing.channels_of(read_image_bytes(job.data, name="the image"),
                                                                  "the image")
                opts = job.options
                thresholds = job.entry.thresholds if opts["threshold"] is None else thresholds_in_force(
                    job.entry.model, opts["threshold"], "the request's threshold", job.entry.name)
                ready.append((job, image, thresholds))
            except Exception as e:  # noqa: BLE001 - the request's own error, answered by the handler
                job.future.set_exception(e)
        if not ready:
            return
        model = ready[0][0].entry.model
        try:
            preds = model.predict([image for _, image, _ in ready])
        except Exception:  # noqa: BLE001 - one image spoilt the batch: score each alone for its own answer
            preds = None
        sizes = self.metrics.batches.labels(ready[0][0].entry.name)
        if preds is not None:
            sizes.observe(len(ready))
        for k, (job, image, thresholds) in enumerate(ready):
            try:
                if preds is None:
                    sizes.observe(1)
                pred = preds[k] if preds is not None else model.predict([image])[0]
                pred.name = job.entry.name
                job.future.set_result(_response(job.entry, result_of(pred, image, thresholds), thresholds,
                                                job.options, t0))
            except Exception as e:  # noqa: BLE001 - the request's own error, answered by the handler
                job.future.set_exception(e)


def _response(entry: ModelEntry, res: Any, thresholds: Thresholds, options: dict[str, Any], t0: float
              ) -> dict[str, Any]:
    """The response's fields for one scored image (``res``: :class:`patchcore.inference.ImageResult`)."""
    out: dict[str, Any] = {"model": entry.name, **res.summary(), "threshold_source": thresholds.source}
    if options["overlay"]:
        out["overlay_png"] = _b64(png_bytes(res.overlay(outline=options["outline"])))
    if options["mask"]:
        out["mask_png"] = _b64(png_bytes(res.mask))
    if options["polygons"]:
        out["polygons"] = res.polygons()
    if options["map"]:
        view = res.map_view()
        out["map"] = {**view, "png": _b64(view["png"])}
    out["seconds"] = time.perf_counter() - t0
    return out


def serve(settings: ServiceSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the service with uvicorn until interrupted (Ctrl-C or SIGTERM)."""
    import copy

    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    app = create_app(settings)
    # Our messages (models loaded, failed, removed) in uvicorn's format, on its handler.
    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["loggers"]["patchcore"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    uvicorn.run(app, host=host, port=port, log_level=log_level, log_config=log_config, server_header=False,
                timeout_graceful_shutdown=10)
