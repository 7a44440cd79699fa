"""The dashboard's web application (Starlette): pages, a JSON API and the two actions.

Read-only but for the stop and resume requests, which are POSTs that must carry the
page's CSRF token (a header a page of another site cannot set) and, when the server has
an access token, that token too. Files are served only from inside the runs directory.
"""

import hmac
import os
import secrets
import threading
import time
from importlib import resources

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from medseg_jax.dashboard import actions, curves, runs

CSRF_HEADER = "x-medseg-csrf"
TOKEN_COOKIE = "medseg_token"
PAGES = ("runs.html", "run.html", "compare.html")


class Dashboard:
  """The runs directory and what is read from it: each run's metrics, read incrementally."""

  def __init__(self, root: str):
    self.root = os.path.realpath(root)
    self._records: dict[str, runs.Records] = {}
    self._lock = threading.Lock()

  def workdir(self, name: str) -> str:
    """The run called `name` (its path under the root); LookupError if there is none."""
    path = os.path.realpath(os.path.join(self.root, name))
    if not _inside(path, self.root) or not (
        os.path.exists(os.path.join(path, "manifest.json"))
        or os.path.isdir(os.path.join(path, "processes"))):
      raise LookupError(name)
    return path

  def records(self, name: str) -> list[dict]:
    with self._lock:
      reader = self._records.setdefault(
          name, runs.Records(os.path.join(self.workdir(name), "metrics.jsonl")))
      return list(reader.refresh())

  def rows(self) -> list[dict]:
    now = time.time()
    return [runs.summary(name, runs.read(self.workdir(name)), self.records(name), now)
            for name in runs.find(self.root)]

  def detail(self, name: str) -> dict:
    workdir = self.workdir(name)
    run = runs.read(workdir)
    montage = runs.newest_montage(workdir)
    return {"summary": runs.summary(name, run, self.records(name)),
            "manifest": run.manifest,
            "config": runs.read_json(os.path.join(workdir, "config.json")),
            "checkpoints": runs.checkpoints(workdir),
            "processes": run.processes,
            "montage": f"/files/{name}/{montage}" if montage else None,
            "resume": runs.resume_command(run.manifest),
            "log": runs.log_tail(workdir)}

  def curves(self, name: str) -> dict:
    manifest = runs.read_json(os.path.join(self.workdir(name), "manifest.json")) or {}
    classes = (manifest.get("dataset") or {}).get("classes") or []
    return curves.all_curves(self.records(name), classes)


def _inside(path: str, root: str) -> bool:
  return path == root or path.startswith(root + os.sep)


def create_app(root: str, token: str | None = None) -> Starlette:
  """The application over the runs directory `root`; with `token`, every request must
  carry it (`?token=` once, then a cookie; or `Authorization: Bearer`)."""
  board, csrf = Dashboard(root), secrets.token_urlsafe(24)

  def page(name: str):
    text = resources.files("medseg_jax.dashboard").joinpath("static", name).read_text()
    text = text.replace("{{csrf}}", csrf)

    def endpoint(request: Request) -> Response:
      del request
      return HTMLResponse(text)
    return endpoint

  def api(handler):
    """A JSON endpoint of a run: 404 for a name that is not a run under the root."""
    def endpoint(request: Request) -> Response:
      try:
        return JSONResponse(handler(request.path_params.get("name", ".")))
      except LookupError:
        return JSONResponse({"error": "no such run"}, status_code=404)
    return endpoint

  def files_endpoint(request: Request) -> Response:
    path = os.path.realpath(os.path.join(board.root, request.path_params["path"]))
    if not _inside(path, board.root):
      return JSONResponse({"error": "outside the runs directory"}, status_code=403)
    if not os.path.isfile(path):
      return JSONResponse({"error": "not found"}, status_code=404)
    return FileResponse(path)

  def action(act):
    def endpoint(request: Request) -> Response:
      refusal = _csrf_refusal(request, csrf)
      if refusal:
        return JSONResponse({"error": refusal}, status_code=403)
      try:
        done = act(board.workdir(request.path_params["name"]))
      except LookupError:
        return JSONResponse({"error": "no such run"}, status_code=404)
      except actions.Refused as e:
        return JSONResponse({"error": str(e)}, status_code=409)
      return JSONResponse({"ok": True, **done})
    return endpoint

  routes = [
      Route("/", page("runs.html")),
      Route("/run/{name:path}", page("run.html")),
      Route("/compare", page("compare.html")),
      Route("/api/runs", lambda request: JSONResponse(board.rows())),
      Route("/api/run/{name:path}", api(board.detail)),
      Route("/api/curves/{name:path}", api(board.curves)),
      Route("/api/stop/{name:path}", action(actions.stop), methods=["POST"]),
      Route("/api/resume/{name:path}", action(actions.resume), methods=["POST"]),
      Route("/files/{path:path}", files_endpoint),
      Mount("/static", StaticFiles(packages=[("medseg_jax.dashboard", "static")]),
            name="static"),
  ]
  middleware = [Middleware(_TokenCheck, token=token)] if token else []
  return Starlette(routes=routes, middleware=middleware)


def _csrf_refusal(request: Request, csrf: str) -> str | None:
  """Why a state-changing request is refused (None: it is not): it must carry the page's
  CSRF token, and an Origin header, where the browser sends one, must be this server."""
  if not hmac.compare_digest(request.headers.get(CSRF_HEADER, ""), csrf):
    return "missing or wrong CSRF token; use the dashboard's page"
  origin = request.headers.get("origin")
  if origin and origin.split("://", 1)[-1] != request.headers.get("host"):
    return f"a request from another site ({origin})"
  return None


class _TokenCheck(BaseHTTPMiddleware):
  """Every request needs the access token: as `?token=` (which sets a cookie, so the
  page's own requests carry it), the cookie, or an `Authorization: Bearer` header."""

  def __init__(self, app, token: str):
    super().__init__(app)
    self.token = token

  async def dispatch(self, request: Request, call_next) -> Response:
    given = (request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)
             or request.headers.get("authorization", "").removeprefix("Bearer "))
    if not hmac.compare_digest(given or "", self.token):
      return JSONResponse({"error": "this dashboard needs its access token (?token=...)"},
                          status_code=401)
    response = await call_next(request)
    if request.query_params.get("token"):
      response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
    return response
