"""The naive baseline for ``bench/load.py``: the seed article's service pattern, same model.

A FastAPI app holding a ``transformers`` pipeline, its ``async`` endpoint calling the pipeline
directly for each request. The call blocks the event loop, so requests run one at a time, each a
batch of one: what most first AI services look like. It serves the same prepared model directory
as our sentiment function (``MODEL_DIR``, default ``models/sentiment``) in full precision, with
torch's default threads; only the serving pattern differs.

Run: ``uvicorn baseline_app:app --app-dir bench --port 8000``; ``POST /analyze {"text": ...}``.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from pydantic import BaseModel
from transformers import pipeline

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(os.environ.get("MODEL_DIR", REPO / "models" / "sentiment"))

app = FastAPI(title="Sentiment Analysis Service (baseline)")
classifier = pipeline("text-classification", model=str(MODEL_DIR), device=-1)


class Request(BaseModel):
    text: str


@app.post("/analyze")
async def analyze_sentiment(request: Request) -> dict[str, object]:
    result = classifier(request.text, truncation=True)
    return {"sentiment": result[0]["label"], "confidence": result[0]["score"], "text": request.text}
