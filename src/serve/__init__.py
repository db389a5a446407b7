"""HTTP serving of a trained classifier: a FastAPI app with request batching and an upload limit
(`app.py`, `batching.py`), the task behind scripts/serve.py (`server.py`) and the loopback load
test behind scripts/load_test_serve.py (`load_test.py`)."""
