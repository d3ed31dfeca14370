"""The operator's pages: the live page at / (static HTML and JavaScript, Chart.js from the `chartkick` package)
and its JSON, GET /v1/live. No build step and nothing from a CDN: every file is served by the app itself."""

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from app.ui import live

STATIC = Path(__file__).parent / "static"
# chartkick (MIT, no dependencies) ships Chart.js 4 with its date adapter as one file for Django and Flask; only
# that file is used, so importing chartkick's framework modules (which need Django or Flask) never happens.
CHART_JS = Path(str(files("chartkick"))) / "django" / "static" / "chartkick" / "Chart.bundle.js"

pages = APIRouter(include_in_schema=False)


@pages.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@pages.get("/ui/vendor/chart.js")
async def chart_js() -> FileResponse:
    return FileResponse(CHART_JS, media_type="text/javascript")


def install_ui(app: FastAPI) -> None:
    app.include_router(live.router)
    app.include_router(pages)  # before the /ui mount, which would otherwise answer /ui/vendor/chart.js with 404
    app.mount("/ui", StaticFiles(directory=STATIC), name="ui")
